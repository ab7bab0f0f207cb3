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
  ``random[:N]``), clip value by ``calibrate_method``.
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
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.graphinfo import with_graph
from qvl_surgery.core.modelfile import Model, read_initializer
from qvl_surgery.core.passbase import Context, Judgement, Option, Pass, PassReport, PassResult
from qvl_surgery.core import quant
from qvl_surgery.core.linears import (Linear, block_numbers, find_linears, group_of, kept_share,  # noqa: F401
                                 linear_macs, select_kept)

log = logging.getLogger(__name__)

F32 = TensorProto.FLOAT
MS = "com.microsoft"
NBITS_BLOCKS = (16, 32, 64, 128, 256)
DEFAULT_INT4_BLOCK = 32
DEFAULT_NBITS_INT8_BLOCK = 128
# Measured on the tiny model (random weights, 8 random inputs, centered cosine of w8a8 / w8a16 qdq
# against fp32): int8 percentile 0.999697, mse 0.999691, minmax 0.999525; int16 minmax 0.999913,
# percentile 0.999880 (16 bits have room for the tail: clipping it only costs).
DEFAULT_METHOD = {"int8": "percentile", "int16": "minmax"}
DEFAULT_CALIB_COUNT = 8


@dataclass(kw_only=True)
class QuantizeReport(PassReport):
    scheme: str = ""
    format: str = ""
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, list[str]] = field(default_factory=dict)        # reason -> node names
    ops: dict[str, int] = field(default_factory=dict)               # op types added
    opset: int = 0
    method: str = ""
    calibration: list[str] = field(default_factory=list)
    weight_bytes: list[int] = field(default_factory=list)           # [before, after]
    kept_share: list = field(default_factory=list)                  # [share of the linears' work, counted by]
    budget: dict = field(default_factory=dict)                      # allocate_budget's measurements

    def summary(self) -> list[str]:
        kept = sum(len(v) for v in self.kept.values())
        out = [f"quantize: {self.scheme} as {self.format} (opset {self.opset}): {len(self.quantized)} linears "
               f"quantized, {kept} kept float"]
        if self.budget:
            b = self.budget
            out.append(f"  budget: centered cosine {b['achieved']} (target {b['target_centered_cosine']}) with "
                       f"{', '.join(b['groups_kept']) or 'nothing'} kept float "
                       f"({100 * b['kept_share_of_multiply_adds']:.2f}% of the multiply-adds; {b['calibration']})")
            out.append("  gain when kept float alone: " + ", ".join(
                f"{s['group']} +{s['gain_kept_float']:.5f} ({100 * s['share']:.1f}%)" for s in b["sensitivity"][:5]))
        if self.kept_share:
            out.append(f"  kept float: {100 * self.kept_share[0]:.2f}% of the linear layers' {self.kept_share[1]}")
        for why, names in self.kept.items():
            out.append(f"  kept ({why}): {', '.join(names[:6])}" + (f" ... {len(names) - 6} more" if len(names) > 6 else ""))
        if self.ops:
            out.append("  ops: " + ", ".join(f"{k} x{v}" for k, v in self.ops.items()))
        if len(self.weight_bytes) == 2:
            b, a = self.weight_bytes
            out.append(f"  weights {b / 1e6:.1f} MB -> {a / 1e6:.1f} MB ({a / max(b, 1):.3f}x)")
        out += ["  " + line for line in self.calibration]
        out += [f"  skipped: {s}" for s in self.skipped]
        return out


# ----------------------------------------------------------------------------- plan

