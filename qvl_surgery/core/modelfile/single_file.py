"""Writing a model as one self-contained .onnx, every weight inline as raw_data.

protobuf's wire format is written by hand so that the weights never have to be in one message in
memory: a length-delimited field is tag, varint length, bytes, and every length here is known from
sizes before any weight byte is read. Field numbers from onnx.proto: ModelProto.graph = 7,
GraphProto.initializer = 5, TensorProto.raw_data = 9. Fields are put in field-number order, as
protobuf itself serializes, so the file is byte for byte what onnx.save would write for the same
model held in memory with raw_data. A file above protobuf's 2 GB limit is refused before anything
is written.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.modelfile.model import PROTOBUF_LIMIT, FileRange, Model
from qvl_surgery.core.modelfile.streaming import _payloads, _progress_bar, copy_range, preallocate

_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_WIRE_LEN = 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited field; its ``length`` bytes follow."""
    return _varint(number << 3 | _WIRE_LEN) + _varint(length)


def _around(msg, number: int) -> tuple[bytes, bytes]:
    """``msg`` serialized in two pieces: its fields numbered below ``number``, and above it."""
    head, tail = type(msg)(), type(msg)()
    head.CopyFrom(msg)
    tail.CopyFrom(msg)
    for fd, _ in msg.ListFields():
        if fd.number >= number:
            head.ClearField(fd.name)
        if fd.number <= number:
            tail.ClearField(fd.name)
    return head.SerializeToString(), tail.SerializeToString()


@dataclass
class _InlineTensor:
    """One initializer of the single file: ``head`` + raw_data field + ``tail`` (or ``whole``)."""

    tensor: TensorProto
    nbytes: int                 # raw_data length; 0 where the tensor is kept as it is (``whole``)
    head: bytes = b""
    tail: bytes = b""
    whole: bytes | None = None

    def message_len(self) -> int:
        if self.whole is not None:
            return len(self.whole)
        return len(self.head) + len(_len_field(_TENSOR_RAW_DATA, self.nbytes)) + self.nbytes + len(self.tail)

    def field_len(self) -> int:
        n = self.message_len()
        return len(_len_field(_GRAPH_INITIALIZER, n)) + n


@dataclass
class _SingleFileLayout:
    model_head: bytes
    model_tail: bytes
    graph_head: bytes
    graph_tail: bytes
    tensors: list[_InlineTensor]

    def graph_len(self) -> int:
        return len(self.graph_head) + sum(t.field_len() for t in self.tensors) + len(self.graph_tail)

    def size(self) -> int:
        n = self.graph_len()
        return len(self.model_head) + len(_len_field(_MODEL_GRAPH, n)) + n + len(self.model_tail)


def _single_file_layout(model: Model) -> _SingleFileLayout:
    """The pieces and sizes of the single file, from the weightless graph and the sources' sizes."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    tensors = []
    for t in graph.initializer:
        src = model.sources.get(t.name)
        if src is None:
            if t.data_location == TensorProto.EXTERNAL:
                raise ValueError(f"tensor {t.name!r} is external but has no source")
            tensors.append(_InlineTensor(t, 0, whole=t.SerializeToString()))
            continue
        bare = TensorProto()
        bare.CopyFrom(t)
        for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data",
                  "external_data", "data_location"):
            bare.ClearField(f)
        head, tail = _around(bare, _TENSOR_RAW_DATA)
        tensors.append(_InlineTensor(t, model.tensor_nbytes(t), head, tail))
    bare_graph = onnx.GraphProto()
    bare_graph.CopyFrom(graph)
    bare_graph.ClearField("initializer")
    graph_head, graph_tail = _around(bare_graph, _GRAPH_INITIALIZER)
    proto.ClearField("graph")
    model_head, model_tail = _around(proto, _MODEL_GRAPH)
    return _SingleFileLayout(model_head, model_tail, graph_head, graph_tail, tensors)


def single_file_size(model: Model) -> int:
    """Bytes of ``model`` written as one self-contained .onnx (weights inline), from sizes alone."""
    return _single_file_layout(model).size()


def refuse_over_limit(size: int, out: str | Path, data_name: str) -> None:
    """BadInput, before anything is written, where one file of ``size`` bytes would pass protobuf's
    2 GB limit; it names ``data_name``, where the weights go without ``single_file``."""
    if size > PROTOBUF_LIMIT:
        raise BadInput(f"{out}: {size / 1e9:.2f} GB as one file, above protobuf's 2 GB limit; drop "
                       "{single_file} to write the weights to " + f"{data_name}", single_file=True)


class _FileWriter:
    """Sequential writes: small pieces gathered in a buffer, weight bytes copied straight in."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.offset = 0
        self._buf = bytearray()
        self._src_fds: dict[Path, int] = {}

    def small(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        self._pwrite(memoryview(self._buf))
        self._buf = bytearray()

    def _pwrite(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.offset + done)
        self.offset += len(view)

    def big(self, data: memoryview) -> None:
        self.flush()
        self._pwrite(memoryview(data).cast("B"))

    def copy(self, src: FileRange) -> None:
        self.flush()
        fd = self._src_fds.get(src.path)
        if fd is None:
            fd = self._src_fds[src.path] = os.open(src.path, os.O_RDONLY)
        copy_range(fd, src.offset, self.fd, self.offset, src.length)
        self.offset += src.length

    def close(self) -> None:
        for fd in self._src_fds.values():
            os.close(fd)
        os.close(self.fd)


def write_single_file(model: Model, out_dir: Path, name: str, *, progress: str | None = None) -> Path:
    """Write ``out_dir/name``: one self-contained .onnx, every weight inline as raw_data, streamed
    tensor by tensor (no checks, no rename; :func:`save_model` with ``single_file=True`` does those).
    Peak memory is about the largest computed tensor, as for :func:`write_model_files`."""
    layout = _single_file_layout(model)
    size = layout.size()
    refuse_over_limit(size, name, f"{name}.data")
    out = out_dir / name
    w = _FileWriter(out)
    preallocate(w.fd, size)
    bar = _progress_bar(sum(t.nbytes for t in layout.tensors), progress)
    try:
        w.small(layout.model_head)
        w.small(_len_field(_MODEL_GRAPH, layout.graph_len()))
        w.small(layout.graph_head)
        for it, (t, src, data) in zip(layout.tensors, _payloads(model, [t.tensor for t in layout.tensors])):
            w.small(_len_field(_GRAPH_INITIALIZER, it.message_len()))
            if it.whole is not None:
                w.small(it.whole)
                continue
            w.small(it.head)
            w.small(_len_field(_TENSOR_RAW_DATA, it.nbytes))
            if isinstance(src, FileRange):
                w.copy(src)
            else:
                w.big(data)
            del data
            w.small(it.tail)
            if bar:
                bar.update(it.nbytes)
        w.small(layout.graph_tail)
        w.small(layout.model_tail)
        w.flush()
    finally:
        w.close()
        if bar:
            bar.close()
    if w.offset != size:
        raise RuntimeError(f"{name}: wrote {w.offset} bytes, the layout said {size}")
    return out
