"""The one output publisher (DESIGN.md, principle 3): every command that writes a model file or a
folder goes through here, so a check made once holds for all of them.

- **Before any work** (:func:`check_new_output` for a model, :func:`check_new_dir` for a folder): the
  output is never an input, its ``.data``, inside an input folder, or a folder holding an input; an
  existing output is replaced only with ``overwrite`` (the CLI's ``--force``), and an existing folder
  only when this toolkit wrote it (its :data:`MARKER` file, or an older run's or split's own files):
  ``--force`` never removes a user's folder.
- **While working**: a hidden staging folder beside the output (:func:`staging`), named with this
  process's id, removed on success, error, SIGINT and SIGTERM alike (the CLI turns SIGTERM into
  :class:`Terminated`, so ``finally`` blocks run). Staging left by a process that was killed
  outright (SIGKILL, power loss) is removed by the next run that stages beside it.
- **Publishing** (:func:`publish_dir`, and :func:`~qvl_surgery.core.modelfile.save_model` for a model):
  renames only, the old output removed after the new one is in place.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import onnx

from qvl_surgery.core.errors import BadInput

MARKER = ".qvl-surgery"   # in every folder this toolkit publishes: what --force may replace


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (like KeyboardInterrupt for SIGINT) so that every staging
    folder is removed on the way out."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _guarded(inputs: Iterable[Path]) -> list[Path]:
    """Each input, its data file (a model's ``.onnx.data``) and, for a split named by its
    manifest, its folder."""
    out = []
    for p in inputs:
        p = Path(p)
        out.append(p)
        if p.suffix == ".onnx":
            out.append(p.with_name(p.name + ".data"))
        if p.name == "manifest.json":
            out.append(p.parent)
    return out


def check_not_over_inputs(out: Path, inputs: Iterable[Path], *, folder: bool) -> None:
    """Refuse an output that is an input (or its data file), lies inside an input folder, or (a
    folder output) holds an input."""
    out = Path(out)
    targets = [out] if folder else [out, out.with_name(out.name + ".data")]
    for p in _guarded(inputs):
        rp = p.resolve()
        for t in targets:
            rt = t.resolve()
            if rt == rp or _same_file(t, p):
                raise BadInput(f"{out}: would overwrite the input {p}; choose another output path")
            if p.is_dir() and rp in rt.parents:
                raise BadInput(f"{out}: is inside the input folder {p}; choose an output outside it")
            if folder and rt in rp.parents:
                raise BadInput(f"{out}: holds the input {p}; write to another folder")


def _check_writable_name(out: Path, what: str) -> None:
    rp = Path(out).resolve()
    if rp == Path(rp.anchor) or rp == Path.cwd().resolve() or rp in Path.cwd().resolve().parents:
        raise BadInput(f"{out}: is the current folder or above it; name a new {what}")


def check_output_path(out: Path, inputs: Iterable[Path]) -> None:
    """A model output's name and place: ``.onnx``, not a folder, not over an input."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise BadInput(f"{out}: output must end in .onnx (its weights go to {out.name}.data beside it)")
    if out.is_dir():
        raise BadInput(f"{out}: is a folder; pass a file name ending in .onnx")
    check_not_over_inputs(out, inputs, folder=False)


def check_new_output(out: Path, *, inputs: Iterable[Path] = (), overwrite: bool = False) -> None:
    """A model output (``out`` + ``out.data``): not an input, and not there yet unless ``overwrite``."""
    out = Path(out)
    check_output_path(out, inputs)
    data = out.with_name(out.name + ".data")
    if data.is_dir():
        raise BadInput(f"{data}: is a folder where the output's weights would go; choose another output path")
    if not overwrite and (out.exists() or data.exists()):
        raise BadInput(f"{out}: already exists; pass " + "{overwrite} to replace it or choose another path",
                       overwrite=True)
    if overwrite and (out.exists() or data.exists()) and not model_written_by_toolkit(out):
        raise BadInput(f"{out}: exists and was not written by qvl-surgery (no qvl_surgery.* metadata); "
                       "{overwrite} replaces only the toolkit's own outputs: move it away or choose another path",
                       overwrite=True)


def model_written_by_toolkit(path: Path) -> bool:
    """An existing model file carries the ``qvl_surgery.*`` metadata every command writes (its
    weights are not read)."""
    if not Path(path).is_file():
        return False
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX at all: certainly not ours
        return False
    return any(p.key.startswith("qvl_surgery.") for p in proto.metadata_props)


def written_by_toolkit(folder: Path, own_files: Iterable[str] = ()) -> bool:
    """The folder holds this toolkit's marker (or one of ``own_files``: what a command wrote before
    the marker existed, such as a split's manifest.json)."""
    return any((Path(folder) / n).is_file() for n in (MARKER, *own_files))


def check_new_dir(out: Path, *, overwrite: bool = False, inputs: Iterable[Path] = (),
                  own_files: Iterable[str] = ()) -> None:
    """An output folder: absent or empty; or, with ``overwrite``, one this toolkit wrote (its
    :data:`MARKER`, or ``own_files``) that holds no input. Never a file, an input, or the current folder."""
    out = Path(out)
    _check_writable_name(out, "folder")
    check_not_over_inputs(out, inputs, folder=True)
    if not out.exists():
        if out.is_symlink():
            raise BadInput(f"{out}: is a broken link; choose a new folder")
        return
    if not out.is_dir():
        raise BadInput(f"{out}: exists and is not a folder; choose a new folder")
    if not any(out.iterdir()):
        return
    if not written_by_toolkit(out, own_files):
        raise BadInput(f"{out}: holds files qvl-surgery did not write; " + "{overwrite} replaces only a folder it "
                       "wrote: choose a new or empty folder", overwrite=True)
    if not overwrite:
        raise BadInput(f"{out}: already holds an earlier output; pass " + "{overwrite} to replace it",
                       overwrite=True)


def check_new_file(out: Path, *, inputs: Iterable[Path] = (), option: str = "output") -> None:
    """A plain output file (a JSON report, saved inputs): its folder exists, it is not a folder and
    not an input. Checked before the measurement that fills it runs."""
    out = Path(out)
    if out.is_dir():
        raise BadInput("{" + option + "}: is a folder; name a file", **{option: str(out)})
    if not out.parent.is_dir():
        raise BadInput("{" + option + f"}}: the folder {out.parent} does not exist; create it or name another file",
                       **{option: str(out)})
    try:
        check_not_over_inputs(out, inputs, folder=False)
    except BadInput as e:
        raise BadInput("{" + option + "}: " + e.template, **{**e.params, option: str(out)}) from None


def write_text(out: Path, text: str) -> None:
    """A small text file written whole or not at all (a temporary sibling renamed)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


# ------------------------------------------------------------------------------ staging

_STAGING = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)(-.*)?$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _sweep_stale(out: Path) -> None:
    """Remove staging and old outputs beside ``out`` left by processes that no longer run."""
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = _STAGING.match(p.name)
        if m and m["name"] == out.name and not _alive(int(m["pid"])):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden temporary folder beside ``out`` (same filesystem, so renames publish), removed on exit.
    Folders made here to hold it are removed too when nothing was published into them (a failed or
    interrupted write leaves no trace)."""
    out = Path(out)
    if not out.name:
        raise BadInput(f"{out}: name a file or a folder to write")
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:   # innermost first; stops at the first that holds something
            try:
                p.rmdir()
            except OSError:
                break


def publish_dir(tmp: Path, out_dir: Path, command: str = "") -> None:
    """Replace out_dir by tmp with renames only, the toolkit's :data:`MARKER` inside; an old output
    is removed after the new one is in place."""
    from qvl_surgery import __version__
    (tmp / MARKER).write_text(json.dumps({"written_by": f"qvl-surgery {__version__}", "command": command,
                                          "note": "qvl-surgery --force may replace this folder"}) + "\n")
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


@contextlib.contextmanager
def new_dir(out: Path, *, overwrite: bool = False, inputs: Iterable[Path] = (), own_files: Iterable[str] = (),
            command: str = "") -> Iterator[Path]:
    """Write a folder: checked (:func:`check_new_dir`), staged, and published when the block ends
    without an error. Yields the staging folder to write into."""
    out = Path(out)
    check_new_dir(out, overwrite=overwrite, inputs=inputs, own_files=own_files)
    with staging(out) as tmp:
        yield tmp
        publish_dir(tmp, out, command)
