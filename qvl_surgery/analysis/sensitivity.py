"""sensitivity: which linears cost the most accuracy when quantized, measured one group (or one
linear) at a time with the quantize pass's own plan and evaluator (``qvl-surgery sensitivity``).

The scheme is quantize's (``passes.quantize.SCHEME_OPTIONS``, declared there once); a command that
measures with it (sensitivity, toolchains ``--budget``) defaults to ``MEASURE_DEFAULTS`` instead:
:func:`scheme_options` gives those options with these defaults, :func:`measured_scheme` the scheme
from the values given."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

from passes.quantize import SCHEME_OPTIONS, Evaluator, QuantizePass, Scheme, prepare
from passes.quantize.budget import MEASURED_TOP
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.linears import group_of
from qvl_surgery.core.modelfile import Model
from qvl_surgery.core.passbase import Context, Option

# where a command measures with quantize's scheme, the default is w8a8 dynamic in onnxruntime format
# (weight-only with int4 weights: see measured_scheme)
MEASURE_DEFAULTS = {"activations": "int8", "format": "onnxruntime"}


def scheme_options() -> list[Option]:
    """quantize's scheme options with the measurement defaults: the flags of a command that measures."""
    return [dataclasses.replace(o, default=MEASURE_DEFAULTS.get(o.name, o.default),
                                help=o.help + ("; none with --weights int4" if o.name == "activations" else ""))
            for o in SCHEME_OPTIONS]


def measured_scheme(given: dict) -> Scheme:
    """The scheme from the values given (None or absent: not given), measurement defaults filled in;
    int4 weights without activations given are weight-only. Not checked: ``Scheme.block`` and
    ``check_budget_and_method`` do that."""
    unknown = sorted(set(given) - {o.name for o in SCHEME_OPTIONS})
    if unknown:
        raise TypeError(f"not a scheme option: {', '.join(unknown)} (known: {', '.join(o.name for o in SCHEME_OPTIONS)})")
    values = {o.name: o.default if given.get(o.name) is None else given[o.name] for o in scheme_options()}
    if values["weights"] == "int4" and given.get("activations") is None:
        values["activations"] = "none"
    return Scheme.of(values)


def sensitivity(model: Model, *, inputs: str | None = None, per_linear: bool = False, end_to_end: bool = False,
                reference: str | Path | None = None, progress: bool = False, **scheme) -> dict:
    """Per group of linears (each block, the merger, the patch embed) and, with ``per_linear``, per
    linear: the error (1 - token-centered cosine of the outputs against fp32) that quantizing it alone
    adds, beside its share of the linears' multiply-adds; and the cosine with every linear quantized
    (worst over the input sets). Per group, by default, the budget's estimate on the first input set
    (:meth:`~passes.quantize.Evaluator.estimated_alone_errors`: the first group, the last two and the
    ``MEASURED_TOP`` that look costliest per multiply-add measured end to end, the rest estimated); with
    ``end_to_end``, every group measured end to end on every input set (one run per group and set,
    each from its group on). Per linear: the model quantized and run whole for each. ``scheme``:
    quantize's scheme options by name (``weights``, ``activations``, ``format``, ``block_size``,
    ``calibrate``, ``calibrate_method``; :func:`measured_scheme` fills in the rest). ``inputs``: the
    measurement's input sets (default: ``calibrate``'s, else ``random:4``); ``calibrate`` makes the
    activation ranges of a static scheme, as in quantize."""
    s = measured_scheme(scheme)
    context = Context(reference=Path(reference) if reference else None, progress=progress)
    prep = prepare(model, context, QuantizePass(**dataclasses.asdict(s)).o)
    ev = Evaluator(prep, context, inputs or s.calibrate, "inputs" if inputs else "calibrate")
    out = {"scheme": prep.plan(prep.kept).label, "format": s.format, "target": s.target, "calibration": ev.what,
           "counted_by": ev.counted_by, "kept_by_scheme": prep.kept,
           "all_quantized_centered_cosine": round(ev.cosine(ev.todo), 7),
           "groups_measured": "end to end, every input set" if end_to_end else
           "estimated on the first input set (the first group, the last two and the "
           f"{MEASURED_TOP} costliest per multiply-add measured end to end)", "groups": []}
    if end_to_end:
        errors, measured = ev.alone_errors(len(ev.feeds)), set(ev.groups)
    else:
        errors, measured = ev.estimated_alone_errors()
    for g in ev.groups:
        out["groups"].append({"group": g, "share": round(ev.group_share[g], 6),
                              "alone_error": float(f"{errors[g]:.3e}"),
                              "measured": "end to end" if g in measured else "estimated"})
    if per_linear:
        out["linears"] = []
        for lin in ev.todo:
            c = ev.cosine([lin])
            out["linears"].append({"linear": lin.name, "group": group_of(lin.name),
                                   "share": round(ev.share[lin.name], 6), "alone_centered_cosine": round(c, 7),
                                   "alone_error": float(f"{1.0 - c:.3e}")})
    return out


def sensitivity_study(models: list[Path], output: Path, *, labels: list[str] | None = None, inputs: str | None = None,
                      per_linear: bool = False, end_to_end: bool = False, scheme: dict, overwrite: bool = False, progress: bool = True,
                      guard: list[Path] | None = None, echo: Callable[[str], None] = lambda line: None) -> list[dict]:
    """:func:`sensitivity` of each model under ``scheme`` (quantize's
    scheme options, checked), written to ``output``/sensitivity.json and sensitivity.png; ``echo``
    gets a line per model as it is measured, and one naming what was written."""
    from qvl_surgery.analysis.plots import plot_sensitivity
    from qvl_surgery.core.inputs import InputSource
    from qvl_surgery.core.modelfile import load_model
    from qvl_surgery.core.publish import check_new_dir, new_dir
    models = [Path(m) for m in models]
    if labels and len(labels) != len(models):
        raise BadInput("{label}: " + f"give one per model ({len(models)}), or none", label=",".join(labels))
    guard = list(guard) if guard is not None else [p for m in models for p in (m, *load_model(m).data_files())]
    for option, text in (("calibrate", scheme.get("calibrate")), ("inputs", inputs)):
        if text:
            guard += [Path(f) for f in InputSource.parse(text, option).files]
    check_new_dir(output, overwrite=overwrite, inputs=guard)
    results = []
    for i, m in enumerate(models):
        r = sensitivity(load_model(m), inputs=inputs, per_linear=per_linear, end_to_end=end_to_end, progress=progress,
                        **scheme)
        results.append({"model": str(m), "label": labels[i] if labels else m.stem, **r})
        worst = sorted(r["groups"], key=lambda g: -g["alone_error"])[:4]
        echo(f"{m}: {r['scheme']} ({r['format']}), every linear quantized: centered cosine "
             f"{r['all_quantized_centered_cosine']:.6f}; worst alone: "
             + ", ".join(f"{g['group']} {g['alone_error']:.2e}" for g in worst))
    out = Path(output)
    with new_dir(out, overwrite=overwrite, inputs=guard, command="sensitivity") as tmp:
        (tmp / "sensitivity.json").write_text(json.dumps({"models": results}, indent=1, allow_nan=False) + "\n")
        png = plot_sensitivity(results, tmp / "sensitivity.png")
    echo(f"wrote {out}/sensitivity.json" + (f" and {out}/sensitivity.png" if png else
                                            " (no plot: matplotlib is not installed; pip install matplotlib)"))
    return results
