"""The values passes take and give, and the one way to read and write them.

A value is a :class:`~qvl_surgery.core.modelfile.Model` (``name.onnx`` + ``name.onnx.data``, or one
self-contained ``.onnx``) or a :class:`Split` (``DIR/partK.onnx`` + ``.data`` and
``DIR/manifest.json``). :func:`read_value` and :func:`write_value` are what the CLI, ``run``,
``package`` and the Python API use; the path-level conveniences of the passes are one-liners
over them. Writing is atomic (a temporary sibling renamed at the end) and never touches an
input.
"""
from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

from qvl_surgery.core.buckets import BUCKETS, Buckets, is_bucket_dir, load_buckets, write_buckets
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.graphinfo import describe_value, value_types
from qvl_surgery.core.manifest import MANIFEST, Manifest, file_hash_record, hash_checks, is_manifest_path, read_manifest, \
    verify_files, write_manifest
from qvl_surgery.core.modelfile import Model, check_model_path, load_model, save_model, write_parts
from qvl_surgery.core.publish import check_new_dir, check_new_output, publish_dir, staging

log = logging.getLogger(__name__)


@dataclass
class Part:
    model: Model
    inputs: list[str]
    outputs: list[str]


@dataclass
class Split:
    """A split as a value: the parts in chain order (weightless Models whose weights are still
    references) and the cuts. :func:`write_value` writes it (parts + manifest.json); merge takes it."""

    parts: list[Part]
    cuts: list[str]
    source: str | None = None
    candidates: int = 0
    manifest: Manifest | None = None    # where it was read from, when it was
    inputs: list[str] = field(default_factory=list)   # the chain's inputs (the source model's)


Value = Union[Model, Split, Buckets]


# ----------------------------------------------------------------------------- reading

@dataclass
class Loaded:
    """A value read from ``path``, the files it was read from (never to be overwritten), and the
    integrity check of a split, running in the background while the value is used (``verify()``
    waits for it and raises on a mismatch; ``cancel()`` drops it)."""

    value: Value
    path: Path
    files: list[Path]
    verify: Callable[[], None] = lambda: None
    cancel: Callable[[], None] = lambda: None

    @property
    def metadata(self) -> dict[str, str]:
        """The model's metadata, or a split's first part's, or a bucket folder's first size's."""
        if isinstance(self.value, Buckets):
            return next(iter(self.value.models.values())).metadata()
        head = self.value.parts[0].model if isinstance(self.value, Split) else self.value
        return head.metadata()

    @contextlib.contextmanager
    def checked(self) -> Iterator["Loaded"]:
        """Use the value while its hashes are checked: a refusal (BadInput) from the work is preceded
        by the hash check, so a damaged input is reported as damaged, not as whatever it broke; on
        any failure the check is dropped."""
        try:
            yield self
        except BadInput:
            self.verify()   # raises the hash mismatch if there is one
            raise
        except BaseException:
            self.cancel()
            raise


def load_split(split_dir: str | Path, *, verify_hashes: bool = True) -> Split:
    """A split read back as a value (sizes, chain and, with ``verify_hashes``, the hashes
    checked); the parts' weights stay on disk."""
    m = read_manifest(split_dir, verify_hashes=verify_hashes)
    parts = [Part(load_model(path), [i["name"] for i in p["inputs"]], [o["name"] for o in p["outputs"]])
             for p, path in zip(m.parts, m.part_paths())]
    chain_inputs = m.doc.get("inputs") or [i["name"] for i in m.parts[0]["inputs"]]
    return Split(parts, list(m.doc.get("cuts", [])), m.doc.get("source"), manifest=m, inputs=list(chain_inputs))