@dataclass
class QuantPlan:
    weights: str                 # int8 | int4
    activations: str             # int8 | int16 | none
    format: str                  # qdq | onnxruntime
    block: int | None            # None: per output channel
    method: str
    linears: list[Linear]        # to quantize
    kept: dict[str, str]
    ranges: dict[str, quant.ActivationRange]   # activation tensor -> range (static activations)
    opset: int

    @property
    def bits(self) -> int:
        return 4 if self.weights == "int4" else 8

    @property
    def dynamic_activations(self) -> bool:
        return self.format == "onnxruntime" and self.activations == "int8" and not self.ranges

    @property
    def scheme(self) -> str:
        w = "w8" if self.weights == "int8" else "w4"
        a = {"none": "", "int8": "a8", "int16": "a16"}[self.activations]
        blk = f" block {self.block}" if self.block else " per channel"
        dyn = " (dynamic)" if self.dynamic_activations else ""
        return f"{w}{a}{dyn}{blk}"


def check_scheme(*, weights: str, activations: str, format: str, block_size: int | None) -> int | None:
    """The block size the scheme uses (None: per channel), or a one-line refusal."""
    if weights == "int4" and activations != "none":
        raise BadInput("{weights}: int4 weights are weight-only; give {activations} (onnxruntime's MatMulNBits "
                       "with accuracy_level 4 quantizes activations to int8 itself)", weights="int4", activations="none")
    if format == "onnxruntime" and activations == "int16":
        raise BadInput("{format}: onnxruntime's CPU provider has no 16-bit integer matmul; use format qdq for "
                       "int16 activations", format=format)
    block = block_size
    if weights == "int4" and block is None:
        block = DEFAULT_INT4_BLOCK
    if format == "onnxruntime" and activations == "none" and block is None:
        block = DEFAULT_NBITS_INT8_BLOCK   # MatMulNBits is blockwise only
    if block is not None:
        if format == "onnxruntime" and activations != "none":
            raise BadInput("{block_size}: DynamicQuantizeMatMul / MatMulIntegerToFloat take per-channel "
                           "weight scales only; leave it out, or quantize weights only", block_size=block)
        if format == "onnxruntime" and block not in NBITS_BLOCKS:
            raise BadInput("{block_size}: MatMulNBits takes " + ", ".join(map(str, NBITS_BLOCKS)), block_size=block)
        if block < 2 or block & (block - 1):
            raise BadInput("{block_size}: not a power of two (e.g. 32, 64, 128)", block_size=block)
    return block


