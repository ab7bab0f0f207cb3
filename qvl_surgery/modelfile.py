"""Model files whose weights stay on disk.

A :class:`Model` is the graph proto (read with ``load_external_data=False``) plus, for every
initializer whose bytes are not inline, a *source*: a :class:`FileRange` (file, offset, length,
checked against the file) or a :class:`Computed` tensor (a function run while writing, e.g. a
dtype conversion or random init). Weight bytes are only touched by :func:`save_model`, which
streams them tensor by tensor into ``name.onnx.data``; peak memory is about the largest tensor.

Rules (DESIGN.md, principles 1-4):
- never serialize a > 2 GB proto: what is serialized here carries no external weight bytes;
- outputs are written into a temporary sibling folder, checked with ``onnx.checker`` by path,
  then renamed into place; an input file is never overwritten or appended to;
- external-data locations are untrusted: absolute paths, ``..`` and symlinks that leave the
  model's folder are refused, and offset + length must lie inside the data file.

All code that moves weight bytes lives in this module.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import BadInput

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
# Tensors at least this large go to the data file; smaller ones stay inline in the .onnx.
INLINE_MAX_BYTES = 1024
ALIGN = 64
_COPY_CHUNK = 64 << 20


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


def tensor_nbytes(t: TensorProto) -> int:
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    return n * dtype_of(t).itemsize


def read_initializer(t: TensorProto, src: TensorSource | None) -> np.ndarray:
    shape = tuple(t.dims)
    if src is None:
        return numpy_helper.to_array(t)
    if isinstance(src, Computed):
        return np.asarray(src.make()).reshape(shape)
    return np.frombuffer(src.read(), dtype=dtype_of(t)).reshape(shape)


# ----------------------------------------------------------------------------- loading

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
    if path.is_dir():
        raise BadInput(f"{path}: is a directory; pass an .onnx file (for a split, pass DIR/manifest.json)")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, onnx raises others
        raise BadInput(f"{path}: not an ONNX model ({type(e).__name__}: {str(e)[:120]})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise BadInput(f"{path}: not an ONNX model (no graph)")
    model_dir = path.parent
    sources: dict[str, TensorSource] = {}
    sizes: dict[Path, int] = {}
    for t in proto.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        data_path = _check_location(model_dir, info.get("location", ""), t.name, path)
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


# ----------------------------------------------------------------------------- writing

def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output that would overwrite one of the inputs (model or data file)."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise BadInput(f"{out}: output must end in .onnx (its weights go to {out.name}.data beside it)")
    data = out.with_name(out.name + ".data")
    for p in inputs:
        p = Path(p)
        if out.resolve() == p.resolve() or _same_file(out, p) or data.resolve() == p.resolve() or _same_file(data, p):
            raise BadInput(f"{out}: output would overwrite the input {p}; choose another output path")
    if out.is_dir():
        raise BadInput(f"{out}: is a directory; pass a file name ending in .onnx")


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
    """Copy bytes between files in the kernel where it can (copy_file_range), else in chunks."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < length:
        n = min(length - done, 1 << 30)
        if use_kernel:
            try:
                k = os.copy_file_range(src_fd, dst_fd, n, src_offset + done, dst_offset + done)
            except OSError:
                use_kernel = False
                continue
            if k == 0:
                raise BadInput("data file is shorter than its model says (copy stopped early)")
            done += k
        else:
            chunk = os.pread(src_fd, min(n, _COPY_CHUNK), src_offset + done)
            if not chunk:
                raise BadInput("data file is shorter than its model says (read stopped early)")
            os.pwrite(dst_fd, chunk, dst_offset + done)
            done += len(chunk)


class StreamDigest:
    """sha256 of a data file computed while it is written: a worker thread hashes the same byte
    sequence (alignment zeros, source ranges read through mmap windows, computed bytes) that the
    writer puts in the file, so the hash is ready about when the copy ends instead of after a
    second full read. The queue is bounded, so computed tensors waiting to be hashed stay few."""

    def __init__(self):
        import queue
        import threading
        self._q: "queue.Queue" = queue.Queue(maxsize=4)
        self._h = hashlib.sha256()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is not None:
                continue
            try:
                kind, value = item
                if kind == "zeros":
                    self._h.update(bytes(value))
                elif kind == "bytes":
                    self._h.update(value)
                else:
                    _hash_range(self._h, value.path, value.offset, value.length)
            except BaseException as e:  # surfaced by hexdigest()
                self._error = e

    def add(self, kind: str, value) -> None:
        self._q.put((kind, value))

    def hexdigest(self) -> str:
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._h.hexdigest()


class _DataWriter:
    def __init__(self, path: Path, digest: StreamDigest | None = None):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.offset = 0
        self._src_fds: dict[Path, int] = {}
        self.digest = digest

    def _aligned(self) -> int:
        start = (self.offset + ALIGN - 1) // ALIGN * ALIGN
        if self.digest is not None and start > self.offset:
            self.digest.add("zeros", start - self.offset)  # the gap reads back as zeros
        self.offset = start
        return self.offset

    def write_range(self, src: FileRange) -> int:
        start = self._aligned()
        if self.digest is not None:
            self.digest.add("range", src)
        fd = self._src_fds.get(src.path)
        if fd is None:
            fd = self._src_fds[src.path] = os.open(src.path, os.O_RDONLY)
        copy_range(fd, src.offset, self.fd, start, src.length)
        self.offset = start + src.length
        return start

    def write_bytes(self, data: bytes | memoryview) -> int:
        start = self._aligned()
        view = memoryview(data)
        if self.digest is not None:
            self.digest.add("bytes", view)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], start + done)
        self.offset = start + len(view)
        return start

    def close(self) -> None:
        os.ftruncate(self.fd, self.offset)
        for fd in self._src_fds.values():
            os.close(fd)
        os.close(self.fd)


