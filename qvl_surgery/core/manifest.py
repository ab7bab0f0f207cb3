"""DIR/manifest.json of a split: the parts in chain order, their I/O and their files' sizes and hashes.

Each part records ``data_bytes`` and, per file, ``data_hash`` / ``onnx_hash`` as
``{algorithm: hexdigest}`` (``xxh3_128`` for new splits). Manifests written before that carry
``data_sha256`` / ``onnx_sha256``; both forms are read and verified."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qvl_surgery import __version__
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.modelfile import HASH, HASH_ALGORITHMS, hash_file

MANIFEST = "manifest.json"


def write_manifest(out_dir: Path, parts: list[dict], *, source: str | None, cuts: list[str],
                   inputs: list[str] | None = None) -> Path:
    """``inputs``: the chain's inputs (the source model's), which a later part may take even where
    part 0 does not (a host-inputs export's reverse_index is first read after the blocks)."""
    doc = {"format": "qvl-surgery split", "version": __version__, "source": source, "cuts": cuts,
           "inputs": inputs, "parts": parts}
    path = out_dir / MANIFEST
    path.write_text(json.dumps(doc, indent=1))
    return path


def verify_files(checks: list[tuple[Path, str, str]]) -> None:
    """Raise BadInput unless every (file, algorithm, hexdigest) matches. sha256 runs at about
    1 GB/s, so two files hash at once (the hashes free the GIL); xxh3_128 runs at memory speed
    and one thread leaves the other core to the copy that merge runs beside it."""
    workers = 2 if any(algo == "sha256" for _, algo, _ in checks) else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (f, algo, want), got in zip(checks, pool.map(lambda c: hash_file(c[0], c[1]), checks)):
            if got != want:
                raise BadInput(f"{f}: {algo} does not match the manifest; the split is damaged "
                               "or mixed with another one")


def _file_hashes(manifest_path: Path, part: dict, kind: str) -> list[tuple[str, str]]:
    """(algorithm, hexdigest) recorded for a part's ``data`` or ``onnx`` file that this version can
    check, new form or old. A file whose only hashes are of unknown algorithms is refused."""
    record = part.get(f"{kind}_hash", {})
    if not isinstance(record, dict):
        raise BadInput(f"{manifest_path}: {part['path']}: {kind}_hash must be {{algorithm: hexdigest}}")
    if f"{kind}_sha256" in part:
        record = {**record, "sha256": part[f"{kind}_sha256"]}
    known = [(algo, str(value)) for algo, value in record.items() if algo in HASH_ALGORITHMS]
    if record and not known:
        raise BadInput(f"{manifest_path}: {part['path']} records only {', '.join(map(repr, record))} hashes, which "
                       f"this version cannot check (known: {', '.join(HASH_ALGORITHMS)}); update qvl-surgery")
    return known


def hash_checks(m: "Manifest") -> list[tuple[Path, str, str]]:
    """Every (file, algorithm, hexdigest) a manifest records; one per file (the fastest recorded)."""
    checks = []
    for p in m.parts:
        for kind, key in (("data", "data"), ("onnx", "path")):
            recorded = _file_hashes(m.path, p, kind)
            if recorded:
                checks.append((m.dir / p[key], *min(recorded, key=lambda r: HASH_ALGORITHMS.index(r[0]))))
    return checks


def file_hash_record(path: Path) -> dict[str, str]:
    """``{algorithm: hexdigest}`` of a written file, as a manifest stores it."""
    return {HASH: hash_file(path, HASH)}


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
    """Read and verify a split: every file present with the recorded size (and hash)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise BadInput(f"{path}: no such manifest; pass the folder written by 'qvl-surgery split'")
    not_manifest = BadInput(f"{path}: not a qvl-surgery split manifest (needs a non-empty 'parts' list)")
    try:
        doc = json.loads(path.read_text())
        parts = doc["parts"]
        if not isinstance(parts, list) or not parts:
            raise not_manifest
        for p in parts:
            p["path"], p["data"], p["inputs"], p["outputs"]
    except (ValueError, KeyError, TypeError):
        raise not_manifest from None
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
    # each part takes what the part before gives, plus side inputs of the whole chain (the dynamic
    # export's image_grid_thw, a host-inputs export's grid tensors): chain inputs that the part
    # reads itself, recorded in the manifest (older manifests: anything no part produces)
    chain_inputs = doc.get("inputs")
    produced = {o["name"] for p in parts for o in p["outputs"]}
    for a, b in zip(parts, parts[1:]):
        outs = [o["name"] for o in a["outputs"]]
        takes = [i["name"] for i in b["inputs"]]
        side = takes[len(outs):]
        bad = [t for t in side if (t not in chain_inputs if chain_inputs is not None else t in produced)]
        if takes[:len(outs)] != outs or bad:
            raise BadInput(f"{path}: {a['path']} outputs {outs} but {b['path']} takes {takes}; the chain is broken")
    return m
