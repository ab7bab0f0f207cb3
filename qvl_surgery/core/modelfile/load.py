"""Opening a model file without reading its weights.

:func:`load_model` turns every external weight into a :class:`FileRange`. External-data locations
are untrusted: absolute paths, ``..`` and symlinks that leave the model's folder are refused, and
offset + length must lie inside the data file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import onnx
from onnx import TensorProto

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.modelfile.model import FileRange, Model, TensorSource, tensor_nbytes


def _check_location(model_dir: Path, location: str, tensor: str, model_path: Path) -> Path:
    if not location or os.path.isabs(location) or Path(location).drive:
        raise BadInput(f"{model_path}: tensor {tensor!r} has external data location {location!r} that is absolute; "
                       "only paths inside the model's folder are accepted")
    parts = Path(location).parts
    if ".." in parts:
        raise BadInput(f"{model_path}: tensor {tensor!r} has external data location {location!r} that leaves "
                       "the model's folder; refusing it")
    full = model_dir / location
    real_dir = model_dir.resolve()
    real = full.resolve()
    if real_dir not in real.parents:
        raise BadInput(f"{model_path}: external data {location!r} of tensor {tensor!r} resolves outside the "
                       f"model's folder ({real}); refusing it")
    if not full.is_file():
        raise BadInput(f"{model_path}: external data file {location!r} of tensor {tensor!r} is missing; "
                       "keep name.onnx and name.onnx.data side by side")
    return real


def load_model(path: str | os.PathLike) -> Model:
    """Open a model's graph without reading its weights; every external weight becomes a FileRange."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    folder = path if path.is_dir() else path.parent if path.name in ("manifest.json", "buckets.json") else None
    if folder is not None:
        if (folder / "manifest.json").is_file():
            parts = sorted(p.name for p in folder.glob("part*.onnx"))
            one = f"{folder / parts[0]}" if parts else f"{folder}/partK.onnx"
            raise BadInput(f"{path}: is a split; this command takes one model: pass one part ({one}) "
                           f"or merge the split first (qvl-surgery merge {folder} -o merged.onnx)")
        if (folder / "buckets.json").is_file():
            raise BadInput(f"{path}: is a bucket folder (one graph per image size); this command takes one model: "
                           f"pass one size's file ({folder}/HxW.onnx, listed in buckets.json)")
        if path.is_dir():
            raise BadInput(f"{path}: is a directory; pass an .onnx file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, onnx raises others
        raise BadInput(f"{path}: not an ONNX model ({type(e).__name__}: {str(e)[:120]})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise BadInput(f"{path}: not an ONNX model (no graph)")
    model_dir = path.parent
    sources: dict[str, TensorSource] = {}
    sizes: dict[Path, int] = {}
    located: dict[str, Path] = {}  # every tensor of a model usually names the same file: resolve it once
    for t in proto.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        data_path = located.get(location)
        if data_path is None:
            data_path = located[location] = _check_location(model_dir, location, t.name, path)
        offset = int(info.get("offset", 0) or 0)
        want = tensor_nbytes(t)
        length = int(info["length"]) if info.get("length") else want
        if length != want:
            raise BadInput(f"{path}: tensor {t.name!r} declares {length} bytes of external data but its shape "
                           f"and dtype need {want}")
        size = sizes.setdefault(data_path, data_path.stat().st_size)
        if offset < 0 or offset + length > size:
            raise BadInput(f"{path}: external data of tensor {t.name!r} ({data_path.name}, offset {offset}, "
                           f"length {length}) runs past the end of the file ({size} bytes): the data file is "
                           "short or belongs to another model")
        sources[t.name] = FileRange(data_path, offset, length)
        del t.external_data[:]
    for node in _all_nodes(proto.graph):
        for a in node.attribute:
            if a.HasField("t") and a.t.data_location == TensorProto.EXTERNAL:
                raise BadInput(f"{path}: node {node.name!r} has an external tensor attribute; "
                               "re-save the model with convert_attribute=False")
    return Model(proto, sources, path)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            for g in a.graphs:
                yield from _all_nodes(g)
