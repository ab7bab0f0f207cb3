"""What every bench section uses: the interpreters, the tables, the 3b export they share, and
scripts/ort_latency.py in a child process."""
from __future__ import annotations

import sys
from pathlib import Path

from bench_sections import children
from harness import Run, measure

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
QVL = str(Path(PY).with_name("qvl-surgery"))
ORT_LATENCY = str(ROOT / "scripts" / "ort_latency.py")


def child(step: str, *args, python: str = PY) -> list[str]:
    """The command line of a baseline or anchor step (bench_sections/children.py)."""
    return children.argv(python, step, *args)


def data_of(model: Path) -> Path:
    return Path(str(model) + ".data")


def table(rows: list[Run], base: Run) -> list[str]:
    out = ["| step | wall s | x baseline | peak RSS MB | x baseline | command |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r.label} | {r.wall_s:.2f} | {r.wall_s / base.wall_s:.2f} | {r.peak_mb:.0f} | "
                   f"{r.peak_mb / base.peak_mb:.2f} | `{r.cmd}` |")
    return out


def median_run(runs: list[Run]) -> Run:
    runs = sorted(runs, key=lambda r: r.wall_s)
    m = runs[len(runs) // 2]
    return Run(m.label + f" (median of {len(runs)})", m.cmd, m.wall_s, max(r.peak_mb for r in runs))


def ensure_model(work: Path) -> Path:
    model = work / "model.onnx"
    if not model.exists():
        measure("(setup) export 3b", [QVL, "export", "--random-init", "3b", "--seed", "0", "-o", str(model), "-q"])
    return model


def latency(label: str, model: Path, runs: int, *args: str, show: str | None = None, allow_fail: bool = False) -> Run:
    """scripts/ort_latency.py on ``model`` in its own process; its answer is the Run's ``result``
    (median_s, first_s, session_s, ...)."""
    return measure(label, [PY, ORT_LATENCY, str(model), str(runs), *args], show=show, allow_fail=allow_fail)