def read_value(path: str | Path, kind: str | None = None) -> Loaded:
    """A model file or a split folder (or its manifest.json) as a value. ``kind`` ("model" or
    "split") is what the caller takes: the other one is refused in one line that says what to do.
    A split's sizes and chain are checked now, its hashes in the background (:class:`Loaded`)."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or folder")
    if is_manifest_path(path):
        if kind == "model":
            raise BadInput(f"{path}: is a split (parts + {MANIFEST}); this command takes one model: merge it "
                           f"first (qvl-surgery merge {path} -o merged.onnx)")
        value = load_split(path, verify_hashes=False)
        pool = ThreadPoolExecutor(max_workers=1)
        future = pool.submit(verify_files, hash_checks(value.manifest))
        pool.shutdown(wait=False)
        files = [value.manifest.path] + [p for mp in value.manifest.part_paths()
                                         for p in (mp, mp.with_name(mp.name + ".data"))]
        return Loaded(value, path, files, verify=future.result, cancel=future.cancel)
    if is_bucket_dir(path):
        if kind == "split":
            raise BadInput(f"{path}: is a bucket folder (one model per image size); this command takes a split")
        value = load_buckets(path)
        folder = path.parent if path.name == BUCKETS else path
        files = [folder / BUCKETS] + sorted({f for m in value.models.values() for f in [m.path, *m.data_files()]})
        return Loaded(value, path, files)
    if path.is_dir():
        raise BadInput(f"{path}: is a folder without {MANIFEST}; pass a model file (.onnx) or a folder written "
                       "by split")
    if kind == "split":
        raise BadInput(f"{path}: is one model; this command takes a split folder (written by qvl-surgery split)")
    model = load_model(path)
    return Loaded(model, path, [path] + sorted(model.data_files()))


# ----------------------------------------------------------------------------- writing

def split_dir_of(out: str | Path) -> Path:
    """The folder a split is written to: ``out``, or its parent when ``out`` names manifest.json."""
    out = Path(out)
    return out.parent if out.name == MANIFEST else out


def check_output(kind: str, out: str | Path, *, overwrite: bool = False, inputs: Iterable[Path] = (),
                 single_file: bool = False) -> None:
    """What writing ``kind`` to ``out`` would refuse, checked before any work is done."""
    if kind == "model":
        check_new_output(Path(out), inputs=inputs, overwrite=overwrite)
        return
    if kind == "buckets":
        if single_file:
            raise BadInput("{single_file}: a bucket folder shares one data file between its sizes; drop it",
                           single_file=True)
        check_new_dir(Path(out), overwrite=overwrite, inputs=inputs, own_files=(BUCKETS,))
        return
    if single_file:
        raise BadInput("{single_file}: a split writes each part with its .onnx.data file; drop it, or merge "
                       "the parts and write the merged model with it", single_file=True)
    check_new_dir(split_dir_of(out), overwrite=overwrite, inputs=inputs, own_files=(MANIFEST,))


def save_split(value: Split, out_dir: str | Path, *, overwrite: bool = False, progress: bool = False,
               before_publish: Callable[[], None] | None = None, inputs: Iterable[Path] = (),
               single_file: bool = False) -> list[dict]:
    """Write ``partK.onnx`` + ``partK.onnx.data`` and ``manifest.json`` into ``out_dir`` atomically
    (a temporary sibling folder renamed at the end); returns the manifest's part entries."""
    out_dir = split_dir_of(out_dir)
    check_output("split", out_dir, overwrite=overwrite, inputs=inputs, single_file=single_file)
    with staging(out_dir) as tmp:
        names = [f"part{k}.onnx" for k in range(len(value.parts))]
        # the parts are copied all at once, each hashed (xxh3_128) by its own thread while copied
        records = write_parts([part.model for part in value.parts], tmp, names, progress=progress)
        entries = []
        for name, part, record in zip(names, value.parts, records):
            check_model_path(tmp / name)
            types = value_types(part.model, set(part.inputs) | set(part.outputs))
            entries.append({"path": name, "data": name + ".data",
                            "inputs": [describe_value(types[i]) for i in part.inputs],
                            "outputs": [describe_value(types[o]) for o in part.outputs],
                            "nodes": len(part.model.graph.node),
                            "data_bytes": (tmp / (name + ".data")).stat().st_size,
                            "data_hash": record,
                            "onnx_hash": file_hash_record(tmp / name)})
        write_manifest(tmp, entries, source=value.source, cuts=value.cuts, inputs=value.inputs or None)
        if before_publish is not None:
            before_publish()
        publish_dir(tmp, out_dir, "split")
    return entries


def write_value(value: Value, out: str | Path, *, overwrite: bool = False, progress: bool = False,
                single_file: bool = False, inputs: Iterable[Path] = (),
                before_publish: Callable[[], None] | None = None) -> list[str]:
    """Write a model (``out`` + ``out.data``, or one file with ``single_file``) or a split (the
    folder ``out``); returns the lines that say what was written. ``inputs``: files that must not
    be overwritten; ``before_publish`` runs after writing and checking, before the rename."""
    inputs = list(inputs)
    if isinstance(value, Buckets):
        out = Path(out)
        check_output("buckets", out, overwrite=overwrite, inputs=inputs, single_file=single_file)
        with staging(out) as tmp:
            lines = write_buckets(value, tmp, progress=progress)
            if before_publish is not None:
                before_publish()
            publish_dir(tmp, out, "buckets")
        return [line.replace("wrote ", f"wrote {out}: ", 1) for line in lines]
    if isinstance(value, Split):
        out_dir = split_dir_of(out)
        entries = save_split(value, out_dir, overwrite=overwrite, progress=progress, before_publish=before_publish,
                             inputs=inputs, single_file=single_file)
        return [f"wrote {out_dir}/{MANIFEST} and {len(entries)} parts"]
    out = Path(out)
    save_model(value, out, progress="write" if progress else None, overwrite=overwrite, inputs=inputs,
               before_publish=before_publish, single_file=single_file)
    return [f"wrote {out}" + ("" if single_file else f" ({out.name}.data beside it)")]
