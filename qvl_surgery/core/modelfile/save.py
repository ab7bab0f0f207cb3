"""Publishing a model file: checked, then renamed into place, never over an input.

:func:`save_model` writes into a temporary sibling folder, checks the result with ``onnx.checker``
by path, and renames it into place; an input file is never overwritten or appended to.
:func:`sibling_model` puts a weightless variant beside its model for tools that load by path.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

import onnx

from qvl_surgery.core.modelfile.external import _set_external, write_model_files
from qvl_surgery.core.modelfile.model import Model
from qvl_surgery.core.modelfile.single_file import refuse_over_limit, single_file_size, write_single_file
from qvl_surgery.core.publish import check_new_output, staging


def check_single_file(model: Model, out_dir: Path, name: str) -> None:
    """``onnx.checker`` by path on the graph of a single file, without loading its weights: the
    checker reads every weight of a self-contained file into memory, so it checks instead the same
    graph and tensor headers with the weights as external data in a sparse file (no bytes on disk
    or in memory). The single file's framing is checked by its size (:func:`write_single_file`)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    data_name = f".{name}.check.data"
    offset = 0
    for t in proto.graph.initializer:
        if t.name not in model.sources:
            continue
        n = model.tensor_nbytes(t)
        _set_external(t, data_name, offset, n)
        offset += n
    skeleton = out_dir / f".{name}.check.onnx"
    try:
        with open(out_dir / data_name, "wb") as f:
            f.truncate(offset)
        with open(skeleton, "wb") as f:
            f.write(proto.SerializeToString())
        check_model_path(skeleton)
    finally:
        skeleton.unlink(missing_ok=True)
        (out_dir / data_name).unlink(missing_ok=True)


def check_model_path(path: Path) -> None:
    """onnx.checker by path: the judge of every file this toolkit writes."""
    onnx.checker.check_model(str(path))


def save_model(model: Model, out: str | os.PathLike, *, check: bool = True, progress: str | None = None,
               inputs: Iterable[Path] = (), overwrite: bool = False,
               before_publish: Callable[[], None] | None = None, single_file: bool = False) -> Path:
    """Write ``out`` and ``out.data`` atomically; never overwrite an input or its data.

    An existing output is replaced only with ``overwrite=True`` (the CLI's ``--force``).
    ``before_publish`` runs after writing and checking, before the rename: if it raises,
    nothing is published (merge verifies its inputs' hashes there, while the copy ran).

    ``single_file=True`` writes ``out`` alone, every weight inline (:func:`write_single_file`),
    streamed so that peak memory stays about the largest tensor; a model of more than protobuf's
    2 GB is refused (BadInput) before anything is written. The check runs on the same graph with
    its weights left out (:func:`check_single_file`). Replacing an output (``overwrite``) also
    removes an ``out.data`` left by an earlier external-data write.
    """
    out = Path(out)
    guard = list(inputs) + ([model.path] if model.path else []) + sorted(model.data_files())
    check_new_output(out, inputs=guard, overwrite=overwrite)
    data = out.with_name(out.name + ".data")
    if single_file:
        refuse_over_limit(single_file_size(model), out, data.name)
    with staging(out) as tmp:
        if single_file:
            written = write_single_file(model, tmp, out.name, progress=progress)
            if check:
                check_single_file(model, tmp, out.name)
        else:
            written = write_model_files(model, tmp, out.name, progress=progress)
            if check:
                check_model_path(written)
        if before_publish is not None:
            before_publish()
        # Data first, model last: until the .onnx appears nothing looks like a finished model.
        if out.exists():
            out.unlink()
        if single_file:
            os.replace(written, out)
            data.unlink(missing_ok=True)  # an earlier external-data output's weights, replaced
        else:
            os.replace(tmp / (out.name + ".data"), data)
            os.replace(written, out)
    return out


@contextlib.contextmanager
def sibling_model(model_path: Path, proto: onnx.ModelProto) -> Iterator[Path]:
    """A weightless variant of a model as a hidden temporary .onnx beside it, so that its
    relative external-data locations still resolve to the model's own data file. Removed on exit:
    use it only to hand a path to a tool that loads the model at once (onnxruntime, onnxsim)."""
    model_path = Path(model_path)
    tmp = model_path.with_name(f".{model_path.stem}.qvl-{os.getpid()}-{uuid.uuid4().hex[:8]}.onnx")
    try:
        onnx.save(proto, str(tmp))
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
