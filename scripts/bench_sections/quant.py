"""Every quantization route on the windowed file: the file each route makes (bench_sections.routes), run by
scripts/ort_latency.py in its own process, against onnxruntime fp32 on the same input."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench_sections.common import QVL, child, data_of, latency
from bench_sections.routes import SCALE_ROUTES, expand, QUANT_ROUTES, QUANTIZER_RSS_LIMIT_MB, STAND_IN_ROUTES, SURGERY_BASE, SURGERY_CMD, Route
from harness import Run, clear, measure

NNCF_SHOW = {"weights": "nncf.compress_weights(ov.Core().read_model(windowed.onnx)) -> ov.save_model(q.xml, "
                        "compress_to_fp16=False)",
             "quantize": "nncf.quantize(ov.Core().read_model(windowed.onnx), {calib}, subset_size=all of them, "
                         "model_type=TRANSFORMER) -> ov.save_model(q.xml, compress_to_fp16=False)"}
ANCHOR_SHOW = {
    "ort-dynamic": "quantize_dynamic(windowed.onnx, q.onnx, weight_type=QInt8, use_external_data_format=True)",
    "ort-static": "quantize_static(windowed.onnx, q.onnx, {calib}, QDQ, per_channel=True, QInt8/QInt8, "
                  "use_external_data_format=True; its calibrator fed one input at a time, its session without the "
                  "memory arena)"}


def files_of(target: Path) -> list[Path]:
    """An ONNX file and its data file, or an OpenVINO IR's .xml and .bin."""
    if target.suffix == ".xml":
        return [target, target.with_suffix(".bin")]
    return [target, data_of(target)]


def windowed(work: Path, name: str, stand_in: str | None, preset: str) -> Path:
    src, win = work / f"{name}.onnx", work / f"{name}.windowed.onnx"
    if not win.exists():
        if stand_in:
            measure(f"(setup) export {preset} {stand_in} stand-in", child("stand-in-export", stand_in, preset, src))
        elif not src.exists():
            measure(f"(setup) export {preset}", [QVL, "export", "--random-init", preset, "--seed", "0",
                                                "-o", str(src), "-q"])
        measure("(setup) attention windowed", [QVL, "attention", str(src), "-o", str(win), "-q", "--force"])
        if stand_in:
            clear(src, data_of(src))
    return win


def surgered(work: Path, win: Path, how: str, made: dict) -> tuple[Path, Run]:
    """``win`` smoothed or rotated, made once per table (``made`` caches it; the caller clears)."""
    if (win, how) not in made:
        src, before = win, None
        if how in SURGERY_BASE:
            src, before = surgered(work, win, SURGERY_BASE[how], made)
        verb, *extra = SURGERY_CMD[how]
        out = work / f"{src.stem}.{verb}.onnx"
        clear(out, data_of(out))
        run = measure(f"{verb} {' '.join(extra)}", [QVL, verb, str(src), "-o", str(out), "-q", *extra])
        if before is not None:
            run = Run(run.label, run.cmd, before.wall_s + run.wall_s, max(before.peak_mb, run.peak_mb))
        made[(win, how)] = (out, run)
    return made[(win, how)]


def clear_surgered(made: dict) -> None:
    for out, _ in made.values():
        clear(out, data_of(out))
    made.clear()


def _kept_note(path: Path) -> str:
    """What a quantized file kept float and its share of the multiply-adds (from its metadata)."""
    from qvl_surgery.core.signature import head_model
    try:
        rec = json.loads(head_model(path).metadata().get("qvl_surgery.quantize") or "{}")
    except Exception:   # noqa: BLE001 - an anchor's file has no such metadata
        return ""
    b = rec.get("budget") or {}
    if b:
        return (f" (kept float: {', '.join(b['groups_kept']) or 'nothing'}, {100 * b['kept_share_of_multiply_adds']:.2f}% "
                f"of the multiply-adds; budget's own measure {b['achieved']})")
    return ""


