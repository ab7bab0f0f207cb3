"""fp16: convert a float32 model to float16 (or bfloat16: ``dtype``), keeping whole patterns as
float32 islands.

Rules:
- Every node runs in fp16 unless it is *kept*: by pattern (``keep_silu_fp32``: each x*sigmoid(x),
  Sigmoid and Mul together; ``keep_rmsnorm_fp32``: Pow, ReduceMean, Add eps, Sqrt, Div (or
  Reciprocal/Mul) and the scale Mul), by op type (``keep_op``), by node-name glob
  (``keep_node``), or by calibration (``calibrate``: inputs, an .npz or image files, run through
  the fp32 model; every node whose values come within ``calibrate_margin`` of fp16's range is
  kept, see :mod:`qvl_surgery.core.calibrate`).
- Casts are inserted only where precision changes, once per tensor and direction, so an island
  reads each input through one Cast, has no Cast inside, and adjacent islands merge into one.
  A tensor already available in the wanted precision (an fp32 graph input under
  ``keep_io_types``) is used directly: no Cast pairs.
- Weights are converted tensor by tensor while the output is written (never all in memory).
  A weight read by fp16 and fp32 nodes is stored twice (``name`` in fp16, ``name__fp32``).
  Finite values outside fp16's range are clamped to +-65504 and counted in the report;
  +-inf (masks) stays +-inf; tiny values such as eps keep their meaning (1e-6 is an fp16
  subnormal), and a non-zero constant that would round to zero is reported.
- Graph inputs and outputs become fp16 unless ``keep_io_types``.
- ``dtype="bfloat16"``: the same islands and Casts with bfloat16 in place of float16; weights are
  rounded to nearest even by ml_dtypes (numpy has no bfloat16). bfloat16 has float32's range, so
  nothing is clamped and ``calibrate`` (which keeps what comes near fp16's 65504) is not run: the
  report says so. onnxruntime's CPU provider has no bfloat16 arithmetic; such files run in OpenVINO
  or under emulation (:mod:`qvl_surgery.core.emulate`).
"""
from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.graphinfo import elem_types, side_inputs, constant_tensors, with_graph
from qvl_surgery.core.patterns import rmsnorm_patterns, sigmoid_mul_patterns
from qvl_surgery.core.modelfile import Computed, Model, read_initializer
from qvl_surgery.core.passbase import Context, Judgement, Option, Pass, PassReport, PassResult

log = logging.getLogger(__name__)

F32, F16, BF16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16
FP16_MAX = 65504.0
# the dtype option's values: element type, short tag (Cast and tensor names, report), metadata name
LOW_TYPES = {"float16": F16, "bfloat16": BF16}
TAGS = {F32: "fp32", F16: "fp16", BF16: "bf16"}


@dataclass
class Fp16Report(PassReport):
    kept: dict[str, list[str]] = field(default_factory=dict)   # reason -> node names
    casts: int = 0
    converted_weights: int = 0
    duplicated_weights: list[str] = field(default_factory=list)
    clamped: dict[str, int] = field(default_factory=dict)       # tensor -> values clamped (filled while saving)
    underflow: dict[str, int] = field(default_factory=dict)
    calibration: list[str] = field(default_factory=list)
    dtype: str = "float16"                                       # the reduced type: float16 or bfloat16

    @property
    def low(self) -> int:
        return LOW_TYPES[self.dtype]

    @property
    def kept_nodes(self) -> set[str]:
        return {n for names in self.kept.values() for n in names}

    def summary(self) -> list[str]:
        out = list(self.calibration)
        out += [f"{TAGS[self.low]}: {self.converted_weights} weights converted, {len(self.kept_nodes)} nodes kept "
                f"in fp32, {self.casts} Casts inserted"]
        for reason, names in self.kept.items():
            out.append(f"  kept ({reason}): {len(names)} nodes" + (f", e.g. {names[0]}" if names else ""))
        if self.duplicated_weights:
            out.append(f"  {len(self.duplicated_weights)} weights read by fp16 and fp32 nodes: stored in both")
        if self.clamped:
            out.append(f"  clamped to +-65504: {sum(self.clamped.values())} values in {len(self.clamped)} tensors "
                       f"(e.g. {next(iter(self.clamped))})")
        if self.underflow:
            out.append(f"  non-zero values that round to 0 in {TAGS[self.low]}: {sum(self.underflow.values())} in "
                       f"{len(self.underflow)} tensors")
        for s in self.skipped:
            out.append(f"  skipped: {s}")
        return out


