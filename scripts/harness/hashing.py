"""File hashes read in chunks (a 3b model's .data is 2.7 GB: never read whole)."""
from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def file_digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def snapshot(path: Path) -> dict[str, tuple[str, int]]:
    """Every file of a model (the file and its siblings PATH*, or a folder's files): relative name ->
    (sha256, mtime in ns); two snapshots differ when anything wrote into it."""
    files = sorted(path.rglob("*")) if path.is_dir() else sorted(path.parent.glob(path.name + "*"))
    base = path if path.is_dir() else path.parent
    return {str(p.relative_to(base)): (file_digest(p), p.stat().st_mtime_ns) for p in files if p.is_file()}
