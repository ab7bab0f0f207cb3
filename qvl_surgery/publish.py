"""Atomic outputs (DESIGN.md, principle 3), in one place: the exists-check before any work, a
temporary sibling to write into, and the rename that publishes. Used by modelfile.save_model,
split's save_split and simplify."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import BadInput


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


def check_new_output(out: Path, *, inputs: Iterable[Path] = (), overwrite: bool = False) -> None:
    """A model output (``out`` + ``out.data``): not an input, and not there yet unless ``overwrite``."""
    out = Path(out)
    check_output_path(out, inputs)
    if not overwrite and (out.exists() or out.with_name(out.name + ".data").exists()):
        raise BadInput(f"{out}: already exists; pass " + "{overwrite} to replace it or choose another path",
                       overwrite=True)


def check_new_dir(out: Path, *, overwrite: bool = False) -> None:
    """An output folder: absent, empty, or replaced only with ``overwrite``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BadInput(f"{out}: exists and is not empty; pass " + "{overwrite} to replace it", overwrite=True)


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden temporary folder beside ``out`` (same filesystem, so renames publish), removed on exit.
    Folders made here to hold it are removed too when nothing was published into them (a failed or
    interrupted write leaves no trace)."""
    out = Path(out)
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:   # innermost first; stops at the first that holds something
            try:
                p.rmdir()
            except OSError:
                break


def publish_dir(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by tmp with renames only; an old output is removed after the new one is in place."""
    # a folder made by mkdtemp is 0700: give it the mode a new folder gets, like the files in it
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
