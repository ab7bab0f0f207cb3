"""Virtualenvs for tools whose pins clash with the toolkit's (each client of scripts/compat, NNCF):
made on first use, updated when their pip arguments change (a stamp of them skips pip otherwise)."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Venv:
    path: Path
    python: str                          # interpreter version, "3.11"
    pip: tuple[tuple[str, ...], ...]     # pip install argument lists, run in order

    @property
    def interpreter(self) -> Path:
        return self.path / "bin" / "python"


def find_python(version: str) -> str:
    """An interpreter of this version: on PATH, or one pyenv installed but does not expose."""
    for cand in [shutil.which(f"python{version}")] + sorted(glob.glob(
            os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python{version}")), reverse=True):
        if cand and subprocess.run([cand, "-c", ""], capture_output=True).returncode == 0:
            return cand
    raise SystemExit(f"no Python {version} here (needed by a client's virtualenv); install it or drop that client "
                     "with --clients")


def _say(msg: str) -> None:
    print(msg, flush=True)


def make_venv(env: Venv, name: str, log=_say) -> None:
    """Create or update ``env`` (``name`` for the messages); nothing when its stamp matches."""
    d = env.path
    stamp = d / ".qvl-compat-stamp"
    want = hashlib.sha256(json.dumps([env.python, env.pip]).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    log(f"setup {name}: {d} (Python {env.python})")
    py = env.interpreter
    if py.exists():
        have = subprocess.run([str(py), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True).stdout.strip()
        if have != env.python:
            shutil.rmtree(d)
    if not py.exists():
        subprocess.run([find_python(env.python), "-m", "venv", str(d)], check=True)
    for args in env.pip:
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"setup {name}: pip install {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    stamp.write_text(want)
