"""fp16: convert a float32 model to float16, keeping whole patterns as float32 islands.

Rules:
- Every node runs in fp16 unless it is *kept*: by pattern (``keep_silu``: each x*sigmoid(x),
  Sigmoid and Mul together; ``keep_rmsnorm``: Pow, ReduceMean, Add eps, Sqrt, Div (or
  Reciprocal/Mul) and the scale Mul), by op type (``keep_ops``), by node-name glob
  (``keep_nodes``), or by calibration (``keep_calibrated``: names of nodes whose values come
  close to fp16's range, see :mod:`qvl_surgery.calibrate`).
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
"""
from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qvl_surgery.errors import BadInput
from qvl_surgery.graphinfo import infer_graph
from qvl_surgery.inspect import consumers, sigmoid_mul_patterns
from qvl_surgery.modelfile import Computed, Model, read_initializer

log = logging.getLogger(__name__)

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = 65504.0


@dataclass
class Fp16Report:
    kept: dict[str, list[str]] = field(default_factory=dict)   # reason -> node names
    casts: int = 0
    converted_weights: int = 0
    duplicated_weights: list[str] = field(default_factory=list)
    clamped: dict[str, int] = field(default_factory=dict)       # tensor -> values clamped (filled while saving)
    underflow: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def kept_nodes(self) -> set[str]:
        return {n for names in self.kept.values() for n in names}

    def lines(self) -> list[str]:
        out = [f"fp16: {self.converted_weights} weights converted, {len(self.kept_nodes)} nodes kept in fp32, "
               f"{self.casts} Casts inserted"]
        for reason, names in self.kept.items():
            out.append(f"  kept ({reason}): {len(names)} nodes" + (f", e.g. {names[0]}" if names else ""))
        if self.duplicated_weights:
            out.append(f"  {len(self.duplicated_weights)} weights read by fp16 and fp32 nodes: stored in both")
        if self.clamped:
            out.append(f"  clamped to +-65504: {sum(self.clamped.values())} values in {len(self.clamped)} tensors "
                       f"(e.g. {next(iter(self.clamped))})")
        if self.underflow:
            out.append(f"  non-zero values that round to 0 in fp16: {sum(self.underflow.values())} in "
                       f"{len(self.underflow)} tensors")
        for s in self.skipped:
            out.append(f"  skipped: {s}")
        return out


# ----------------------------------------------------------------------------- pattern matching

def _const_value(model: Model, name: str) -> np.ndarray | None:
    inits = model.initializers()
    if name in inits and int(np.prod(inits[name].dims, dtype=np.int64)) <= 16:
        return read_initializer(inits[name], model.sources.get(name))
    return None


def rmsnorm_patterns(model: Model, explain: list[str] | None = None) -> list[list[onnx.NodeProto]]:
    """Pow(x,2) -> ReduceMean -> Add(eps) -> Sqrt -> Div(x, .) [or Reciprocal -> Mul(x, .)] -> Mul(scale)."""
    g = model.graph
    cons = consumers(g)

    def only(t: str, op: str, why: str, node: onnx.NodeProto) -> onnx.NodeProto | None:
        cs = [c for c in cons.get(t, []) if c.op_type == op]
        if len(cs) != 1:
            if explain is not None:
                explain.append(f"{node.name}: {why} (found {[c.op_type for c in cons.get(t, [])]})")
            return None
        return cs[0]

    found = []
    for pw in g.node:
        if pw.op_type != "Pow":
            continue
        e = _const_value(model, pw.input[1])
        if e is None or float(np.asarray(e).reshape(-1)[0]) != 2.0:
            if explain is not None:
                explain.append(f"{pw.name}: exponent is not the constant 2")
            continue
        x = pw.input[0]
        rm = only(pw.output[0], "ReduceMean", "Pow is not followed by one ReduceMean", pw)
        if rm is None:
            continue
        add = only(rm.output[0], "Add", "ReduceMean is not followed by Add(eps)", rm)
        if add is None:
            continue
        sq = only(add.output[0], "Sqrt", "Add(eps) is not followed by Sqrt", add)
        if sq is None:
            continue
        nodes = [pw, rm, add, sq]
        div = [c for c in cons.get(sq.output[0], []) if c.op_type == "Div" and c.input[0] == x]
        if div:
            nodes.append(div[0])
            last = div[0]
        else:
            rc = only(sq.output[0], "Reciprocal", "Sqrt is not followed by Div(x, .) or Reciprocal", sq)
            if rc is None:
                continue
            mul = [c for c in cons.get(rc.output[0], []) if c.op_type == "Mul" and x in c.input]
            if not mul:
                if explain is not None:
                    explain.append(f"{rc.name}: Reciprocal is not multiplied by x")
                continue
            nodes += [rc, mul[0]]
            last = mul[0]
        scale = [c for c in cons.get(last.output[0], []) if c.op_type == "Mul"]
        if len(scale) == 1 and any(i in model.initializers() for i in scale[0].input):
            nodes.append(scale[0])
        found.append(nodes)
    return found


