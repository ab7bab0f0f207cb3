"""What scripts/bench, scripts/compat and scripts/toolchains-proof share: running a child process and
measuring it (process), virtualenvs for the clients (venv), streaming file hashes (hashing) and the one
JSON line a child hands back to its parent (results). Standard library only: a client's worker, run
by its own virtualenv's interpreter, imports from here too."""
from harness.hashing import file_digest, snapshot
from harness.process import (Run, clear, drop_caches, measure, mem_available_gb, mem_total_gb, realtime, rss_mb,
                             supervise)
from harness.results import emit, parse
from harness.venv import Venv, find_python, make_venv

__all__ = ["Run", "Venv", "clear", "drop_caches", "emit", "file_digest", "find_python", "make_venv", "measure",
           "mem_available_gb", "mem_total_gb", "parse", "realtime", "rss_mb", "snapshot", "supervise"]