def make_route_file(work: Path, win: Path, route: Route, target: Path, made: dict,
                    photos: "Photos | None" = None) -> Run:
    """Write ``route``'s file to ``target`` from the windowed file; the pass's own time and peak RSS.
    ``photos``: the calibration photos for the anchors and for a ``PHOTOS`` in the route's options."""
    label = route.label
    npz = [str(photos.calib_npz)] if photos else []
    calib = "the calibration photos" if photos else "8 random inputs"
    if route.anchor and route.anchor.startswith("nncf-"):
        from compat_catalog import NNCF
        from harness.venv import make_venv
        make_venv(NNCF.venv, NNCF.name)
        mode = route.anchor[len("nncf-"):]
        return measure(f"quantize: {label}", child("nncf-anchor", mode, win, target, *npz,
                                                   python=str(NNCF.venv.interpreter)),
                       show=NNCF_SHOW[mode].format(calib=calib), allow_fail=True, rss_limit_mb=QUANTIZER_RSS_LIMIT_MB)
    if route.anchor:
        args = npz if route.anchor == "ort-static" else []
        return measure(f"quantize: {label}", child(route.anchor, win, target, *args),
                       show=ANCHOR_SHOW[route.anchor].format(calib=calib), allow_fail=True,
                       rss_limit_mb=QUANTIZER_RSS_LIMIT_MB)
    opts, shown = expand(route.quantize or (), win, photos.calib if photos else None)
    if route.surgery and route.quantize is None:   # the surgery alone: its fp32 file
        verb, *extra = SURGERY_CMD[route.surgery]
        return measure(f"{verb} (fp32)", [QVL, verb, str(win), "-o", str(target), "-q", *extra],
                       show=f"qvl-surgery {verb} windowed.onnx -o q.onnx {' '.join(extra)}")
    if route.surgery:
        sm, srun = surgered(work, win, route.surgery, made)
        q = measure(f"quantize {' '.join(opts)}", [QVL, "quantize", str(sm), "-o", str(target), "-q", *opts])
        verb = " ".join(SURGERY_CMD[route.surgery])
        if route.surgery in SURGERY_BASE:
            verb = " ".join(SURGERY_CMD[SURGERY_BASE[route.surgery]]) + " windowed.onnx -o r.onnx && qvl-surgery " + verb
        return Run(q.label, f"qvl-surgery {verb} windowed.onnx -o s.onnx && qvl-surgery "
                   f"quantize s.onnx -o q.onnx {' '.join(shown)}", srun.wall_s + q.wall_s, max(srun.peak_mb, q.peak_mb))
    return measure(f"quantize {' '.join(shown)}", [QVL, "quantize", str(win), "-o", str(target), "-q", *opts],
                   show="qvl-surgery quantize windowed.onnx -o q.onnx " + " ".join(shown))


@dataclass(frozen=True)
class Photos:
    """Photos to calibrate on (``calib``, comma separated, as ``--calibrate`` takes them; ``calib_npz``,
    their ``pixel_values`` for the anchors) and to judge on (``judge``: latency on the first, accuracy
    on each)."""
    calib: str
    calib_npz: Path
    judge: list[Path]

    @property
    def names(self) -> list[str]:
        return [p.stem for p in self.judge]

    @classmethod
    def make(cls, work: Path, win: Path) -> "Photos":
        import numpy as np
        from photos import CALIB, JUDGE, save_photos
        from qvl_surgery.core.inputs import load_inputs
        calib, judge = save_photos(work / "photos", CALIB), save_photos(work / "photos", JUDGE)
        npz = work / "photos" / "calib.npz"
        np.savez(npz, pixel_values=np.stack([load_inputs(win, image=str(p))["pixel_values"] for p in calib]))
        return cls(",".join(map(str, calib)), npz, judge)