def _check_keep_ops(ops: Iterable[str]) -> None:
    for op in ops:
        if not onnx.defs.has(op):
            raise BadInput(f"--keep-op {op}: not an ONNX op type (e.g. Sigmoid, Softmax, ReduceMean, Pow)")


# ----------------------------------------------------------------------------- conversion

def _float_types(model: Model) -> dict[str, int]:
    """Element type of every tensor (graphinfo.infer_graph: weightless shape inference)."""
    g = infer_graph(model)
    types = {t.name: t.data_type for t in g.initializer}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    missing = [o for n in g.node for o in n.output if o and o not in types]
    if missing:
        raise BadInput(f"fp16: cannot tell the type of tensor {missing[0]!r} (shape inference found none); "
                       "the model needs value_info for it")
    return types


def _to_fp16(arr: np.ndarray, name: str, report: Fp16Report) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float32)
    if a.size:
        hi, lo = float(a.max()), float(a.min())
        if hi > FP16_MAX or lo < -FP16_MAX:
            finite_big = np.isfinite(a) & (np.abs(a) > FP16_MAX)
            n = int(np.count_nonzero(finite_big))
            if n:
                report.clamped[name] = n
                a = np.where(finite_big, np.sign(a) * FP16_MAX, a)
    out = a.astype(np.float16)
    if a.size and a.size <= 1 << 16:
        under = int(np.count_nonzero((a != 0) & (out == 0)))
        if under:
            report.underflow[name] = under
    return out


def _fp16_source(t: TensorProto, src, report: Fp16Report) -> Computed:
    def make() -> np.ndarray:
        return _to_fp16(read_initializer(t, src), t.name, report)
    return Computed(make, int(np.prod(t.dims, dtype=np.int64)) * 2)


