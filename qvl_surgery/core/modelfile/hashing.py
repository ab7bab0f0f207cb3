"""Integrity hashes of written files (split's manifest, verified by merge).

New files get :data:`HASH` (xxh3_128): it runs at about memory speed, so a part's hash is ready
about when its copy ends (:class:`StreamDigest` hashes while writing); sha256 is still read and
verified (manifests written before). A hash guards against damaged, truncated or mixed-up files,
not against someone who can also rewrite the manifest.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

HASH = "xxh3_128"                          # recorded for new files
HASH_ALGORITHMS = ("xxh3_128", "sha256")   # every one still verified


def new_hasher(algorithm: str = HASH):
    """A hashlib-style object (``update``, ``hexdigest``) for one of :data:`HASH_ALGORITHMS`."""
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "xxh3_128":
        import xxhash
        return xxhash.xxh3_128()
    raise ValueError(f"unknown hash algorithm {algorithm!r}; known: {', '.join(HASH_ALGORITHMS)}")


def _hash_range(h, path: Path, offset: int, length: int, window: int = 32 << 20) -> None:
    """Feed bytes [offset, offset + length) of a file to ``h`` through mmap windows: no copy into
    Python buffers, the hash releases the GIL, and resident pages stay about one window. The
    window is mapped with MAP_POPULATE: one call fills the page table instead of a fault per
    16 pages."""
    import mmap
    if hasattr(mmap, "MAP_SHARED"):
        how = {"flags": mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), "prot": mmap.PROT_READ}
    else:
        how = {"access": mmap.ACCESS_READ}
    with open(path, "rb") as f:
        pos, end = offset, offset + length
        while pos < end:
            base = pos - pos % mmap.ALLOCATIONGRANULARITY
            n = min(end - base, window)
            with mmap.mmap(f.fileno(), n, offset=base, **how) as mm:
                with memoryview(mm) as view:
                    h.update(view[pos - base:n])
            pos = base + n


def hash_file(path: str | os.PathLike, algorithm: str = HASH) -> str:
    """Hex digest of a whole file."""
    h = new_hasher(algorithm)
    _hash_range(h, Path(path), 0, os.path.getsize(path))
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return hash_file(path, "sha256")


class StreamDigest:
    """Hash of a data file computed while it is written: a worker thread hashes the same byte
    sequence (alignment zeros, source ranges read through mmap windows, computed bytes) that the
    writer puts in the file, so the hash is ready about when the copy ends instead of after a
    second full read. The queue is bounded, so computed tensors waiting to be hashed stay few.
    ``algorithm`` is one of :data:`HASH_ALGORITHMS` (default :data:`HASH`)."""

    def __init__(self, algorithm: str = HASH):
        import queue
        import threading
        self.algorithm = algorithm
        self._h = new_hasher(algorithm)
        self._q: "queue.Queue" = queue.Queue(maxsize=4)
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
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._h.hexdigest()

    def record(self) -> dict[str, str]:
        """``{algorithm: hexdigest}``, as a manifest stores it."""
        return {self.algorithm: self.hexdigest()}
