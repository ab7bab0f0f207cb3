"""sensitivity: which linears cost the most accuracy when quantized, measured one group (or one
linear) at a time with the quantize pass's own plan and evaluator (``qvl-surgery sensitivity``)."""
from __future__ import annotations

from pathlib import Path

from passes.quantize import Evaluator, prepare
from qvl_surgery.core.linears import group_of
from qvl_surgery.core.modelfile import Model
from qvl_surgery.core.passbase import Context


def sensitivity(model: Model, *, weights: str = "int8", activations: str = "int8", format: str = "onnxruntime",
                block_size: int | None = None, calibrate: str | None = None, calibrate_method: str | None = None,
                inputs: str | None = None, per_linear: bool = False, reference: str | Path | None = None,
                progress: bool = False) -> dict:
    """Per group of linears (each block, the merger, the patch embed) and, with ``per_linear``, per
    linear: the error (1 - token-centered cosine of the outputs against fp32, worst over the
    calibration inputs) that quantizing it alone adds, beside its share of the linears'
    multiply-adds; and the cosine with every linear quantized. Each figure quantizes and runs the
    whole model (one run per group: a 3b's 34 groups are 34 runs per input set). ``inputs``: the
    measurement's input sets (default: ``calibrate``'s, else ``random:4``); ``calibrate`` makes the
    activation ranges of a static scheme, as in quantize."""
    context = Context(reference=Path(reference) if reference else None, progress=progress)
    prep = prepare(model, context, weights=weights, activations=activations, format=format, block_size=block_size,
                    calibrate=calibrate, calibrate_method=calibrate_method, keep_node=[], keep_block=[])
    ev = Evaluator(prep, context, inputs or calibrate, "inputs" if inputs else "calibrate")
    out = {"scheme": prep.plan(prep.kept).scheme, "format": format, "calibration": ev.what,
           "counted_by": ev.counted_by, "kept_by_scheme": prep.kept,
           "all_quantized_centered_cosine": round(ev.cosine(ev.todo), 7), "groups": []}
    for g, ls in ev.groups.items():
        c = ev.cosine(ls)
        out["groups"].append({"group": g, "share": round(ev.group_share[g], 6), "alone_centered_cosine": round(c, 7),
                              "alone_error": float(f"{1.0 - c:.3e}")})
    if per_linear:
        out["linears"] = []
        for lin in ev.todo:
            c = ev.cosine([lin])
            out["linears"].append({"linear": lin.name, "group": group_of(lin.name),
                                   "share": round(ev.share[lin.name], 6), "alone_centered_cosine": round(c, 7),
                                   "alone_error": float(f"{1.0 - c:.3e}")})
    return out
