"""Virtualenvs with pinned packages, made once and reused, and commands run in them.

A tool the toolkit runs but cannot import (its pins clash with the toolkit's own, as
onnxruntime-genai's model builder's do) gets a virtualenv of its own::

    python = make_venv(path, ("pkg==1.0", ...), what="the tool's environment")
    run_logged([str(python), "-m", "tool", ...], "run the tool")

A venv is ready when its stamp file holds the hash of its pins and Python (:func:`pins_stamp`):
new pins make a new one instead of changing one in use. Creation is atomic (a temporary sibling,
renamed) and locked, so two processes do not build it twice.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from qvl_surgery.core.errors import QvlError

log = logging.getLogger(__name__)

# The stamp's file name (first written for the package's builder venv: venvs made then stay valid).
STAMP = ".qvl-builder-stamp"


def pins_stamp(requirements: Sequence[str]) -> str:
    """The hash a venv with ``requirements`` on this Python (major.minor) is stamped with."""
    text = "\n".join(requirements) + f"\npython {sys.version_info[0]}.{sys.version_info[1]}"
    return hashlib.sha256(text.encode()).hexdigest()


def venv_python(venv: str | Path) -> Path:
    return Path(venv) / "bin" / "python"


def is_ready(venv: str | Path, requirements: Sequence[str]) -> bool:
    """Whether ``venv`` exists with exactly these pins (its stamp), so it can be used as it is."""
    stamp = Path(venv) / STAMP
    return (venv_python(venv).exists() and stamp.is_file()
            and stamp.read_text().strip() == pins_stamp(requirements))


def make_venv(venv: str | Path, requirements: Sequence[str], *, what: str = "a virtualenv",
              note: str = "once") -> Path:
    """The Python of a virtualenv at ``venv`` with ``requirements`` (installed by this Python's
    pip, without byte-compiling: the first run caches what it imports), created unless it is
    ready; an out-of-date one is replaced. ``what`` and ``note`` name it in the log."""
    venv = Path(venv)
    python = venv_python(venv)
    if is_ready(venv, requirements):
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(venv, requirements):
            return python
        log.warning("creating %s in %s (%s)", what, venv, note)
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{venv.name}.tmp-", dir=venv.parent))
        try:
            run_logged([sys.executable, "-m", "venv", "--without-pip", str(tmp)], f"create {what}")
            run_logged([sys.executable, "-m", "pip", "--python", str(venv_python(tmp)), "install", "--quiet",
                        "--no-compile", "--disable-pip-version-check", *requirements],
                       f"install the requirements of {what}")
            (tmp / STAMP).write_text(pins_stamp(requirements) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp made it private
            if venv.exists():
                shutil.rmtree(venv)
            os.rename(tmp, venv)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.warning("%s ready in %.0f s", what, time.monotonic() - t0)
    return python


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a child, byte-code caching on (without it every run of a
    tool re-compiles what it imports, torch and transformers: about twice the time), plus ``overrides``."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(overrides)
    return env


def run_logged(cmd: list[str], what: str, *, cwd: Path | None = None, log_path: Path | None = None,
               env: dict | None = None) -> None:
    """Run ``cmd`` (no stdin; stdout and stderr together, into ``log_path`` if given; ``env``
    default :func:`child_env`); on failure a QvlError saying it could not ``what``, with the
    output's last 15 lines."""
    r = subprocess.run(cmd, cwd=cwd, env=env or child_env(), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if log_path is not None:
        log_path.write_text(r.stdout)
    if r.returncode != 0:
        tail = "\n".join(r.stdout.strip().splitlines()[-15:])
        raise QvlError(f"could not {what} (exit {r.returncode}):\n{tail}")
