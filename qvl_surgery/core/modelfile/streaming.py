"""Moving weight bytes, for both writers (external data and one file).

File ranges are copied in the kernel (:func:`copy_range`) into preallocated space; computed and
inline tensors become bytes (:func:`_tensor_bytes`, 4-bit values packed) made a few tensors ahead
of the writer (:func:`_payloads`), so peak memory is about the largest tensor. All code that moves
weight bytes lives in this package.
"""
from __future__ import annotations

import os
import sys
from typing import Iterator

import numpy as np
from onnx import TensorProto, numpy_helper

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.modelfile.model import (FOUR_BIT, Computed, Model, TensorSource, dtype_of, pack_nibbles,
                                              tensor_nbytes)

_COPY_CHUNK = 64 << 20   # the copy without the kernel reads and writes this much at a time


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


def preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes of a new file before it is written (Linux fallocate(2), mode 0):
    copying into preallocated space skips ext4's per-page block reservation. Where the call is
    missing or the filesystem refuses it, nothing is done (glibc's posix_fallocate would instead
    write the whole file once)."""
    if size <= 0 or not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate(fd, 0, 0, size)  # a failure (EOPNOTSUPP, ENOSPC) shows later as the write's own error, or not at all


def _tensor_bytes(t: TensorProto, src: TensorSource | None) -> memoryview:
    """Bytes of a computed or inline tensor, as a view of its array (no extra copy); 4-bit values
    are packed two a byte, as ONNX stores them."""
    if t.data_type in FOUR_BIT:
        values = src.make() if isinstance(src, Computed) else numpy_helper.to_array(t)
        packed = pack_nibbles(values)
        if packed.size != tensor_nbytes(t):
            raise ValueError(f"4-bit tensor {t.name!r} has {np.asarray(values).size} values, expected shape {list(t.dims)}")
        return memoryview(packed).cast("B")
    if isinstance(src, Computed):
        arr = np.ascontiguousarray(src.make(), dtype=dtype_of(t))
        if arr.size != int(np.prod(t.dims, dtype=np.int64)):
            raise ValueError(f"computed tensor {t.name!r} has {arr.size} values, expected shape {list(t.dims)}")
    else:
        arr = np.ascontiguousarray(numpy_helper.to_array(t))
    return memoryview(arr.reshape(-1).view(np.uint8))


def _payloads(model: Model, tensors: list[TensorProto]) -> Iterator[tuple[TensorProto, TensorSource | None,
                                                                          memoryview | None]]:
    """Each initializer in order with its source and, for a computed one, its bytes. Computed
    tensors (conversions, random init) are made by two worker threads a few tensors ahead of the
    writer (numpy releases the GIL); the lookahead bounds memory to a few tensors."""
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
            if src is None and t.data_location == TensorProto.EXTERNAL:
                raise ValueError(f"tensor {t.name!r} is external but has no source")
            data = None
            if isinstance(src, Computed):
                data = pending.pop(k).result() if k in pending else _tensor_bytes(t, src)
                if data.nbytes != src.nbytes:
                    raise ValueError(f"computed tensor {t.name!r} made {data.nbytes} bytes, it declared {src.nbytes}")
            yield t, src, data
            del data
    finally:
        for f in pending.values():
            f.cancel()
        pool.shutdown(wait=True)


def _progress_bar(total: int, progress: str | None):
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc=progress, leave=False, disable=None)  # off without a TTY
