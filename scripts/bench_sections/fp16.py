"""The fp16 pass: its speed against onnxruntime's converter, and each variant's accuracy under emulation,
on random weights and on a 3b whose residual overflows fp16 as the real checkpoint's does."""
from __future__ import annotations

import json
from pathlib import Path

from bench_sections.common import QVL, child, ensure_model, median_run, table
from harness import clear, measure


def section_fp16(work: Path, preset: str) -> list[str]:
    model = ensure_model(work)
    out = work / "f16.onnx"
    runs_q, runs_o = [], []
    for _ in range(3):
        clear(out, Path(str(out) + ".data"))
        runs_q.append(measure("qvl-surgery fp16 --keep-silu-fp32", [QVL, "fp16", str(model), "-o", str(out),
                                                                      "--keep-silu-fp32", "-q"]))
    ort16 = work / "ort16.onnx"
    clear(ort16, Path(str(ort16) + ".data"))
    runs_o.append(measure("baseline: onnxruntime convert_float_to_float16", child("ort-fp16", model, ort16),
        show="python -c 'convert_float_to_float16(onnx.load(model.onnx), disable_shape_infer=True, "
             "node_block_list=[Sigmoid]); onnx.save(..., external data)'"))
    clear(ort16, Path(str(ort16) + ".data"))
    q, o = median_run(runs_q), runs_o[0]
    return ["## fp16 pass (3b fp32 -> fp16)", "",
            "Goal (issue 4): <= 0.25x the time of onnxruntime's float16 converter and <= 1 GB peak RSS.", "",
            *table([q, o], o), ""]


FP16_VARIANTS = [("plain fp16", []), ("--keep-silu-fp32", ["--keep-silu-fp32"]),
                 ("--keep-silu-fp32 --keep-rmsnorm-fp32", ["--keep-silu-fp32", "--keep-rmsnorm-fp32"]),
                 ("--calibrate (margin 0.5)", ["--calibrate", "{inputs}"])]


def _accuracy_rows(work: Path, model: Path, inputs: Path) -> list[str]:
    """Each fp16 variant against the fp32 model under emulation."""
    rows = ["| variant | max abs | mean abs | cosine | emulation s | emulation peak MB |", "|---|---:|---:|---:|---:|---:|"]
    for label, opts in FP16_VARIANTS:
        opts = [o.replace("{inputs}", str(inputs)) for o in opts]
        out = work / "acc16.onnx"
        clear(out, Path(str(out) + ".data"))
        measure(f"(setup) fp16 {label}", [QVL, "fp16", str(model), "-o", str(out), "-q", *opts])
        rep = work / "acc.json"
        r = measure(f"compare --emulate-fp16 ({label})", [QVL, "compare", str(model), str(out), "--emulate-fp16",
                                                          "--inputs", str(inputs), "--json", str(rep),
                                                          "--min-cosine", "0", "--atol", "1", "--rtol", "1"],
                    allow_fail=True)
        o = json.loads(rep.read_text())["outputs"][0]
        rows.append(f"| {label} | {o['max_abs']:.3e} | {o['mean_abs']:.3e} | {o['cosine']:.6f} | {r.wall_s:.1f} | "
                    f"{r.peak_mb:.0f} |")
        clear(out, Path(str(out) + ".data"), rep)
    return rows


def _random_input(work: Path):
    import numpy as np
    inputs = work / "input.npz"
    np.savez(inputs, pixel_values=np.random.default_rng(0).standard_normal((1024, 1176)).astype(np.float32))
    return inputs


def section_accuracy(work: Path, preset: str) -> list[str]:
    """fp16 variants against the fp32 model under emulation, on one random input."""
    model = ensure_model(work)
    rows = _accuracy_rows(work, model, _random_input(work))
    return ["## fp16 accuracy under emulation (3b, random weights seed 0, 448x448, one random input)", "",
            "`qvl-surgery compare model.onnx fp16.onnx --emulate-fp16 --inputs input.npz` for each variant; "
            "the emulation time includes onnxruntime's fp32 reference run. With random weights the activations "
            "stay small, so the variants differ only by rounding; the next section provokes the overflow.", "",
            *rows, ""]


def section_overflow(work: Path, preset: str) -> list[str]:
    """The same table on a 3b model whose block-31 down_proj drives the residual to ~4.9e4, as reported
    for the real checkpoint (random weights otherwise)."""
    model = work / "hot.onnx"
    clear(model, Path(str(model) + ".data"))
    measure("(setup) export 3b with a hot block-31 down_proj", child("hot-export", model))
    rows = _accuracy_rows(work, model, _random_input(work))
    clear(model, Path(str(model) + ".data"))
    return ["## fp16 overflow (3b whose block 31 pushes the residual to 4.9e4, as the real checkpoint does)", "",
            "Random weights, except 16 channels of `blocks.31.mlp.down_proj.bias` set to 4.9e4: the residual "
            "stays below fp16's 65504, but the merger's RMSNorm squares it (x^2 ~ 2.4e9 overflows fp16), the "
            "failure reported for the real 3B checkpoint. Same commands as the previous section.", "",
            *rows, ""]