# ----------------------------------------------------------------------------- pattern matching

def _check_keep_ops(ops: Iterable[str]) -> None:
    for op in ops:
        if not onnx.defs.has(op):
            raise BadInput("{keep_op}: not an ONNX op type (e.g. Sigmoid, Softmax, ReduceMean, Pow)", keep_op=op)


# ----------------------------------------------------------------------------- conversion

def _float_types(model: Model) -> dict[str, int]:
    """Element type of every tensor (graphinfo.elem_types), refusing a graph where one is unknown."""
    types = elem_types(model)
    missing = [o for n in model.graph.node for o in n.output if o and o not in types]
    if missing:
        raise BadInput(f"fp16: cannot tell the type of tensor {missing[0]!r} (shape inference found none); "
                       "the model needs value_info for it")
    return types


def _to_low(arr: np.ndarray, name: str, report: Fp16Report) -> np.ndarray:
    """``arr`` in the report's reduced type: fp16 clamps finite values to +-65504; bf16 (float32's
    range) is ml_dtypes' round to nearest even."""
    a = np.asarray(arr, dtype=np.float32)
    if report.low == BF16:
        out = a.astype(ml_dtypes.bfloat16)
    else:
        out = _clamped(a, name, report).astype(np.float16)
    if a.size and a.size <= 1 << 16:
        under = int(np.count_nonzero((a != 0) & (out == 0)))
        if under:
            report.underflow[name] = under
    return out


def _clamped(a: np.ndarray, name: str, report: Fp16Report) -> np.ndarray:
    if a.size:
        hi, lo = float(a.max()), float(a.min())
        if hi > FP16_MAX or lo < -FP16_MAX:
            finite_big = np.isfinite(a) & (np.abs(a) > FP16_MAX)
            n = int(np.count_nonzero(finite_big))
            if n:
                report.clamped[name] = n
                a = np.where(finite_big, np.sign(a) * FP16_MAX, a)
    return a


def _low_source(t: TensorProto, src, report: Fp16Report) -> Computed:
    def make() -> np.ndarray:
        return _to_low(read_initializer(t, src), t.name, report)
    return Computed(make, int(np.prod(t.dims, dtype=np.int64)) * 2)


# ----------------------------------------------------------------------------- match: which nodes stay fp32

