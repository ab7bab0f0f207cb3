"""Static activation ranges: the inputs of the quantized linears recorded over the calibration
sets (streaming histograms), the clip value of each from ``calibrate_method``."""
from __future__ import annotations

import time

from qvl_surgery.core import quant
from qvl_surgery.core.modelfile import Model

from passes.quantize.report import QuantizeReport
from passes.quantize.scheme import Scheme

DEFAULT_CALIB_COUNT = 8


def calibrate_ranges(model: Model, tensors: list[str], scheme: Scheme, *, progress: bool,
                     report: QuantizeReport) -> dict[str, quant.ActivationRange]:
    """``tensors``' ranges over ``scheme.calibrate``'s input sets, clipped by ``scheme.method``."""
    from qvl_surgery.core.calibrate import calibration_sets
    t0 = time.perf_counter()
    method, dtype = scheme.method, scheme.activations
    feeds, what = calibration_sets(model, scheme.calibrate, DEFAULT_CALIB_COUNT)
    rec = quant.record_ranges(model, feeds, tensors, progress=progress)
    ranges = {}
    for t in tensors:
        r = quant.activation_scale(rec.histograms[t], method, dtype)
        r.tensor = t
        ranges[t] = r
    clipped = sorted(ranges.values(), key=lambda r: r.clip / max(r.amax, 1e-30))[:3]
    report.calibration = [
        f"calibration: {what}, {len(tensors)} activation tensors recorded (inputs of the quantized linears), "
        f"{time.perf_counter() - t0:.1f} s; range method {method} on |x| (symmetric {dtype})",
        "  most clipped: " + ", ".join(f"{r.tensor} {r.clip:.3g} of max {r.amax:.3g}" for r in clipped)]
    return ranges
