"""Writing a model as ``name.onnx`` + ``name.onnx.data`` (external data).

:class:`_DataLayout` decides where every weight goes from sizes alone, before any byte moves;
:class:`_DataWriter` then streams the data file (file ranges copied in the kernel, computed bytes
written from memory), optionally hashing it on the way (:class:`StreamDigest`). What is serialized
(the graph) carries no weight bytes and is refused above protobuf's 2 GB limit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.modelfile.hashing import StreamDigest
from qvl_surgery.core.modelfile.model import PROTOBUF_LIMIT, FileRange, Model, TensorSource
from qvl_surgery.core.modelfile.streaming import _payloads, _progress_bar, _tensor_bytes, copy_range, preallocate

# Tensors at least this large go to the data file; smaller ones stay inline in the .onnx.
INLINE_MAX_BYTES = 1024
ALIGN = 64
_PAGE = 4096
_COPY_PIECE = 256 << 20  # a gathered copy runs in pieces this long: the progress bar and the hash keep up
_CONGRUENT_MIN = 1 << 20  # gathered copies this long start where the kernel copies them fastest:
_COPY_ALIGN = 64 << 10    # at their source's offset within a page, in the first page of a 64 KB block


@dataclass
class _Copy:
    """One kernel copy into the data file: consecutive ranges of one source file."""

    path: Path
    src: int
    length: int
    dst: int = 0
    last: str = ""      # the tensor after which it runs (its last one)


@dataclass
class _DataLayout:
    """Where write_model_files puts every weight, decided from sizes before any byte moves.

    Weights are 64-byte aligned. Consecutive file ranges of one source file (as a split's part or
    a merge takes them: apart by no more than alignment padding) are gathered into one copy, the
    padding copied along. A gathered copy of at least ``_CONGRUENT_MIN`` bytes starts at its
    source's offset within a page, in the first page of a 64 KB block (under 64 KB of padding
    each), where the kernel copies it fastest (probably: it copies through 64 KB pipe chunks, and
    new page-cache folios follow their alignment)."""

    offsets: dict[str, int]
    copies: dict[str, _Copy]   # by the name of the tensor that ends each copy
    size: int

    @staticmethod
    def plan(model: Model, tensors: list[TensorProto]) -> "_DataLayout":
        items: list = []   # _Copy, or (tensor name, nbytes) for bytes written from memory
        members: dict[int, list[tuple[str, int]]] = {}  # id(copy) -> [(tensor, offset in the source)]
        for t in tensors:
            src, nbytes = model.sources.get(t.name), model.tensor_nbytes(t)
            if not _goes_to_data_file(t, src, nbytes):
                continue
            if not isinstance(src, FileRange):
                items.append((t.name, nbytes))
                continue
            run = items[-1] if items and isinstance(items[-1], _Copy) else None
            gap = src.offset - (run.src + run.length) if run is not None else -1
            if run is not None and run.path == src.path and 0 <= gap < ALIGN and src.offset % ALIGN == 0:
                run.length += gap + src.length
                run.last = t.name
            else:
                run = _Copy(src.path, src.offset, src.length, last=t.name)
                items.append(run)
                members[id(run)] = []
            members[id(run)].append((t.name, src.offset))
        offsets, copies, end = {}, {}, 0
        for item in items:
            if isinstance(item, _Copy):
                if item.length >= _CONGRUENT_MIN and item.src % ALIGN == 0:
                    item.dst = end + (item.src % _PAGE - end) % _COPY_ALIGN
                else:
                    item.dst = (end + ALIGN - 1) // ALIGN * ALIGN
                for name, src_offset in members[id(item)]:
                    offsets[name] = item.dst + src_offset - item.src
                copies[item.last] = item
                end = item.dst + item.length
            else:
                name, nbytes = item
                offsets[name] = (end + ALIGN - 1) // ALIGN * ALIGN
                end = offsets[name] + nbytes
        return _DataLayout(offsets, copies, end)


class _DataWriter:
    """Writes a data file to its layout: each gathered copy when its last tensor comes, bytes
    from memory at their offsets; the digest sees the file's bytes in order (zeros for gaps)."""

    def __init__(self, path: Path, layout: _DataLayout, digest: StreamDigest | None = None, bar=None):
        self.bar = bar   # progress in bytes of the data file
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        preallocate(self.fd, layout.size)
        self.layout = layout
        self.end = 0     # how far the file is written
        self._src_fds: dict[Path, int] = {}
        self.digest = digest

    def _pad_to(self, start: int) -> None:
        if self.digest is not None and start > self.end:
            self.digest.add("zeros", start - self.end)  # the gap reads back as zeros
        self._advance(start)

    def _advance(self, end: int) -> None:
        if self.bar is not None and end > self.end:
            self.bar.update(end - self.end)
        self.end = end

    def range_done(self, name: str) -> None:
        """A file-range tensor is placed; if it ends a gathered copy, copy it now."""
        c = self.layout.copies.get(name)
        if c is None:
            return
        self._pad_to(c.dst)
        fd = self._src_fds.get(c.path)
        if fd is None:
            fd = self._src_fds[c.path] = os.open(c.path, os.O_RDONLY)
        for done in range(0, c.length, _COPY_PIECE):
            n = min(_COPY_PIECE, c.length - done)
            if self.digest is not None:
                self.digest.add("range", FileRange(c.path, c.src + done, n))
            copy_range(fd, c.src + done, self.fd, c.dst + done, n)
            self._advance(c.dst + done + n)

    def write_bytes(self, name: str, data: bytes | memoryview) -> None:
        start = self.layout.offsets[name]
        self._pad_to(start)
        view = memoryview(data)
        if self.digest is not None:
            self.digest.add("bytes", view)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], start + done)
        self._advance(start + len(view))

    def close(self) -> None:
        for fd in self._src_fds.values():
            os.close(fd)
        os.ftruncate(self.fd, self.layout.size)
        os.close(self.fd)