def _opset(model: Model) -> int:
    return next((o.version for o in model.proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def plan_quantize(model: Model, linears: list[Linear], kept: dict[str, str], *, weights: str, activations: str,
                  format: str, block: int | None, method: str,
                  ranges: dict[str, quant.ActivationRange]) -> QuantPlan:
    todo = [lin for lin in linears if lin.name not in kept]
    need = 13
    if format == "qdq" and (activations == "int16" or block is not None):
        need = 21   # int16 Q/DQ, blocked DQ, INT4
    return QuantPlan(weights, activations, format, block, method, todo, kept, ranges, max(_opset(model), need))


# ----------------------------------------------------------------------------- calibration

def calibrate_ranges(model: Model, tensors: list[str], *, source: str, method: str, dtype: str,
                     progress: bool, report: QuantizeReport) -> dict[str, quant.ActivationRange]:
    import time
    t0 = time.perf_counter()
    from qvl_surgery.core.calibrate import calibration_sets
    feeds, what = calibration_sets(model, source, DEFAULT_CALIB_COUNT)
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


# ----------------------------------------------------------------------------- emit

class _QuantEmitter:
    """Rebuilds the graph under a plan; every new weight tensor is a Computed source of one
    :class:`~qvl_surgery.core.quant.LazyQuant` per linear."""

    def __init__(self, model: Model, plan: QuantPlan, report: QuantizeReport):
        self.model, self.plan, self.report = model, plan, report
        self.inits = {t.name: t for t in model.graph.initializer}
        self.by_output = {lin.node.output[0]: lin for lin in plan.linears}
        self.new_inits: list[TensorProto] = []
        self.sources: dict[str, object] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.act_q: dict[str, str] = {}     # activation tensor -> its quantized / fake-quantized name
        self.used_weights: set[str] = set()

    # helpers -----------------------------------------------------------------------------
    def _count(self, op: str) -> None:
        self.report.ops[op] = self.report.ops.get(op, 0) + 1

    def _node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        self._count(op)

    def _const(self, name: str, value: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def _computed(self, name: str, dtype: int, dims: list[int], lazy: quant.LazyQuant, part: str,
                  nbytes: int) -> str:
        tp = TensorProto(name=name, data_type=dtype, dims=dims)
        tp.data_location = TensorProto.EXTERNAL
        self.new_inits.append(tp)
        self.sources[name] = lazy.source(part, nbytes)
        return name

    def _read_nk(self, lin: Linear):
        t, src = self.inits[lin.weight], self.model.sources.get(lin.weight)

        def read() -> np.ndarray:
            w = read_initializer(t, src)
            return np.asarray(w, np.float32) if lin.out_in else np.ascontiguousarray(np.asarray(w, np.float32).T)
        return read

    # activations ---------------------------------------------------------------------------
    def _fake_quant(self, x: str) -> str:
        """qdq: one QuantizeLinear -> DequantizeLinear per activation tensor."""
        if x in self.act_q:
            return self.act_q[x]
        r = self.plan.ranges[x]
        dt = np.int16 if self.plan.activations == "int16" else np.int8
        base = x.lstrip("/")
        s = self._const(f"{base}/act_scale", np.array(r.scale, np.float32))
        z = self._const(f"{base}/act_zero_point", np.array(0, dt))
        self._node("QuantizeLinear", [x, s, z], [f"{x}/quantized"], f"{x}/QuantizeLinear")
        self._node("DequantizeLinear", [f"{x}/quantized", s, z], [f"{x}/dequantized"], f"{x}/DequantizeLinear")
        self.act_q[x] = f"{x}/dequantized"
        return self.act_q[x]

    def _static_int8(self, x: str) -> tuple[str, str, str]:
        """onnxruntime static: one QuantizeLinear per activation tensor; (uint8 x, scale, zero point).
        The symmetric int8 grid shifted by 128 (the same values): onnxruntime's x86 kernels multiply
        uint8 by uint8 (the form DynamicQuantizeMatMul uses) at full speed, while int8 x int8 took 4.6x
        as long as that on an AVX2 CPU without VNNI (a 4-block model of the 3b's width)."""
        base = x.lstrip("/")
        s, z = f"{base}/act_scale", f"{base}/act_zero_point"
        if x not in self.act_q:
            self._const(s, np.array(self.plan.ranges[x].scale, np.float32))
            self._const(z, np.array(128, np.uint8))
            self._node("QuantizeLinear", [x, s, z], [f"{x}/quantized"], f"{x}/QuantizeLinear")
            self.act_q[x] = f"{x}/quantized"
        return self.act_q[x], s, z

    # one linear ------------------------------------------------------------------------------
    def _qdq(self, lin: Linear) -> None:
        p, n = self.plan, lin.node
        read = self._read_nk(lin)
        w = lin.weight
        if p.block is None:
            def quantize(a: np.ndarray) -> dict[str, np.ndarray]:
                q, s = quant.quantize_per_channel(a)
                return {"q": q if lin.out_in else np.ascontiguousarray(q.T), "s": s}
            scale_dims = [lin.n]
            attrs = {"axis": 0 if lin.out_in else 1}
        else:
            nb = quant.n_blocks(lin.k, p.block)

            def quantize(a: np.ndarray) -> dict[str, np.ndarray]:
                q, s = quant.quantize_blocked(a, p.bits, p.block, search=p.bits == 4)
                if not lin.out_in:
                    q, s = np.ascontiguousarray(q.T), np.ascontiguousarray(s.T)
                return {"q": q, "s": s}
            scale_dims = [lin.n, nb] if lin.out_in else [nb, lin.n]
            attrs = {"axis": 1 if lin.out_in else 0, "block_size": p.block}
        lazy = quant.LazyQuant(read, quantize)
        dims = [lin.n, lin.k] if lin.out_in else [lin.k, lin.n]
        count = lin.n * lin.k
        qtype = TensorProto.INT4 if p.bits == 4 else TensorProto.INT8
        # INT4 is stored packed, two codes a byte (ONNX's layout): the source makes the codes, the
        # writer packs them into (count + 1) // 2 bytes
        qname = self._computed(f"{w}_quantized", qtype, dims, lazy, "q", count if p.bits == 8 else (count + 1) // 2)
        sname = self._computed(f"{w}_scale", F32, scale_dims, lazy, "s", 4 * int(np.prod(scale_dims)))
        wf = f"{w}_dequantized"
        self._node("DequantizeLinear", [qname, sname], [wf], f"{lin.name}/DequantizeLinear_weight", **attrs)
        nn = onnx.NodeProto()
        nn.CopyFrom(n)
        nn.input[1] = wf
        if p.activations != "none":
            nn.input[0] = self._fake_quant(lin.x)
        self.nodes.append(nn)

    def _nbits(self, lin: Linear) -> None:
        p = self.plan
        bits, block = p.bits, p.block
        nb = quant.n_blocks(lin.k, block)
        blob = block * bits // 8

        def quantize(a: np.ndarray) -> dict[str, np.ndarray]:
            q, s = quant.quantize_blocked(a, bits, block, search=bits == 4, signed_scale=bits == 4)
            return {"q": quant.pack_nbits(q, bits, block), "s": s}
        lazy = quant.LazyQuant(self._read_nk(lin), quantize)
        w = lin.weight
        qname = self._computed(f"{w}_q{bits}", TensorProto.UINT8, [lin.n, nb, blob], lazy, "q", lin.n * nb * blob)
        sname = self._computed(f"{w}_scales", F32, [lin.n, nb], lazy, "s", 4 * lin.n * nb)
        self._node("MatMulNBits", [lin.x, qname, sname, "", "", lin.bias], [lin.node.output[0]],
                   f"{lin.name}_MatMulNBits", domain=MS, K=lin.k, N=lin.n, bits=bits, block_size=block,
                   accuracy_level=4)

    def _integer(self, lin: Linear) -> None:
        """Symmetric int8 weights [K, N], stored as uint8 with zero point 128, for
        DynamicQuantizeMatMul or MatMulIntegerToFloat (both then multiply uint8 by uint8)."""
        def quantize(a: np.ndarray) -> dict[str, np.ndarray]:
            q, s = quant.quantize_per_channel(a)
            return {"q": (np.ascontiguousarray(q.T).astype(np.int16) + 128).astype(np.uint8), "s": s}
        lazy = quant.LazyQuant(self._read_nk(lin), quantize)
        w = lin.weight
        qname = self._computed(f"{w}_quantized_kn", TensorProto.UINT8, [lin.k, lin.n], lazy, "q", lin.k * lin.n)
        sname = self._computed(f"{w}_scale", F32, [lin.n], lazy, "s", 4 * lin.n)
        zp = self._const(f"{w}_zero_point", np.full(lin.n, 128, np.uint8))
        out = lin.node.output[0]
        if self.plan.dynamic_activations:
            self._node("DynamicQuantizeMatMul", [lin.x, qname, sname, zp, lin.bias], [out],
                       f"{lin.name}_DynamicQuantizeMatMul", domain=MS)
        else:
            xq, s, z = self._static_int8(lin.x)
            self._node("MatMulIntegerToFloat", [xq, qname, s, sname, z, zp, lin.bias], [out],
                       f"{lin.name}_MatMulIntegerToFloat", domain=MS)

    # the graph -------------------------------------------------------------------------------
    def emit(self) -> Model:
        g, p = self.model.graph, self.plan
        for n in g.node:
            lin = self.by_output.get(n.output[0]) if n.output else None
            if lin is None:
                self.nodes.append(n)
            elif p.format == "qdq":
                self._qdq(lin)
            elif p.activations == "none":
                self._nbits(lin)
            else:
                self._integer(lin)
        read = {i for n in self.nodes for i in n.input}
        gone = {lin.weight for lin in p.linears} - read   # float weights the quantized copies replace
        for t in g.initializer:
            if t.name in gone:
                continue
            self.new_inits.append(t)
            if t.name in self.model.sources:
                self.sources[t.name] = self.model.sources[t.name]
        inputs = [i for i in g.input if i.name not in gone]
        ng = helper.make_graph(self.nodes, g.name, inputs, list(g.output), initializer=self.new_inits)
        out = with_graph(self.model, ng, self.sources)
        _set_opsets(out, p)
        return out


def _set_opsets(model: Model, plan: QuantPlan) -> None:
    proto = model.proto
    if _opset(model) < plan.opset:
        from onnx import version_converter
        converted = version_converter.convert_version(proto, plan.opset)
        del converted.graph.value_info[:]
        for k, n in enumerate(converted.graph.node):
            if not n.name:
                n.name = f"/quantize/opset{plan.opset}/{n.op_type}_{k}"
        proto.CopyFrom(converted)
    if plan.opset >= 21 or plan.bits == 4:
        proto.ir_version = max(proto.ir_version, 10)
    if plan.format == "onnxruntime" and not any(o.domain == MS for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS, 1))


# ----------------------------------------------------------------------------- entry points

@dataclass
class Prepared:
    """What a quantization of ``model`` is made from: the scheme checked, the linears found, the ones
    kept float and why, the calibrated activation ranges; ``build(kept)`` emits the quantized model
    in memory (weights computed when read) for measurements."""
    model: Model
    weights: str
    activations: str
    format: str
    block: int | None
    method: str
    linears: list[Linear]
    kept: dict[str, str]
    ranges: dict
    static: bool
    report: QuantizeReport

    def plan(self, kept: dict[str, str]) -> "QuantPlan":
        return plan_quantize(self.model, self.linears, kept, weights=self.weights, activations=self.activations,
                             format=self.format, block=self.block, method=self.method, ranges=self.ranges)

    def build(self, kept: dict[str, str]) -> Model:
        return _QuantEmitter(self.model, self.plan(kept), QuantizeReport()).emit()


def prepare(model: Model, context: Context, *, weights: str, activations: str, format: str,
             block_size: int | None, calibrate: str | None, calibrate_method: str | None, keep_node: list[str],
             keep_block: list[str]) -> Prepared:
    """match (find_linears, select_kept) -> calibrate."""
    block = check_scheme(weights=weights, activations=activations, format=format, block_size=block_size)
    blocks = block_numbers(keep_block)
    calibrate_method = calibrate_method or DEFAULT_METHOD.get(activations, "percentile")
    report = QuantizeReport(format=format, method=calibrate_method)
    linears = find_linears(model, report.misses)
    if context.explain:
        for line in report.misses:
            log.debug("quantize: no match at %s", line)
    if not linears:
        raise BadInput("quantize: the model has no linear layer (Gemm/MatMul with a float32 initializer weight); "
                       "is it already quantized?")
    kept = select_kept(linears, keep_nodes=keep_node, keep_blocks=blocks)
    if block and format == "qdq":   # a partial last block is valid ONNX, but OpenVINO refuses it
        for lin in linears:
            if lin.k % block and lin.name not in kept:
                kept[lin.name] = f"input dim not a multiple of block {block}"
    static = static_ranges(activations, format, calibrate)
    ranges: dict[str, quant.ActivationRange] = {}
    todo = [lin for lin in linears if lin.name not in kept]
    if not todo:
        raise BadInput(f"quantize: every one of the {len(linears)} linear layers is kept float "
                       "({keep_node} / {keep_block}); nothing would be quantized", keep_node="GLOB", keep_block="N")
    if static:
        if not calibrate:
            raise BadInput("{activations}: static ranges in qdq format need {calibrate} (an .npz, image files, or "
                           "random:N for random inputs)", activations=activations, calibrate="SRC")
        tensors = list(dict.fromkeys(lin.x for lin in todo))
        ranges = calibrate_ranges(model, tensors, source=calibrate, method=calibrate_method,
                                  dtype=activations, progress=context.progress,
                                  report=report)
    elif calibrate:
        report.skipped.append(f"calibrate={calibrate}: no static activations in this scheme")
    return Prepared(model, weights, activations, format, block, calibrate_method, linears, kept, ranges,
                     bool(static), report)


def _quantize(model: Model, context: Context, *, weights: str, activations: str, format: str,
              block_size: int | None, calibrate: str | None, calibrate_method: str | None, keep_node: list[str],
              keep_block: list[str], budget: float | None = None) -> tuple[Model, QuantizeReport]:
    """prepare (prepare) -> allocate (allocate_budget) -> plan (plan_quantize) -> emit (_QuantEmitter)."""
    prep = prepare(model, context, weights=weights, activations=activations, format=format, block_size=block_size,
                    calibrate=calibrate, calibrate_method=calibrate_method, keep_node=keep_node,
                    keep_block=keep_block)
    linears, kept, report, static, block = prep.linears, prep.kept, prep.report, prep.static, prep.block
    calibrate_method = prep.method
    if budget is not None:
        kept = allocate_budget(prep, context, budget=budget, calibrate=calibrate)
    plan = prep.plan(kept)
    report.scheme, report.opset = plan.scheme, plan.opset
    report.quantized = [lin.name for lin in plan.linears]
    for name, why in kept.items():
        report.kept.setdefault(why, []).append(name)
    if kept:
        share, by = kept_share(model, linears, kept)
        report.kept_share = [round(share, 5), by]
    out = _QuantEmitter(model, plan, report).emit()
    report.weight_bytes = [model.weight_bytes(), out.weight_bytes()]
    out.set_metadata("qvl_surgery.dtype", weights)
    out.set_metadata("qvl_surgery.quantize", json.dumps({
        "scheme": plan.scheme, "weights": weights, "activations": activations, "format": format,
        "block_size": block, "calibrate": calibrate if static else None,
        "calibrate_method": calibrate_method if static else None,
        "quantized": report.quantized, "kept": kept, "kept_share": report.kept_share, "ops": report.ops,
        "budget": report.budget or None}))
    return out, report


# ----------------------------------------------------------------------------- budget

class Evaluator:
    """Quantize-and-run measurements of one prepared quantization: the token-centered cosine of the
    outputs against fp32 on the calibration inputs, with a chosen set of linear groups (each block,
    the merger, the patch embed; :func:`~qvl_surgery.core.linears.group_of`) quantized. Every measurement
    emits the model and runs it whole (onnxruntime segments): nothing is estimated."""

    def __init__(self, prep: Prepared, context: Context, inputs: str | None, option: str = "calibrate"):
        from qvl_surgery.core.calibrate import calibration_sets
        self.prep = prep
        self.feeds, self.what = calibration_sets(prep.model, inputs or "random:4", 4, option=option)
        self.outputs = [o.name for o in prep.model.graph.output]
        self.ref = self._outputs_of(prep.model, self.feeds)
        self.todo = [lin for lin in prep.linears if lin.name not in prep.kept]
        self.groups: dict[str, list[Linear]] = {}
        for lin in self.todo:
            self.groups.setdefault(group_of(lin.name), []).append(lin)
        macs, self.counted_by = linear_macs(prep.model, prep.linears)
        total = sum(macs.values()) or 1
        self.share = {lin.name: macs[lin.name] / total for lin in prep.linears}
        self.group_share = {g: sum(self.share[lin.name] for lin in ls) for g, ls in self.groups.items()}

    def _outputs_of(self, m: Model, sets) -> list[dict[str, np.ndarray]]:
        from qvl_surgery.core.segments import run_segments
        got: list[dict[str, np.ndarray]] = [{} for _ in sets]
        idx = {o: 0 for o in self.outputs}

        def rec(name: str, v: np.ndarray) -> None:
            got[idx[name]][name] = np.asarray(v, np.float32)
            idx[name] += 1
        run_segments(m, sets, self.outputs, rec)
        return got

    def cosine(self, quantized: list[Linear], sets: int | None = None) -> float:
        """The worst centered cosine over the input sets with exactly ``quantized`` quantized."""
        from qvl_surgery.core.metrics import centered_cosine
        names = {lin.name for lin in quantized}
        keep = {lin.name: self.prep.kept.get(lin.name, "budget") for lin in self.prep.linears if lin.name not in names}
        use = self.feeds if sets is None else self.feeds[:sets]
        got = self._outputs_of(self.prep.build(keep), use)
        return min(centered_cosine(r[o], g[o]) for r, g in zip(self.ref, got) for o in self.outputs)

    def all_but(self, keep_groups: list[str], sets: int | None = None) -> float:
        keep = set(keep_groups)
        return self.cosine([lin for lin in self.todo if group_of(lin.name) not in keep], sets)


def allocate_budget(prep: Prepared, context: Context, *, budget: float, calibrate: str | None) -> dict[str, str]:
    """Keep the fewest multiply-adds float that bring the token-centered cosine of the outputs (against
    fp32, on the calibration inputs) to ``budget``. Sensitivity, per group of linears (each block, the
    merger, the patch embed): the cosine gained on the first input set when everything but that group
    is quantized. Groups are ranked by that gain per multiply-add; the shortest prefix of the ranking
    that meets the budget on every input set is found by bisection."""
    if not 0.0 < budget < 1.0:
        raise BadInput("{budget}: a token-centered cosine between 0 and 1, e.g. 0.9995", budget=budget)
    ev = Evaluator(prep, context, calibrate)
    groups, share = ev.groups, ev.group_share
    base = ev.all_but([], 1)
    gain = {g: ev.all_but([g], 1) - base for g in groups}
    order = sorted(groups, key=lambda g: -gain[g] / max(share[g], 1e-12))
    tried: dict[int, float] = {0: ev.all_but([])}
    k = 0
    if tried[0] < budget:
        lo, hi = 0, len(order)
        tried[hi] = 1.0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            tried[mid] = ev.all_but(order[:mid])
            lo, hi = (lo, mid) if tried[mid] >= budget else (mid, hi)
        k = hi
    chosen = dict(prep.kept)
    chosen.update({lin.name: "budget" for g in order[:k] for lin in groups[g]})
    prep.report.budget = {
        "target_centered_cosine": budget, "achieved": round(tried[k], 6), "groups_kept": order[:k],
        "kept_share_of_multiply_adds": round(sum(share[g] for g in order[:k]), 5), "calibration": ev.what,
        "evaluations": {str(n): round(v, 6) for n, v in sorted(tried.items())},
        "sensitivity": [{"group": g, "gain_kept_float": round(gain[g], 6), "share": round(share[g], 5)}
                        for g in sorted(groups, key=lambda g: -gain[g])],
    }
    return chosen


def static_ranges(activations: str, format: str, calibrate: str | None) -> bool:
    """Whether a scheme records static activation ranges: qdq always quantizes activations statically,
    onnxruntime format does when calibrated (else DynamicQuantizeMatMul scales them per run)."""
    return activations != "none" and (format == "qdq" or bool(calibrate))


def check_budget_and_method(v: dict) -> None:
    """Refuse, before any work, a budget outside (0, 1] and options the scheme would ignore."""
    import math
    b = v.get("budget")
    if b is not None and not (math.isfinite(b) and 0.0 < b <= 1.0):
        raise BadInput("{budget}: a token-centered cosine in (0, 1], e.g. 0.9995", budget=b)
    static = static_ranges(v["activations"], v["format"], v["calibrate"])
    if v["calibrate"] and v["activations"] == "none":
        raise BadInput("{calibrate}: weight-only quantization records no activation ranges; drop it, or give "
                       "{activations}", calibrate=v["calibrate"], activations="int8")
    if v["calibrate_method"] and not static:
        raise BadInput("{calibrate_method}: applies to static activation ranges (activations int8 / int16 with "
                       "{calibrate}); drop it", calibrate_method=v["calibrate_method"], calibrate="SRC")
    for pat in v.get("keep_node") or []:
        if not pat.strip():
            raise BadInput("{keep_node}: an empty pattern; give a node-name glob such as '/merger/*'", keep_node=pat)


class QuantizePass(Pass):
    name = "quantize"
    help = "int8 / int4 weights (int8 / int16 activations) for the linear layers, as QDQ or onnxruntime ops"
    example = ("qvl-surgery quantize model.onnx -o w8a8.onnx --weights int8 --activations int8 --format onnxruntime\n"
               "  qvl-surgery quantize model.onnx -o w4.onnx --weights int4 --block-size 32 --format onnxruntime\n"
               "  qvl-surgery quantize model.onnx -o w8a16.onnx --activations int16 --calibrate a.jpg,b.jpg\n"
               "  qvl-surgery quantize model.onnx -o w8a8.onnx --activations int8 --calibrate random:8 --keep-block 0")
    judgement = Judgement(atol=1.0, rtol=1.0, min_cosine=0.95, label="int8", min_centered_cosine=0.95)
    options = (
        Option("weights", str, "int8", "weight precision", choices=("int8", "int4")),
        Option("activations", str, "none", "activation precision (int8 in onnxruntime format without "
               "--calibrate: dynamic per tensor)", choices=("int8", "int16", "none")),
        Option("format", str, "qdq", "qdq: QuantizeLinear/DequantizeLinear (OpenVINO, TensorRT, NPUs); "
               "onnxruntime: its integer contrib ops", choices=("qdq", "onnxruntime")),
        Option("block_size", int, None, "weights in blocks of N input values, a power of two (MatMulNBits, "
               f"format onnxruntime: {', '.join(map(str, NBITS_BLOCKS))}; int4: default 32; onnxruntime weight-only "
               "int8: default 128)", metavar="N"),
        Option("calibrate", str, None, "activation ranges from an .npz, image file(s) (comma separated) or "
               "random:N", metavar="SRC"),
        Option("calibrate_method", str, None, "activation clip value from the |x| histogram (default: "
               "percentile 99.99 for int8, minmax for int16: measured best on the tiny model)", choices=quant.METHODS),
        Option("keep_node", list, None, "keep linears whose node name matches float, e.g. "
               "'/blocks.0/mlp/down_proj/*' (repeatable)", metavar="GLOB"),
        Option("keep_block", list, None, "keep every linear of block N float (repeatable)", metavar="N"),
        Option("budget", float, None, "keep the fewest multiply-adds float that bring the token-centered cosine "
               "(vs fp32, on the calibration inputs; default random:4) to this, e.g. 0.9995", metavar="COSINE"),
    )

    def preflight(self, facts: dict) -> None:
        v = {o.name: self.values.get(o.name, o.default) for o in self.options}
        check_scheme(weights=v["weights"], activations=v["activations"], format=v["format"],
                     block_size=v["block_size"])
        check_budget_and_method(v)
        if v["calibrate"]:
            from qvl_surgery.core.calibrate import check_calibration_source
            check_calibration_source(v["calibrate"], random_ok=True)

    def apply(self, model: Model, context: Context) -> PassResult:
        out, report = _quantize(model, context, **vars(self.o))
        return PassResult(out, report)


quantize_model = QuantizePass.function("quantize_model")
