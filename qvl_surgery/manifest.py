"""DIR/manifest.json of a split: the parts in chain order, their I/O and their files' sizes and sha256."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import BadInput
from .modelfile import sha256_file

MANIFEST = "manifest.json"


def write_manifest(out_dir: Path, parts: list[dict], *, source: str | None, cuts: list[str]) -> Path:
    doc = {"format": "qvl-surgery split", "version": __version__, "source": source, "cuts": cuts, "parts": parts}
    path = out_dir / MANIFEST
    path.write_text(json.dumps(doc, indent=1))
    return path


def verify_files(checks: list[tuple[Path, str]]) -> None:
    """Raise BadInput unless every (file, sha256) matches. Two files hash at once (hashlib frees the GIL)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        for (f, want), got in zip(checks, pool.map(lambda c: sha256_file(c[0]), checks)):
            if got != want:
                raise BadInput(f"{f}: sha256 does not match the manifest; the split is damaged "
                               "or mixed with another one")


def hash_checks(m: "Manifest") -> list[tuple[Path, str]]:
    return [(m.dir / p[name], p[key]) for p in m.parts
            for key, name in (("data_sha256", "data"), ("onnx_sha256", "path")) if key in p]


@dataclass
class Manifest:
    path: Path
    doc: dict

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def parts(self) -> list[dict]:
        return self.doc["parts"]

    def part_paths(self) -> list[Path]:
        return [self.dir / p["path"] for p in self.parts]


def is_manifest_path(path: str | Path) -> bool:
    path = Path(path)
    return path.name == MANIFEST or (path.is_dir() and (path / MANIFEST).exists())


def read_manifest(path: str | Path, *, verify_hashes: bool = True) -> Manifest:
    """Read and verify a split: every file present with the recorded size (and sha256)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise BadInput(f"{path}: no such manifest; pass the folder written by 'qvl-surgery split'")
    try:
        doc = json.loads(path.read_text())
        parts = doc["parts"]
        assert isinstance(parts, list) and parts
        for p in parts:
            p["path"], p["data"], p["inputs"], p["outputs"]
    except (ValueError, KeyError, TypeError, AssertionError):
        raise BadInput(f"{path}: not a qvl-surgery split manifest (needs a non-empty 'parts' list)") from None
    m = Manifest(path, doc)
    for p in parts:
        for key in ("path", "data"):
            rel = Path(p[key])
            if rel.is_absolute() or ".." in rel.parts:
                raise BadInput(f"{path}: part file {p[key]!r} leaves the split's folder; refusing it")
        f = m.dir / p["data"]
        if not (m.dir / p["path"]).is_file() or not f.is_file():
            raise BadInput(f"{path}: {p['path']} or its data file is missing; the split is incomplete")
        if "data_bytes" in p and f.stat().st_size != p["data_bytes"]:
            raise BadInput(f"{f}: {f.stat().st_size} bytes, the manifest says {p['data_bytes']}; "
                           "the split is damaged or mixed with another one")
    if verify_hashes:
        verify_files(hash_checks(m))
    for a, b in zip(parts, parts[1:]):
        if [o["name"] for o in a["outputs"]] != [i["name"] for i in b["inputs"]]:
            raise BadInput(f"{path}: {a['path']} outputs {[o['name'] for o in a['outputs']]} but {b['path']} "
                           f"takes {[i['name'] for i in b['inputs']]}; the chain is broken")
    return m