def convert_fp16(model: Model, *, keep_silu: bool = False, keep_rmsnorm: bool = False,
                 keep_ops: Iterable[str] = (), keep_nodes: Iterable[str] = (),
                 keep_calibrated: dict[str, str] | None = None, keep_io_types: bool = False,
                 explain: bool = False) -> tuple[Model, Fp16Report]:
    keep_ops, keep_nodes = list(keep_ops), list(keep_nodes)
    _check_keep_ops(keep_ops)
    g = model.graph
    report = Fp16Report()
    floats = {t.name for t in g.initializer if t.data_type == F32}
    if not floats and not any(i.type.tensor_type.elem_type == F32 for i in g.input):
        raise BadInput("fp16: the model has no float32 tensors; is it already fp16?")
    types = _float_types(model)
    is_float = lambda name: types.get(name) == F32  # noqa: E731

    # 1. which nodes stay fp32, and why
    # Nodes are identified by their first output (unique in SSA form): protobuf wrapper
    # objects are not stable, so id() cannot be used.
    kept: dict[str, str] = {}

    def keep(nodes: Iterable[onnx.NodeProto], reason: str) -> None:
        for n in nodes:
            if n.output[0] not in kept:
                kept[n.output[0]] = reason
                report.kept.setdefault(reason, []).append(n.name)

    if keep_silu:
        pats = sigmoid_mul_patterns(g)
        if not pats:
            report.skipped.append("--keep-silu-fp32: no x*sigmoid(x) pattern in this model")
        for sig, mul in pats:
            keep([sig, mul], "silu")
    if keep_rmsnorm:
        why: list[str] = []
        pats = rmsnorm_patterns(model, why if explain else None)
        for line in why:
            log.debug("rmsnorm: no match at %s", line)
        if not pats:
            report.skipped.append("--keep-rmsnorm-fp32: no RMSNorm pattern (Pow 2 -> ReduceMean -> Add -> Sqrt -> Div)")
        for nodes in pats:
            keep(nodes, "rmsnorm")
    for op in keep_ops:
        keep([n for n in g.node if n.op_type == op], f"op {op}")
    for pat in keep_nodes:
        hits = [n for n in g.node if fnmatch.fnmatchcase(n.name, pat)]
        if not hits:
            raise BadInput(f"--keep-node {pat!r}: matches no node name (names look like {g.node[len(g.node) // 2].name!r})")
        keep(hits, f"node {pat}")
    if keep_calibrated:
        by_name = {n.name: n for n in g.node}
        keep([by_name[k] for k in keep_calibrated if k in by_name], "calibration")

    # 2. rebuild the graph with Casts at precision boundaries
    inits = {t.name: t for t in g.initializer}
    new_inits: dict[str, TensorProto] = {}
    sources: dict[str, object] = {}
    versions: dict[str, dict[int, str]] = {}
    nodes: list[onnx.NodeProto] = []
    want_io = F32 if keep_io_types else F16

    def weight_version(name: str, dt: int) -> str:
        t = inits[name]
        key = name if (dt == F16 or name not in f16_readers) else name + "__fp32"
        if key in new_inits:
            return key
        nt = TensorProto()
        nt.CopyFrom(t)
        if dt == F16:
            nt.data_type = F16
            nt.ClearField("raw_data")
            nt.ClearField("float_data")
            src = model.sources.get(name)
            if src is None and int(np.prod(t.dims, dtype=np.int64)) < 4096:
                arr = _to_fp16(numpy_helper.to_array(t), name, report)
                nt.CopyFrom(numpy_helper.from_array(arr, name))
            else:
                nt.data_location = TensorProto.EXTERNAL
                sources[name] = _fp16_source(t, src, report)
            report.converted_weights += 1
        else:
            nt.name = key
            if name in model.sources:
                sources[key] = model.sources[name]
            if key != name:
                report.duplicated_weights.append(name)
        new_inits[key] = nt
        return key

    # which float initializers have fp16 readers
    prec = lambda n: F32 if n.output[0] in kept else F16  # noqa: E731
    f16_readers = {i for n in g.node if prec(n) == F16 for i in n.input if i in floats}

    def get(name: str, dt: int) -> str:
        if name in floats:
            return weight_version(name, dt)
        have = versions[name]
        if dt in have:
            return have[dt]
        src_dt, src_name = next(iter(have.items()))
        out = f"{name}__{'fp16' if dt == F16 else 'fp32'}"
        nodes.append(helper.make_node("Cast", [src_name], [out], name=f"{name}/Cast_to_{'fp16' if dt == F16 else 'fp32'}",
                                      to=dt))
        report.casts += 1
        have[dt] = out
        return out

    new_inputs = []
    for i in g.input:
        if i.name in inits:
            continue
        v = onnx.ValueInfoProto()
        v.CopyFrom(i)
        if is_float(i.name):
            v.type.tensor_type.elem_type = want_io
            versions[i.name] = {want_io: i.name}
        new_inputs.append(v)

    out_names = {o.name for o in g.output}
    renamed: dict[str, str] = {}
    for n in g.node:
        p = prec(n)
        nn = onnx.NodeProto()
        nn.CopyFrom(n)
        for k, i in enumerate(n.input):
            if i and (is_float(i) or i in floats):
                nn.input[k] = get(i, p)
        if n.op_type == "Cast":
            for a in nn.attribute:
                if a.name == "to" and a.i in (F32, F16):
                    a.i = p
        for a in nn.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F32 and p == F16:
                a.t.CopyFrom(numpy_helper.from_array(_to_fp16(numpy_helper.to_array(a.t), n.name, report), a.t.name))
        for k, o in enumerate(n.output):
            if o and is_float(o):
                if o in out_names and p != want_io:
                    nn.output[k] = renamed[o] = f"{o}__{'fp16' if p == F16 else 'fp32'}"
                versions[o] = {p: nn.output[k]}
        nodes.append(nn)
    for o in g.output:
        if o.name in renamed:
            src = renamed[o.name]
            nodes.append(helper.make_node("Cast", [src], [o.name], name=f"{o.name}/Cast_output", to=want_io))
            report.casts += 1

    new_outputs = []
    for o in g.output:
        v = onnx.ValueInfoProto()
        v.CopyFrom(o)
        if is_float(o.name):
            v.type.tensor_type.elem_type = want_io
        new_outputs.append(v)
    # value_info: drop (types changed); passes that need it re-infer
    ordered_inits = [new_inits[k] for k in new_inits]
    for t in g.initializer:  # non-float initializers unchanged
        if t.name not in floats:
            ordered_inits.append(t)
            if t.name in model.sources:
                sources[t.name] = model.sources[t.name]
    ng = helper.make_graph(nodes, g.name, new_inputs, new_outputs, initializer=ordered_inits)
    proto = helper.make_model(ng, opset_imports=list(model.proto.opset_import), producer_name=model.proto.producer_name,
                              producer_version=model.proto.producer_version)
    proto.ir_version = model.proto.ir_version
    for prop in model.proto.metadata_props:
        proto.metadata_props.add(key=prop.key, value=prop.value)
    out = Model(proto, sources)
    out.set_metadata("qvl_surgery.dtype", "float16")
    out.set_metadata("qvl_surgery.fp16_kept", json.dumps({r: len(v) for r, v in report.kept.items()}))
    passes = json.loads(out.metadata().get("qvl_surgery.passes", "[]"))
    out.set_metadata("qvl_surgery.passes", json.dumps(passes + ["fp16"]))
    return out, report