def _set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(f)
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=k, value=v)


# Index tables (shapes, Split sizes, gather indices, window ids) are int64/int32/bool. int8/uint8,
# int16/uint16 and int4 are what quantized weights are stored as: never tables.
_INDEX_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL}
INLINE_INDEX_MAX_BYTES = 16 << 20


def _goes_to_data_file(t: TensorProto, src: TensorSource | None, nbytes: int) -> bool:
    """Where write_model_files puts a tensor, by role: file ranges and computed tensors (weights:
    converted, quantized, random) go to the data file from 1 KB on whatever their dtype; an inline
    tensor does too, unless it is an index table the graph carries (int64/int32/bool): those stay
    inline up to 16 MB, being graph structure (onnxruntime refuses a Split's sizes read from
    external data; 171 query chunks: 1368 bytes)."""
    if isinstance(src, FileRange):
        return True
    if src is None and t.data_type in _INDEX_TYPES and nbytes <= INLINE_INDEX_MAX_BYTES:
        return False
    return nbytes >= INLINE_MAX_BYTES


def _data_file_tensors(model: Model, tensors: list[TensorProto]):
    """The tensors that go to the data file, with their source, bytes (a computed one) and size;
    the others are made inline in ``tensors`` on the way."""
    for t, src, data in _payloads(model, tensors):
        nbytes = model.tensor_nbytes(t)
        if _goes_to_data_file(t, src, nbytes):
            yield t, src, data, nbytes
        elif src is not None:
            _set_inline(t, data)


def write_model_files(model: Model, out_dir: Path, name: str, *, progress: str | None = None,
                      digest: StreamDigest | None = None) -> Path:
    """Write ``out_dir/name`` + ``out_dir/name.data`` (no checks, no rename). Returns the .onnx path.
    With ``digest``, the data file's hash is computed while it is written."""
    data_name = name + ".data"
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    tensors = list(proto.graph.initializer)
    layout = _DataLayout.plan(model, tensors)
    bar = _progress_bar(layout.size, progress)
    writer = _DataWriter(out_dir / data_name, layout, digest, bar)
    try:
        for t, src, data, nbytes in _data_file_tensors(model, tensors):
            if isinstance(src, FileRange):
                writer.range_done(t.name)
            else:
                if src is None:  # a large inline tensor moves to the data file
                    data = _tensor_bytes(t, None)
                writer.write_bytes(t.name, data)
            del data
            _set_external(t, data_name, layout.offsets[t.name], nbytes)
    finally:
        writer.close()
        if bar:
            bar.close()
    size = proto.ByteSize()
    if size > PROTOBUF_LIMIT:
        raise BadInput(f"{name}: the graph alone is {size} bytes, above protobuf's 2 GB limit")
    out = out_dir / name
    with open(out, "wb") as f:
        f.write(proto.SerializeToString())
    return out


def write_parts(models: list[Model], out_dir: Path, names: list[str], *, progress: bool = False,
                workers: int = 3) -> list[dict[str, str]]:
    """Write several models (a split's parts) as ``out_dir/name`` + ``.data``, up to ``workers``
    at once, and return each data file's hash record ``{algorithm: hexdigest}``, computed while it
    is written (:class:`StreamDigest`). Each part is its own file, so the kernel copies of the
    parts run on all cores at once (writes into one file would take turns on its inode lock)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(k: int) -> dict[str, str]:
        digest = StreamDigest()
        write_model_files(models[k], out_dir, names[k], progress=names[k] if progress else None, digest=digest)
        return digest.record()

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(models)))) as pool:
        return list(pool.map(one, range(len(models))))


def _set_inline(t: TensorProto, data: memoryview) -> None:
    t.ClearField("data_location")
    del t.external_data[:]
    for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(f)
    t.raw_data = data.tobytes()


def write_shared(models: list[Model], out_dir: Path, names: list[str], data_name: str, *,
                 progress: str | None = None) -> int:
    """Write several models (one encoder at several image sizes) as ``out_dir/name`` each, every
    weight in the one data file ``out_dir/data_name``, stored once per distinct content: a tensor
    whose bytes (xxh3_128 and length) are already in the file is referenced where it is, so sizes
    that share their weights share their bytes. Returns the data file's size."""
    import xxhash
    fd = os.open(out_dir / data_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    stored: dict[tuple[bytes, int], int] = {}
    end = 0
    bar = _progress_bar(sum(m.weight_bytes() for m in models), progress)
    try:
        for model, name in zip(models, names):
            proto = onnx.ModelProto()
            proto.CopyFrom(model.proto)
            tensors = list(proto.graph.initializer)
            for t, src, data, nbytes in _data_file_tensors(model, tensors):
                if data is None:
                    data = src.read() if isinstance(src, FileRange) else _tensor_bytes(t, src)
                view = memoryview(data).cast("B")
                key = (xxhash.xxh3_128_digest(view), nbytes)
                offset = stored.get(key)
                if offset is None:
                    offset = stored[key] = (end + ALIGN - 1) // ALIGN * ALIGN
                    done = 0
                    while done < nbytes:
                        done += os.pwrite(fd, view[done:], offset + done)
                    end = offset + nbytes
                if bar:
                    bar.update(nbytes)
                del view, data
                _set_external(t, data_name, offset, nbytes)
            if proto.ByteSize() > PROTOBUF_LIMIT:
                raise BadInput(f"{name}: the graph alone is above protobuf's 2 GB limit")
            with open(out_dir / name, "wb") as f:
                f.write(proto.SerializeToString())
    finally:
        os.close(fd)
        if bar:
            bar.close()
    return end