def _tensor_bytes(t: TensorProto, src: TensorSource | None) -> memoryview:
    """Bytes of a computed or inline tensor, as a view of its array (no extra copy)."""
    if isinstance(src, Computed):
        arr = np.ascontiguousarray(src.make(), dtype=dtype_of(t))
        if arr.size != int(np.prod(t.dims, dtype=np.int64)):
            raise ValueError(f"computed tensor {t.name!r} has {arr.size} values, expected shape {list(t.dims)}")
    else:
        arr = np.ascontiguousarray(numpy_helper.to_array(t))
    return memoryview(arr.reshape(-1)).cast("B")


def _set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(f)
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=k, value=v)


def write_model_files(model: Model, out_dir: Path, name: str, *, progress: str | None = None,
                      digest: StreamDigest | None = None) -> Path:
    """Write ``out_dir/name`` + ``out_dir/name.data`` (no checks, no rename). Returns the .onnx path.
    With ``digest``, the data file's sha256 is computed while it is written."""
    data_name = name + ".data"
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    writer = _DataWriter(out_dir / data_name, digest)
    tensors = list(proto.graph.initializer)
    bar = None
    if progress:
        from tqdm import tqdm
        total = sum(model.tensor_nbytes(t) for t in tensors)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=progress, leave=False, disable=None)  # off without a TTY
    # Computed tensors (conversions, random init) are made by two worker threads a few tensors
    # ahead of the writer (numpy releases the GIL); the lookahead bounds memory to a few tensors.
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(max_workers=2)
    pending: dict[int, object] = {}
    computed = [k for k, t in enumerate(tensors) if isinstance(model.sources.get(t.name), Computed)]
    lookahead = 3

    def schedule(upto: int) -> None:
        while computed and computed[0] <= upto:
            k = computed.pop(0)
            pending[k] = pool.submit(_tensor_bytes, tensors[k], model.sources[tensors[k].name])

    try:
        for k, t in enumerate(tensors):
            schedule(k + lookahead)
            src = model.sources.get(t.name)
            nbytes = model.tensor_nbytes(t)
            if src is None and nbytes < INLINE_MAX_BYTES and t.data_location != TensorProto.EXTERNAL:
                continue
            if src is None and t.data_location == TensorProto.EXTERNAL:
                raise ValueError(f"tensor {t.name!r} is external but has no source")
            if isinstance(src, FileRange):
                off = writer.write_range(src)
                length = src.length
            else:
                data = pending.pop(k).result() if k in pending else _tensor_bytes(t, src)
                if nbytes < INLINE_MAX_BYTES:
                    t.ClearField("data_location")
                    del t.external_data[:]
                    for f in ("float_data", "int32_data", "int64_data", "double_data"):
                        t.ClearField(f)
                    t.raw_data = data.tobytes()
                    continue
                off = writer.write_bytes(data)
                length = data.nbytes
                del data
            _set_external(t, data_name, off, length)
            if bar:
                bar.update(nbytes)
    finally:
        for f in pending.values():
            f.cancel()
        pool.shutdown(wait=True)
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


def check_model_path(path: Path) -> None:
    """onnx.checker by path: the judge of every file this toolkit writes."""
    onnx.checker.check_model(str(path))


def save_model(model: Model, out: str | os.PathLike, *, check: bool = True, progress: str | None = None,
               inputs: Iterable[Path] = (), overwrite: bool = False,
               before_publish: Callable[[], None] | None = None) -> Path:
    """Write ``out`` and ``out.data`` atomically; never overwrite an input or its data.

    An existing output is replaced only with ``overwrite=True`` (the CLI's ``--force``).
    ``before_publish`` runs after writing and checking, before the rename: if it raises,
    nothing is published (merge verifies its inputs' hashes there, while the copy ran).
    """
    out = Path(out)
    guard = list(inputs) + ([model.path] if model.path else []) + sorted(model.data_files())
    check_output_path(out, guard)
    if not overwrite and (out.exists() or out.with_name(out.name + ".data").exists()):
        raise BadInput(f"{out}: already exists; pass --force to replace it or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        written = write_model_files(model, tmp, out.name, progress=progress)
        if check:
            check_model_path(written)
        if before_publish is not None:
            before_publish()
        data = out.with_name(out.name + ".data")
        # Data first, model last: until the .onnx appears nothing looks like a finished model.
        if out.exists():
            out.unlink()
        os.replace(tmp / (out.name + ".data"), data)
        os.replace(written, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- hashing

def _hash_range(h, path: Path, offset: int, length: int, window: int = 64 << 20) -> None:
    """Feed bytes [offset, offset + length) of a file to ``h`` through mmap windows: no copy into
    Python buffers, hashlib releases the GIL, and resident pages stay about one window."""
    import mmap
    with open(path, "rb") as f:
        pos, end = offset, offset + length
        while pos < end:
            base = pos - pos % mmap.ALLOCATIONGRANULARITY
            n = min(end - base, window)
            with mmap.mmap(f.fileno(), n, access=mmap.ACCESS_READ, offset=base) as mm:
                with memoryview(mm) as view:
                    h.update(view[pos - base:n])
            pos = base + n


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    _hash_range(h, path, 0, os.path.getsize(path))
    return h.hexdigest()


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