def quant_table(work: Path, win: Path, routes: list[Route], *, timed: bool, made: dict | None = None,
                photos: Photos | None = None, runs: int = 3) -> tuple[list[str], list[Run]]:
    """One table row per route. ``made``: the surgered files, kept for the caller (who clears them);
    without it each route's surgery is cleared after its row. ``photos``: judged on its photos (the
    accuracy cells are the worst photo's, the centered cosine of each beside it) instead of one random
    input; the calibrating routes and anchors calibrate on its other photos."""
    import numpy as np

    from qvl_surgery.core.metrics import centered_cosine, cosine
    rows = ["| route | runtime | latency s | x ORT fp32 | max abs diff / max abs ref | cosine | centered cosine | "
            "file MB | peak RSS MB | pass s | pass peak MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    passes: list[Run] = []
    profiles: list[str] = []   # OpenVINO's own counters for its timed routes
    ref, base = None, None
    for route in routes:
        label, runtime = route.label, route.runtime
        target, qrun = win, None
        if route.makes_file:
            nncf = bool(route.anchor and route.anchor.startswith("nncf-"))
            target = work / ("q.xml" if nncf else "q.onnx")   # NNCF's anchors write OpenVINO IR
            clear(*files_of(target))
            own = {} if made is None else made
            qrun = make_route_file(work, win, route, target, own, photos)
            if made is None:
                clear_surgered(own)
            passes.append(qrun)
        out = work / "out.npy"
        clear(out)
        if qrun is not None and qrun.failed:
            rows.append(f"| {label} | {runtime} | not run: {qrun.label.split('(', 1)[1].rstrip(')')} | "
                        f"| | | | | | {qrun.wall_s:.1f} | {qrun.peak_mb:.0f} |")
            continue
        profile = ["--profile"] if timed and runtime.startswith("openvino") else []
        images = ["--images", ",".join(map(str, photos.judge))] if photos else []
        r = latency(f"{runtime}: {label}", target, runs if timed else 1, "--runtime", runtime, "--save", str(out), "--inputs-of",
                    str(win), *profile, *images, allow_fail=True)
        mb = sum(p.stat().st_size for p in files_of(target) if p.exists()) / 1e6
        if not out.exists():
            rows.append(f"| {label} | {runtime} | failed | | | | | {mb:.0f} | | | |")
            continue
        median = r.result["median_s"]
        if "linears_s" in r.result:
            profiles.append(f"- {label}: linears {r.result['linears_s']:.2f} s of the run, kernels "
                            f"{', '.join(r.result['linear_kernels'])}")
        y = np.load(out)
        if ref is None:
            ref, base = y, median
        lat = f"{median:.2f} | {median / base:.2f}" if timed else " | "
        q = f"{qrun.wall_s:.1f} | {qrun.peak_mb:.0f}" if qrun else " | "
        pairs = list(zip(ref, y)) if photos else [(ref, y)]
        rel = max(float(np.abs(b - a).max() / max(np.abs(a).max(), 1e-30)) for a, b in pairs)
        label += _kept_note(target) if route.makes_file else ""
        ccs = [centered_cosine(a, b) for a, b in pairs]
        finite = all(np.isfinite(ccs))
        cc = f"{min(ccs):.5f}" if finite else "undefined: every token's output the same"
        if photos and finite:
            cc += f" ({', '.join(f'{c:.5f}' for c in ccs)})"
        rows.append(f"| {label} | {runtime} | {lat} | {rel:.1e} | {min(cosine(a, b) for a, b in pairs):.5f} | {cc} | "
                    f"{mb:.0f} | {r.peak_mb:.0f} | {q} |")
        if route.makes_file:
            clear(*files_of(target))
    if profiles:
        rows += ["", "OpenVINO's own per-node counters (PERF_COUNT, the last timed run): time in the linear layers "
                 "(FullyConnected nodes) and the kernels it chose for them:", "", *profiles]
    return rows, passes


def cpu_low_precision() -> str:
    """The CPU's instructions that decide int8 / bf16 speed, read from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU flags unknown"
    flags = set(next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), []))
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "CPU")
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
            if f in flags]
    missing = [f for f in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f not in flags]
    return f"{model}: {', '.join(have) or 'none of avx2/avx512/vnni/bf16/amx'}" + (
        f"; no {', '.join(missing)}" if missing else "")


def section_quant(work: Path, preset: str) -> list[str]:
    """Every quantization route on the 3b at 448x448: latency against onnxruntime fp32 windowed (same
    run), accuracy against its output, on random weights and on the two stand-ins."""
    rows, passes = quant_table(work, windowed(work, f"{preset}-random", None, preset), QUANT_ROUTES, timed=True)
    out = [f"## quantize ({preset} windowed, 448x448, 2 threads; random weights seed 0 and two stand-ins)", "",
           "Each quantized file is made from the windowed fp32 file and run by `scripts/ort_latency.py` in its own "
           "process (3 runs on one random input, median of the last 2); cosines are against the baseline's output "
           "on the same input. Token-centered: each output row minus the mean row (a constant component hides "
           "destroyed content). Quantize time and peak RSS are the pass's own (calibration on 8 random inputs "
           "included where the route calibrates). Goals (issue 16): an int8 route <= 0.35x with centered cosine "
           ">= 0.998; 4-bit file <= 0.2x the fp32 bytes; the pass under 1.5 GB and under half of "
           "quantize_static's time.", "",
           f"CPU: {cpu_low_precision()}. Without VNNI, AMX or bf16 instructions, int8 and bf16 gain little or "
           "nothing over fp32 here: OpenVINO's bf16 hint falls back to f32 (its cosine 1.00000 shows it), and its "
           "int8 linears run a kernel no faster than its fp32 ones (its own counters, below the table). The "
           "latency goal needs such a CPU; the accuracy columns do not depend on it.", "", "### random weights", "",
           *rows, ""]
    for stand_in in ("outlier", "overflow"):
        win = windowed(work, stand_in, stand_in, preset)
        srows, _ = quant_table(work, win, STAND_IN_ROUTES, timed=False)
        from qvl_surgery.core.weights import STAND_INS
        from qvl_surgery.core.config import PRESETS
        out += [f"### {stand_in} stand-in: {STAND_INS[stand_in](PRESETS[preset], 0).description}", "",
                "Accuracy only (one run each; the latency of a route does not depend on the weights' values).", "",
                *srows, ""]
        clear(win, data_of(win))
    return out




def section_scales(work: Path, preset: str) -> list[str]:
    """int8 activation scales on a CPU, on photos: per tensor (dynamic, static) against per token and
    MatMulNBits' per-block dynamic activations, and the two anchors, latency and accuracy in one run."""
    from photos import CALIB
    win = windowed(work, f"{preset}-random", None, preset)
    photos = Photos.make(work, win)
    rows, _ = quant_table(work, win, SCALE_ROUTES, timed=True, photos=photos, runs=5)
    clear(photos.calib_npz)
    return [f"## int8 activation scales ({preset} windowed, 448x448, random weights seed 0, photos)", "",
            "`quantize --activation-scale token` against the per-tensor scales, MatMulNBits (weights int8, "
            "accuracy_level 4: onnxruntime quantizes A per block of 128 at run time), the toolkit's static per-tensor "
            "qdq file in OpenVINO (whose int8 FullyConnected kernels are the fastest here) and the anchors (onnxruntime's "
            "quantize_dynamic, NNCF's quantize in OpenVINO). Each file in its own process, 2 threads: 5 runs on "
            f"scikit-image's {photos.names[0]} resized to 448x448 (median of the last 4), then one run on each other "
            f"photo; accuracy cells are the worst of {', '.join(photos.names)} (centered cosine of each in "
            f"brackets) against the fp32 file on the same photo. Calibrating routes and NNCF calibrate on "
            f"{', '.join(CALIB)} (never judged on). Goal (issue 26): a w8a8 route at centered >= 0.998, <= 0.35x "
            "onnxruntime fp32 on a CPU with VNNI or AMX (<= 0.80x on AVX2 alone), ahead of quantize_dynamic and "
            "NNCF's quantize on both axes.", "",
            f"CPU: {cpu_low_precision()}.", "", *rows, ""]
