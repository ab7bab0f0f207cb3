"""Issue 26's targets: `quantize --budget` measured in each target's arithmetic on the outlier stand-in
after smooth (the keep-list, its share, the budget's own measure), the time and memory of the budget
and of sensitivity, as multiples of one fp32 run of the same file in the same invocation."""
from __future__ import annotations

import json
from pathlib import Path

from bench_sections.common import QVL, data_of, latency
from bench_sections.quant import clear_surgered, cpu_low_precision, surgered, windowed
from harness import clear, measure

W8A8 = ("--weights", "int8", "--activations", "int8", "--format", "onnxruntime")
TARGETS = [
    ("onnxruntime (the file itself)", W8A8 + ("--budget", "0.9995")),
    ("rknn (emulated; residual stream 16-bit)", W8A8 + ("--target", "rknn", "--calibrate", "random:4",
                                                        "--budget", "0.99")),
    ("rknn-int8 (emulated; rknn's default build)", W8A8 + ("--target", "rknn-int8", "--calibrate", "random:4",
                                                          "--budget", "0.99")),
]


def _budget_of(path: Path) -> dict:
    import onnx
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props.get("qvl_surgery.quantize", "{}")).get("budget") or {}


def section_targets(work: Path, preset: str) -> list[str]:
    win = windowed(work, "outlier", "outlier", preset)
    made: dict = {}
    smoothed, _ = surgered(work, win, "smooth", made)
    base = latency("onnxruntime fp32 smoothed (baseline)", smoothed, 3)
    one = base.result["median_s"]
    rows = ["| target | budget | kept float | share of multiply-adds | budget's own measure | wall s | x one fp32 run "
            "| peak RSS MB |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for label, args in TARGETS:
        out = work / "targets-q.onnx"
        clear(out, data_of(out))
        run = measure(f"quantize --budget, {label}", [QVL, "quantize", str(smoothed), "-o", str(out), "-q", *args],
                      allow_fail=True)
        goal = args[args.index("--budget") + 1]
        if not out.exists():
            line = next((x for x in reversed((run.output or "").splitlines()) if "error:" in x), "failed")
            why = line.split("arithmetic: ", 1)[-1].split("; the activations", 1)[0]
            rows.append(f"| {label} | {goal} | refused: {why[:200].replace('|', '/')} |  |  | {run.wall_s:.1f} | "
                        f"{run.wall_s / one:.1f} | {run.peak_mb:.0f} |")
            continue
        b = _budget_of(out)
        rows.append(f"| {label} | {goal} | {', '.join(b.get('groups_kept', [])) or 'nothing'} | "
                    f"{100 * b.get('kept_share_of_multiply_adds', 0):.2f}% | {b.get('achieved', float('nan')):.6f} | "
                    f"{run.wall_s:.1f} | {run.wall_s / one:.1f} | {run.peak_mb:.0f} |")
        clear(out, data_of(out))
    sens = work / "targets-sensitivity"
    clear(sens)
    srun = measure("sensitivity, one input", [QVL, "sensitivity", str(smoothed), "--inputs", "random:1", "-o",
                                               str(sens), "-q"])
    clear(sens)
    clear_surgered(made)
    return [f"## targets ({preset} outlier stand-in, windowed, after `smooth --calibrate random:4`; 448x448, "
            "2 threads)", "",
            "`quantize --budget` with the keep-list measured in each target's arithmetic (`--target`; "
            "`passes/quantize/target.py` says what each emulation covers), w8a8 on 4 random input sets; the "
            "budget's own measure is the worst token-centered cosine over them in that arithmetic. Wall time and "
            "peak RSS of the whole command (load, measure, write); 'x one fp32 run' divides by the median "
            f"onnxruntime latency of the smoothed fp32 file in the same invocation ({one:.2f} s; CPU: "
            f"{cpu_low_precision()}). How the emulation compares with rknn-toolkit2's simulator: COMPAT.md, "
            "\"toolchain configs\" (tiny).", "", *rows, "",
            f"`qvl-surgery sensitivity` of the same file, one input: {srun.wall_s:.1f} s "
            f"({srun.wall_s / one:.1f} fp32 runs), peak {srun.peak_mb:.0f} MB.", ""]
