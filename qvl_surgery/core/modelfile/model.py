"""The weightless model and its tensor sources.

A :class:`Model` is the graph proto (read with ``load_external_data=False``) plus, for every
initializer whose bytes are not inline, a *source*: a :class:`FileRange` (file, offset, length,
checked against the file when loaded) or a :class:`Computed` tensor (a function run while writing,
e.g. a dtype conversion or random init). Here too: tensor sizes and dtypes, and ONNX's packed
4-bit storage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qvl_surgery.core.errors import BadInput

PROTOBUF_LIMIT = 2**31 - 1   # no proto serialized here may be larger


@dataclass(frozen=True)
class FileRange:
    """Raw little-endian bytes of a tensor, in its own dtype, inside a file."""

    path: Path
    offset: int
    length: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.length)
        if len(data) != self.length:
            raise BadInput(f"{self.path}: short read at offset {self.offset} (file changed while in use?)")
        return data


@dataclass(frozen=True)
class Computed:
    """A tensor made while writing (conversion, random init); ``make`` returns its array."""

    make: Callable[[], np.ndarray]
    nbytes: int


TensorSource = FileRange | Computed


@dataclass
class Model:
    proto: onnx.ModelProto
    sources: dict[str, TensorSource] = field(default_factory=dict)
    path: Path | None = None

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    def copy(self) -> "Model":
        """A deep copy of the (weightless) graph; sources are shared, they are immutable."""
        p = onnx.ModelProto()
        p.CopyFrom(self.proto)
        return Model(p, dict(self.sources), self.path)

    def metadata(self) -> dict[str, str]:
        return {p.key: p.value for p in self.proto.metadata_props}

    def set_metadata(self, key: str, value: str) -> None:
        for p in self.proto.metadata_props:
            if p.key == key:
                p.value = value
                return
        self.proto.metadata_props.add(key=key, value=value)

    def initializers(self) -> dict[str, TensorProto]:
        return {t.name: t for t in self.graph.initializer}

    def tensor_nbytes(self, t: TensorProto) -> int:
        if t.name in self.sources:
            src = self.sources[t.name]
            return src.length if isinstance(src, FileRange) else src.nbytes
        return tensor_nbytes(t)

    def weight_bytes(self) -> int:
        return sum(self.tensor_nbytes(t) for t in self.graph.initializer)

    def data_files(self) -> set[Path]:
        return {s.path for s in self.sources.values() if isinstance(s, FileRange)}

    def read_array(self, name: str) -> np.ndarray:
        """One initializer as numpy (reads just that tensor's bytes)."""
        t = self.initializers()[name]
        return read_initializer(t, self.sources.get(name))


def dtype_of(t: TensorProto) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))


FOUR_BIT = {TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1}


def tensor_nbytes(t: TensorProto) -> int:
    """Bytes of the tensor's data as ONNX stores it (4-bit types: two values a byte)."""
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    if t.data_type in FOUR_BIT:
        return (n + 1) // 2
    return n * dtype_of(t).itemsize


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """4-bit values (any integer dtype, or ml_dtypes' int4/uint4) -> ONNX's raw bytes: consecutive
    elements (row-major) two to a byte, the first in the low nibble; an odd count leaves the last
    high nibble 0."""
    v = np.asarray(values).reshape(-1)
    if v.dtype.itemsize == 1 and v.dtype.kind not in "iu":   # ml_dtypes int4 / uint4: one value a byte
        v = v.view(np.uint8)
    flat = (v.astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(raw: bytes | np.ndarray, t: TensorProto) -> np.ndarray:
    """ONNX's packed 4-bit bytes -> the tensor's values (ml_dtypes int4 / uint4), in its shape."""
    b = np.frombuffer(raw, np.uint8) if not isinstance(raw, np.ndarray) else raw.view(np.uint8).reshape(-1)
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    codes = np.empty(b.size * 2, np.uint8)
    codes[0::2], codes[1::2] = b & 0xF, b >> 4
    codes = codes[:n]
    if t.data_type == TensorProto.INT4:
        codes = np.where(codes >= 8, codes.astype(np.int16) - 16, codes).astype(np.int8)
    return codes.astype(dtype_of(t)).reshape(tuple(t.dims))


def read_initializer(t: TensorProto, src: TensorSource | None) -> np.ndarray:
    shape = tuple(t.dims)
    if src is None:
        return numpy_helper.to_array(t)
    if isinstance(src, Computed):
        return np.asarray(src.make()).reshape(shape)
    if t.data_type in FOUR_BIT:
        return unpack_nibbles(src.read(), t)
    return np.frombuffer(src.read(), dtype=dtype_of(t)).reshape(shape)
