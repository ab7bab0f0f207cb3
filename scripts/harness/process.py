"""Child processes and what they cost: wall time (perf_counter around the child), the child's own peak
RSS (os.wait4's ru_maxrss), and a watchdog that stops a child before it takes the machine down."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from harness import results


@dataclass
class Run:
    label: str
    cmd: str
    wall_s: float
    peak_mb: float
    output: str = ""               # stdout and stderr together
    result: dict | None = None     # the child's result line (harness.results), if it printed one

    @property
    def failed(self) -> bool:
        return "FAILED" in self.label


def clear(*paths: Path) -> None:
    """Remove earlier outputs and flush dirty pages, outside the timed region, so that no run
    pays for deleting or writing back another run's gigabytes."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    os.sync()


def drop_caches() -> bool:
    """Cold page cache where the machine allows it (root on Linux); False where it does not."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def realtime(argv: list[str]) -> tuple[list[str], bool]:
    """argv under SCHED_FIFO where this process may set it (root with chrt): the 2 cores here are
    shared with other work, and a copy that loses its core for a moment doubles its time; every
    command of the comparison runs under the same policy (the kernel keeps 5% for the rest)."""
    chrt = shutil.which("chrt")
    if chrt and os.geteuid() == 0:
        return [chrt, "-f", "10", *argv], True
    return argv, False


def _meminfo(field: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def mem_available_gb() -> float:
    return _meminfo("MemAvailable")


def mem_total_gb() -> float:
    return _meminfo("MemTotal")


def rss_mb(pid: int) -> float | None:
    """A live process's resident memory in MB; None once it is gone."""
    try:
        return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("VmRSS")).split()[1]) / 1024
    except (OSError, StopIteration, ValueError):
        return None


def _watch_rss(proc: subprocess.Popen, limit_mb: float, stopped: list) -> None:
    """Kill the child when its resident memory passes limit_mb (a quantizer that would take the
    whole machine down with it is stopped, and the table says so)."""
    while proc.poll() is None:
        mb = rss_mb(proc.pid)
        if mb is None:
            return
        if mb > limit_mb:
            stopped.append(mb)
            proc.kill()
            return
        time.sleep(0.2)


def measure(label: str, argv: list[str], *, show: str | None = None, env: dict | None = None,
            allow_fail: bool = False, rss_limit_mb: float | None = None) -> Run:
    """Run argv as a child process; wall seconds and the child's peak RSS in MB. A failure ends the
    bench unless ``allow_fail`` (then the Run's label says FAILED)."""
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    stopped: list = []
    if rss_limit_mb:
        threading.Thread(target=_watch_rss, args=(proc, rss_limit_mb, stopped), daemon=True).start()
    out = proc.stdout.read().decode(errors="replace")
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = ru.ru_maxrss / 1024
    if proc.returncode != 0:
        sys.stderr.write(out[-3000:])
        if stopped:
            label += f" (stopped by scripts/bench at {stopped[0] / 1024:.1f} GB resident)"
        if allow_fail:
            print(f"  {label:<48} FAILED (exit {proc.returncode}) after {wall:.1f} s, peak {peak:.0f} MB")
            return Run(label + f" (FAILED, exit {proc.returncode})", show or " ".join(argv), wall, peak, out,
                       results.parse(out))
        raise SystemExit(f"bench: {label} failed (exit {proc.returncode}): {' '.join(argv)}")
    r = Run(label, show or " ".join(shlex.quote(a) for a in argv), wall, peak, out, results.parse(out))
    print(f"  {label:<48} {wall:8.2f} s {r.peak_mb:9.0f} MB", flush=True)
    return r


def supervise(argv: list[str], log_path: Path, *, timeout: float, min_free_gb: float, who: str,
              env: dict | None = None, cwd: Path | None = None) -> tuple[int | None, str | None]:
    """Run argv with its output into log_path; stop it past ``timeout`` seconds, or when the machine has
    less than ``min_free_gb`` left (it is shared: stop a child before the kernel kills someone else's
    process). (exit code, None), or (None, why it was stopped)."""
    t0 = time.time()
    stopped = None
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        while proc.poll() is None:
            time.sleep(2)
            if time.time() - t0 > timeout:
                stopped = f"timeout after {timeout} s"
            elif mem_available_gb() < min_free_gb:
                stopped = (f"stopped by {who} at {(rss_mb(proc.pid) or 0) / 1024:.1f} GB resident: less than "
                           f"{min_free_gb} GB of the machine's {mem_total_gb():.0f} GB left")
            if stopped:
                proc.kill()
                proc.wait()
    return (None, stopped) if stopped else (proc.returncode, None)
