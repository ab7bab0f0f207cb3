"""quantize: int8 / int4 weights (and int8 / int16 activations) for the weight-carrying linear layers.

Rules and limits:
- Only linears are quantized: ``Gemm`` whose B is an initializer (``transA=0``, ``alpha=beta=1``;
  the export's ``[out, in]`` weights with ``transB=1``, or ``[in, out]``) and ``MatMul`` whose B is
  a 2-D initializer. Patch embed and the merger's linears count. Attention's activation x
  activation MatMuls, Softmax, RMSNorm and the residual Adds stay float. ``keep_node`` /
  ``keep_block`` keep linears float; a linear that does not match says why (report ``misses``).
- Weights: int8 symmetric per output channel (or per ``block_size`` input values), int4
  symmetric in blocks of ``block_size`` (default 32) along the input dim, weight-only.
- Activations (int8 / int16): symmetric per tensor, one Q/DQ per distinct input tensor (gate and
  up share theirs), scale from streaming calibration (``calibrate``: an .npz, image files, or
  ``random[:N]``), clip value by ``calibrate_method``; or (``activation_scale=token``, int8 in
  format onnxruntime) one scale per token, max |row| / 127, computed at run time and handed to
  ``MatMulIntegerToFloat`` as its ``[M, 1]`` A scale.
- ``format=qdq``: QuantizeLinear / DequantizeLinear around the unchanged Gemm/MatMul (int8 weight
  initializer + per-axis DQ); opset raised to 21 where int16 or blocked DQ needs it.
  ``format=onnxruntime``: what its CPU provider runs in integer arithmetic: ``MatMulNBits``
  (weight-only, bits 8 or 4, accuracy_level 4 = int8 compute with per-block dynamic activation
  scales), ``DynamicQuantizeMatMul`` (int8 activations, dynamic per tensor; weights stored uint8
  with zero point 128: u8 x s8 saturates in 16 bits on AVX2 CPUs without VNNI, u8 x u8 does not),
  ``QuantizeLinear`` + ``MatMulIntegerToFloat`` (int8 activations, calibrated static scale,
  stored as uint8 with zero point 128 like the weights: onnxruntime's uint8 x uint8 kernel, not its
  slow int8 x int8 one on such CPUs).
- Weights are quantized tensor by tensor while the file is written (Computed sources); the codes
  and scales of one weight come from one read of it.

Modules: ``scheme`` (the scheme options, declared once, and their checks), ``plan``, ``calibration``,
``emit`` (the graph), ``budget`` (prepare, the evaluator, the budget allocation), ``report``.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

from qvl_surgery.core.linears import kept_share
from qvl_surgery.core.modelfile import Model
from qvl_surgery.core.passbase import Context, Judgement, Option, Pass, PassResult

from passes.quantize.budget import Evaluator, Prepared, allocate_budget, prepare
from passes.quantize.calibration import DEFAULT_CALIB_COUNT, calibrate_ranges
from passes.quantize.emit import _QuantEmitter
from passes.quantize.plan import QuantPlan, plan_quantize
from passes.quantize.report import QuantizeReport
from passes.quantize.scheme import (DEFAULT_METHOD, NBITS_BLOCKS, SCHEME_OPTIONS, Scheme, check_budget_and_method,
                                    check_scheme, static_ranges)

__all__ = ["QuantizePass", "quantize_model", "QuantizeReport", "Scheme", "SCHEME_OPTIONS", "check_scheme",
           "check_budget_and_method", "static_ranges", "QuantPlan", "plan_quantize", "calibrate_ranges",
           "prepare", "Prepared", "Evaluator", "allocate_budget", "DEFAULT_METHOD", "DEFAULT_CALIB_COUNT",
           "NBITS_BLOCKS"]


def _check_target(o: SimpleNamespace) -> None:
    if o.target != "onnxruntime" and o.budget is None:
        from qvl_surgery.core.errors import BadInput
        raise BadInput("{target}: the arithmetic a {budget} measures its plan in; without a budget there is nothing "
                       "to measure (the file is the same)", target=o.target, budget="COSINE")


def _quantize(model: Model, context: Context, o: SimpleNamespace) -> tuple[Model, QuantizeReport]:
    """prepare (prepare) -> allocate (allocate_budget) -> plan (plan_quantize) -> emit (_QuantEmitter).
    ``o``: the pass's options (``self.o``)."""
    _check_target(o)
    prep = prepare(model, context, o)
    linears, kept, report, scheme = prep.linears, prep.kept, prep.report, prep.scheme
    if o.budget is not None:
        kept = allocate_budget(prep, context, o.budget)
    plan = prep.plan(kept)
    report.scheme, report.opset = plan.label, plan.opset
    report.quantized = [lin.name for lin in plan.linears]
    for name, why in kept.items():
        report.kept.setdefault(why, []).append(name)
    if kept:
        share, by = kept_share(model, linears, kept)
        report.kept_share = [round(share, 5), by]
    out = _QuantEmitter(model, plan, report).emit()
    report.weight_bytes = [model.weight_bytes(), out.weight_bytes()]
    out.set_metadata("qvl_surgery.dtype", scheme.weights)
    out.set_metadata("qvl_surgery.quantize", json.dumps({
        "scheme": plan.label, "weights": scheme.weights, "activations": scheme.activations, "format": scheme.format,
        "block_size": plan.block, "activation_scale": scheme.activation_scale, "int8_kernel": scheme.int8_kernel, "target": scheme.target,
        "calibrate": scheme.calibrate if scheme.static else None,
        "calibrate_method": scheme.method if scheme.static else None,
        "quantized": report.quantized, "kept": kept, "kept_share": report.kept_share, "ops": report.ops,
        "budget": report.budget or None}))
    return out, report


class QuantizePass(Pass):
    name = "quantize"
    help = "int8 / int4 weights (int8 / int16 activations) for the linear layers, as QDQ or onnxruntime ops"
    example = ("qvl-surgery quantize model.onnx -o w8a8.onnx --weights int8 --activations int8 --format onnxruntime\n"
               "  qvl-surgery quantize model.onnx -o w4.onnx --weights int4 --block-size 32 --format onnxruntime\n"
               "  qvl-surgery quantize model.onnx -o w8a16.onnx --activations int16 --calibrate a.jpg,b.jpg\n"
               "  qvl-surgery quantize model.onnx -o w8a8.onnx --activations int8 --calibrate random:8 --keep-block 0")
    judgement = Judgement(atol=1.0, rtol=1.0, min_cosine=0.95, label="int8", min_centered_cosine=0.95)
    options = SCHEME_OPTIONS + (
        Option("keep_node", list, None, "keep linears whose node name matches float, e.g. "
               "'/blocks.0/mlp/down_proj/*' (repeatable)", metavar="GLOB"),
        Option("keep_block", list, None, "keep every linear of block N float (repeatable)", metavar="N"),
        Option("budget", float, None, "keep the fewest multiply-adds float that bring the token-centered cosine "
               "(vs fp32, on the calibration inputs; default random:4) to this, e.g. 0.9995", metavar="COSINE"),
    )

    def preflight(self, facts: dict) -> None:
        _check_target(self.o)
        Scheme.of(self.o).block   # resolving the block size checks the scheme (check_scheme)
        check_budget_and_method(vars(self.o))
        if self.o.calibrate:
            from qvl_surgery.core.calibrate import check_calibration_source
            check_calibration_source(self.o.calibrate, random_ok=True)

    def apply(self, model: Model, context: Context) -> PassResult:
        out, report = _quantize(model, context, self.o)
        return PassResult(out, report)


quantize_model = QuantizePass.function("quantize_model")