def select_fp32_nodes(model: Model, report: Fp16Report, *, keep_silu_fp32: bool, keep_rmsnorm_fp32: bool, keep_op: list[str],
                keep_node: list[str], keep_calibrated: dict[str, str] | None, explain: bool) -> dict[str, str]:
    """Nodes kept in fp32, by first output (unique in SSA form; protobuf wrappers have no stable
    id()), with the reason; the report lists them by name."""
    g = model.graph
    kept: dict[str, str] = {}

    def keep(nodes: Iterable[onnx.NodeProto], reason: str) -> None:
        for n in nodes:
            if n.output[0] not in kept:
                kept[n.output[0]] = reason
                report.kept.setdefault(reason, []).append(n.name)

    if keep_silu_fp32:
        pats = sigmoid_mul_patterns(g)
        if not pats:
            report.skipped.append("keep_silu_fp32: no x*sigmoid(x) pattern in this model")
        for sig, mul in pats:
            keep([sig, mul], "silu")
    if keep_rmsnorm_fp32:
        why: list[str] = []
        pats = rmsnorm_patterns(model, why)
        report.misses += why
        if explain:
            for line in why:
                log.debug("rmsnorm: no match at %s", line)
        if not pats:
            report.skipped.append("keep_rmsnorm_fp32: no RMSNorm pattern (Pow 2 -> ReduceMean -> Add -> Sqrt -> Div)")
        for nodes in pats:
            keep(nodes, "rmsnorm")
    for op in keep_op:
        keep([n for n in g.node if n.op_type == op], f"op {op}")
    for pat in keep_node:
        hits = [n for n in g.node if fnmatch.fnmatchcase(n.name, pat)]
        if not hits:
            raise BadInput("{keep_node}: matches no node name (names look like "
                           + repr(g.node[len(g.node) // 2].name) + ")", keep_node=pat)
        keep(hits, f"node {pat}")
    if keep_calibrated:
        by_name = {n.name: n for n in g.node}
        keep([by_name[k] for k in keep_calibrated if k in by_name], "calibration")
    # The dynamic export computes its tables (rotary cos/sin from positions up to the grid side,
    # masks) from image_grid_thw: in fp16, position * frequency near 100 would be off by up to
    # 0.03 before the cos. They stay fp32, as the static export's precomputed constants are made
    # in fp32; their readers get them through one Cast.
    side = side_inputs(model)
    if side:
        tables = constant_tensors(g, side) - constant_tensors(g)
        floats = {name for name, t in _float_types(model).items() if t == F32}
        keep([n for n in g.node if n.output[0] in tables and any(o in floats for o in n.output)], "grid tables")
    return kept


# ----------------------------------------------------------------------------- plan: precisions

@dataclass
class Fp16Plan:
    kept: dict[str, str]          # first output -> reason
    types: dict[str, int]         # element type of every tensor
    floats: set[str]              # float32 initializers
    low_readers: set[str]         # float32 initializers read by a reduced-precision node
    want_io: int                  # element type of float graph inputs and outputs
    low: int = F16                # the reduced type: F16 or BF16

    def precision(self, node: onnx.NodeProto) -> int:
        return F32 if node.output[0] in self.kept else self.low

    def is_float(self, name: str) -> bool:
        return self.types.get(name) == F32


def plan_fp16(model: Model, kept: dict[str, str], *, keep_io_types: bool, low: int = F16) -> Fp16Plan:
    g = model.graph
    floats = {t.name for t in g.initializer if t.data_type == F32}
    if not floats and not any(i.type.tensor_type.elem_type == F32 for i in g.input):
        raise BadInput("fp16: the model has no float32 tensors; is it already fp16?")
    plan = Fp16Plan(kept, _float_types(model), floats, set(), F32 if keep_io_types else low, low)
    plan.low_readers = {i for n in g.node if plan.precision(n) == low for i in n.input if i in floats}
    return plan


# ----------------------------------------------------------------------------- emit: the new graph

class _Fp16Emitter:
    """Rebuilds the graph under a plan: Casts only where precision changes, once per tensor and
    direction; weights converted lazily (Computed sources) and stored twice only when read in both.
    The reduced type is the plan's (fp16 or bf16); names below say "low" for it."""

    def __init__(self, model: Model, plan: Fp16Plan, report: Fp16Report):
        self.model, self.plan, self.report = model, plan, report
        self.inits = {t.name: t for t in model.graph.initializer}
        self.new_inits: dict[str, TensorProto] = {}
        self.sources: dict[str, object] = {}
        self.versions: dict[str, dict[int, str]] = {}   # tensor -> {dtype: name carrying it}
        self.nodes: list[onnx.NodeProto] = []
        self.renamed: dict[str, str] = {}

    def weight(self, name: str, dt: int) -> str:
        t = self.inits[name]
        low = dt == self.plan.low
        key = name if (low or name not in self.plan.low_readers) else name + "__fp32"
        if key in self.new_inits:
            return key
        nt = TensorProto()
        nt.CopyFrom(t)
        if low:
            nt.data_type = dt
            nt.ClearField("raw_data")
            nt.ClearField("float_data")
            src = self.model.sources.get(name)
            if src is None and int(np.prod(t.dims, dtype=np.int64)) < 4096:
                nt.CopyFrom(numpy_helper.from_array(_to_low(numpy_helper.to_array(t), name, self.report), name))
            else:
                nt.data_location = TensorProto.EXTERNAL
                self.sources[name] = _low_source(t, src, self.report)
            self.report.converted_weights += 1
        else:
            nt.name = key
            if name in self.model.sources:
                self.sources[key] = self.model.sources[name]
            if key != name:
                self.report.duplicated_weights.append(name)
        self.new_inits[key] = nt
        return key

    def tensor(self, name: str, dt: int) -> str:
        """``name`` in precision ``dt``: the weight's version, or a Cast made once."""
        if name in self.plan.floats:
            return self.weight(name, dt)
        have = self.versions[name]
        if dt in have:
            return have[dt]
        src_name = next(iter(have.values()))
        tag = TAGS[dt]
        out = f"{name}__{tag}"
        self.nodes.append(helper.make_node("Cast", [src_name], [out], name=f"{name}/Cast_to_{tag}", to=dt))
        self.report.casts += 1
        have[dt] = out
        return out

    def io_value(self, v: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
        nv = onnx.ValueInfoProto()
        nv.CopyFrom(v)
        if self.plan.is_float(v.name):
            nv.type.tensor_type.elem_type = self.plan.want_io
        return nv

    def node(self, n: onnx.NodeProto, out_names: set[str]) -> None:
        p = self.plan.precision(n)
        nn = onnx.NodeProto()
        nn.CopyFrom(n)
        for k, i in enumerate(n.input):
            if i and (self.plan.is_float(i) or i in self.plan.floats):
                nn.input[k] = self.tensor(i, p)
        if n.op_type == "Cast":
            for a in nn.attribute:
                if a.name == "to" and a.i in (F32, self.plan.low):
                    a.i = p
        for a in nn.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F32 and p == self.plan.low:
                a.t.CopyFrom(numpy_helper.from_array(_to_low(numpy_helper.to_array(a.t), n.name, self.report),
                                                     a.t.name))
        for k, o in enumerate(n.output):
            if o and self.plan.is_float(o):
                if o in out_names and p != self.plan.want_io:
                    nn.output[k] = self.renamed[o] = f"{o}__{TAGS[p]}"
                self.versions[o] = {p: nn.output[k]}
        self.nodes.append(nn)

    def emit(self) -> Model:
        g = self.model.graph
        inputs = []
        for i in g.input:
            if i.name in self.inits:
                continue
            if self.plan.is_float(i.name):
                self.versions[i.name] = {self.plan.want_io: i.name}
            inputs.append(self.io_value(i))
        out_names = {o.name for o in g.output}
        for n in g.node:
            self.node(n, out_names)
        for o in g.output:
            if o.name in self.renamed:
                self.nodes.append(helper.make_node("Cast", [self.renamed[o.name]], [o.name],
                                                   name=f"{o.name}/Cast_output", to=self.plan.want_io))
                self.report.casts += 1
        inits = list(self.new_inits.values())
        for t in g.initializer:  # non-float initializers unchanged
            if t.name not in self.plan.floats:
                inits.append(t)
                if t.name in self.model.sources:
                    self.sources[t.name] = self.model.sources[t.name]
        # value_info is dropped (types changed); passes that need it re-infer
        ng = helper.make_graph(self.nodes, g.name, inputs, [self.io_value(o) for o in g.output], initializer=inits)
        return with_graph(self.model, ng, self.sources)


def _calibrate(model: Model, source: str, margin: float, reference: str | Path | None,
               report: Fp16Report) -> dict[str, str]:
    from qvl_surgery.core.calibrate import calibrate, calibration_inputs
    ref = Path(reference) if reference is not None else model.path
    if ref is None:
        raise BadInput("{calibrate} needs the fp32 model as a file: give reference= (the fp32 export) or load "
                       "the model from its file", calibrate=source)
    cal = calibrate(ref, calibration_inputs(ref, source), margin=margin)
    report.calibration = cal.lines()
    return cal.keep


# onnxruntime's CPU provider runs most fp16 ops in fp32 and no bf16 op at all: the error shows under
# emulation only. bf16 keeps 8 significant bits to fp16's 11 (about 8x the rounding error).
JUDGEMENTS = {
    "float16": Judgement(atol=5e-2, rtol=5e-2, min_cosine=0.999, emulate="fp16", label="fp16"),
    "bfloat16": Judgement(atol=2e-1, rtol=2e-1, min_cosine=0.995, emulate="bf16", label="bf16",
                          min_centered_cosine=0.99),
}


class Fp16Pass(Pass):
    name = "fp16"
    help = "convert to fp16 (or bf16: --dtype bfloat16) with whole-pattern fp32 islands"
    example = ("qvl-surgery fp16 out/model.onnx -o out/fp16.onnx --keep-silu-fp32\n"
               "  qvl-surgery fp16 out/model.onnx -o out/fp16.onnx --keep-rmsnorm-fp32 --keep-node "
               "'/blocks.31/mlp/down_proj/*'\n"
               "  qvl-surgery fp16 out/model.onnx -o out/fp16.onnx --calibrate calib.npz\n"
               "  qvl-surgery fp16 out/model.onnx -o out/bf16.onnx --dtype bfloat16 --keep-rmsnorm-fp32\n"
               "  qvl-surgery fp16 out/model.onnx -o out/fp16.onnx --keep-silu-fp32 --gen-script   # print the Python")
    options = (
        Option("dtype", str, "float16", "the reduced type: bfloat16 has float32's range and 8 significant bits "
               "(runs in OpenVINO or under emulation, not in onnxruntime's CPU provider)",
               choices=tuple(LOW_TYPES)),
        Option("keep_silu_fp32", bool, False, "keep each x*sigmoid(x) (Sigmoid + Mul) in fp32"),
        Option("keep_rmsnorm_fp32", bool, False, "keep each RMSNorm (Pow, ReduceMean, Add eps, Sqrt, Div, scale) "
               "in fp32"),
        Option("keep_op", list, None, "keep every node of this op type (repeatable)",
               metavar="TYPE"),
        Option("keep_node", list, None, "keep nodes whose name matches, e.g. '/blocks.31/mlp/down_proj/*' "
               "(repeatable)", metavar="GLOB"),
        Option("keep_io_types", bool, False, "keep float32 graph inputs and outputs"),
        Option("calibrate", str, None, "an .npz of inputs or image file(s), comma separated: keep in fp32 every "
               "node whose values come within calibrate_margin of fp16's range on the fp32 model",
               metavar="INPUTS"),
        Option("calibrate_margin", float, 0.5, "fraction of 65504"),
    )

    @property
    def judgement(self) -> Judgement:  # type: ignore[override]  # per instance: it depends on dtype
        return JUDGEMENTS[self.values.get("dtype", "float16")]

    def preflight(self, facts: dict) -> None:
        if self.values.get("calibrate"):
            from qvl_surgery.core.calibrate import check_calibration_source
            check_calibration_source(self.values["calibrate"])

    def apply(self, model: Model, context: Context) -> PassResult:
        """match (select_fp32_nodes) -> plan (plan_fp16) -> emit (_Fp16Emitter)."""
        o = self.o
        keep_op, keep_node, calibrate = list(o.keep_op), list(o.keep_node), o.calibrate
        _check_keep_ops(keep_op)
        report = Fp16Report(dtype=o.dtype)
        if calibrate and o.dtype == "bfloat16":
            report.skipped.append("calibrate: not run; bfloat16 has float32's range (max 3.4e38), so no value comes "
                                  "near an overflow (calibration keeps what comes near fp16's 65504)")
            calibrate = None
        keep_calibrated = (_calibrate(model, calibrate, o.calibrate_margin, context.reference, report)
                           if calibrate else None)
        kept = select_fp32_nodes(model, report, keep_silu_fp32=o.keep_silu_fp32, keep_rmsnorm_fp32=o.keep_rmsnorm_fp32,
                           keep_op=keep_op, keep_node=keep_node, keep_calibrated=keep_calibrated, explain=context.explain)
        plan = plan_fp16(model, kept, keep_io_types=o.keep_io_types, low=report.low)
        out = _Fp16Emitter(model, plan, report).emit()
        out.set_metadata("qvl_surgery.dtype", o.dtype)
        out.set_metadata("qvl_surgery.fp16_kept", json.dumps({r: len(v) for r, v in report.kept.items()}))
        return PassResult(out, report)


convert_fp16 = Fp16Pass.function("convert_fp16")
