"""Issue 17's surgery per stand-in: naive W8A8 against smooth / rotate / both first, the sensitivity per
block before and after, and the surgery's exactness on the dynamic export."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench_sections.common import QVL, ROOT, data_of, latency
from bench_sections.quant import clear_surgered, quant_table, surgered, windowed
from bench_sections.routes import SURGERY_ROUTES
from harness import clear, measure


def section_surgery(work: Path, preset: str) -> list[str]:
    """Issue 17 per stand-in: naive W8A8 / after smooth / after rotate / with the budget's allocation,
    accuracy and latency (onnxruntime or OpenVINO) against onnxruntime fp32 of the same weights; and
    the sensitivity per block before and after the surgery (outlier stand-in), as a plot."""
    from qvl_surgery.core.config import PRESETS
    from qvl_surgery.core.weights import STAND_INS
    out = [f"## surgery ({preset} windowed, 448x448, 2 threads; the two stand-ins)", "",
           "Per stand-in, in one invocation: the fp32 file, W8A8 with every linear quantized on the file as it is "
           "(naive), after `smooth --calibrate random:4` and after `rotate` (both exact in fp32), and `--budget "
           "0.9995` after smooth (the fewest multiply-adds kept float to reach centered cosine 0.9995 on 4 random "
           "inputs; its row's pass time includes the measurement). Each file runs in its own process (3 runs, median "
           "of the last 2); cosines against the baseline's output on the same input. Pass s / MB: surgery plus "
           "quantize. Goals (issue 17): after surgery, nothing kept, centered cosine >= 0.99 (moonshot 0.999); "
           "with the budget, <= 5% of the linears' multiply-adds above 8 bits.", ""]
    for stand_in in ("outlier", "overflow"):
        win = windowed(work, stand_in, stand_in, preset)
        made: dict = {}
        rows, passes = quant_table(work, win, SURGERY_ROUTES, timed=True, made=made)
        out += [f"### {stand_in} stand-in: {STAND_INS[stand_in](PRESETS[preset], 0).description}", "", *rows, ""]
        if stand_in == "outlier":
            sens = work / "sensitivity"
            clear(sens)
            models = [win, *(surgered(work, win, how, made)[0] for how in ("smooth", "rotate", "rotate+smooth"))]
            run = measure("sensitivity (outlier: as is, smoothed, rotated, rotated then smoothed)",
                          [QVL, "sensitivity", *map(str, models), "--label", "as is", "--label", "smoothed",
                           "--label", "rotated", "--label", "rotated, smoothed", "--inputs", "random:1", "-o",
                           str(sens), "-q", "--force"],
                          show="qvl-surgery sensitivity windowed.onnx smoothed.onnx rotated.onnx rotated-smoothed.onnx "
                               "--inputs random:1")
            png = ROOT / "benchmarks_sensitivity.png"
            if (sens / "sensitivity.png").exists():
                shutil.copyfile(sens / "sensitivity.png", png)
                doc = json.loads((sens / "sensitivity.json").read_text())
                out += [f"Sensitivity per block (w8a8 dynamic, one random input; {run.wall_s:.0f} s): the error "
                        "quantizing each block alone adds, before and after the surgery. Every linear quantized: "
                        + "; ".join(f"{m['label']} centered cosine {m['all_quantized_centered_cosine']:.5f}"
                                    for m in doc["models"]) + ".", "",
                        f"![sensitivity per block]({png.name})", ""]
        clear_surgered(made)
        clear(win, data_of(win))
    return out + _surgery_exactness_dynamic(work, preset)


def _surgery_exactness_dynamic(work: Path, preset: str) -> list[str]:
    """smooth, rotate and both on the 3b dynamic export: fp32 output against the export's, in
    onnxruntime and OpenVINO (one 448x448 random image; relative to the output's max)."""
    import numpy as np
    dyn = work / "dynamic.onnx"
    clear(dyn, data_of(dyn))
    measure(f"(setup) export {preset} --dynamic", [QVL, "export", "--random-init", preset, "--seed", "0",
                                                        "--dynamic", "-o", str(dyn), "-q"])
    made: dict = {}
    rows = ["| file | runtime | max abs diff / max abs of the export's output (onnxruntime) | pass s | pass peak MB |",
            "|---|---|---:|---:|---:|"]
    ref = None
    for label, how in (("the dynamic export", None), ("smooth", "smooth"), ("rotate", "rotate"),
                       ("rotate, then smooth", "rotate+smooth")):
        path, run = (dyn, None) if how is None else surgered(work, dyn, how, made)
        for runtime in ("onnxruntime", "openvino"):
            out = work / "out.npy"
            clear(out)
            latency(f"{runtime}: {label} (dynamic)", path, 1, "--runtime", runtime, "--save", str(out), allow_fail=True)
            if not out.exists():
                rows.append(f"| {label} | {runtime} | failed | | |")
                continue
            y = np.load(out)
            if ref is None:
                ref = y
            rel = float(np.abs(y - ref).max() / max(float(np.abs(ref).max()), 1e-30))
            passed = f"{run.wall_s:.1f} | {run.peak_mb:.0f}" if run else " | "
            rows.append(f"| {label} | {runtime} | {rel:.1e} | {passed} |")
    clear_surgered(made)
    clear(dyn, data_of(dyn))
    return [f"### exactness on the {preset} dynamic export (random weights, one 448x448 image)", "",
            "Goal (issue 17): within 1e-5 of the output's max, no dtype changed; every file runs in onnxruntime and "
            "OpenVINO (whose own fp32 arithmetic differs from onnxruntime's by the export's row).", "", *rows, ""]
