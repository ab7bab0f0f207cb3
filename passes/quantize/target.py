"""Measuring a plan in the target's own arithmetic (``target``): the keep-list ``--budget`` chooses and
the errors ``sensitivity`` reports are measured where the plan will run.

- ``onnxruntime`` (the default): the quantized file itself, run in onnxruntime (only the linears'
  inputs quantized; the residual stream, norms, attention and Softmax stay float).
- ``rknn-int8``: an emulation of rknn-toolkit2's default int8 build, run in onnxruntime as fake
  quantization: every activation (the image or pixel input, and each node's float output: residual
  Adds, RMSNorm, attention MatMuls, Softmax included) per tensor, asymmetric uint8 over its
  calibrated min..max (zero included); every linear's weight per output channel, symmetric int8;
  a kept linear (rknn's hybrid float16 layer) keeps its weight and its output float.
- ``rknn``: the same with the residual stream float, as the toolkit's rknn hybrid config keeps it
  (``toolchains``: each residual Add an RMSNorm reads, and the RMSNorms, in float16).

What the emulation does not cover: rknn's rounding and saturation modes, its fused ops (exNorm,
exSoftmax, ... compute inside in their own precision), its calibration algorithms (KL / MMSE: here
min..max), the patch Conv's weight (float here), and float16's own rounding in its float layers
(float32 here).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qvl_surgery.core import quant
from qvl_surgery.core.graphinfo import constant_tensors, elem_types, with_graph
from qvl_surgery.core.linears import Linear
from qvl_surgery.core.modelfile import Computed, Model, read_initializer

TARGETS = ("onnxruntime", "rknn", "rknn-int8")
_FLOAT = (TensorProto.FLOAT, TensorProto.FLOAT16)
# data movement: the output holds the input's values, in the input's precision (quantized or float)
_MOVES = {"Reshape", "Transpose", "Gather", "Squeeze", "Unsqueeze", "Split", "Concat", "Slice", "Identity",
          "Flatten", "Expand"}


def activation_tensors(model: Model) -> list[str]:
    """The tensors rknn quantizes: float graph inputs and the float outputs of nodes that depend on an
    input (constant-only subgraphs are folded by the toolchain), but data movement (its output keeps
    the input's precision)."""
    g = model.graph
    inits = model.initializers()
    types = elem_types(model)
    constant = constant_tensors(g)
    out = [i.name for i in g.input if i.name not in inits and i.type.tensor_type.elem_type in _FLOAT]
    for n in g.node:
        if all(i in constant for i in n.input if i) or n.op_type in _MOVES:
            continue
        out += [o for o in n.output if o and types.get(o) in _FLOAT]
    return out


def residual_stream(model: Model) -> set[str]:
    """The tensors the toolkit's rknn hybrid config keeps float: each residual Add an RMSNorm reads,
    and every tensor inside the RMSNorms."""
    from qvl_surgery.core.residual import hidden_norms
    norms, _ = hidden_norms(model, "target rknn")
    return {n.x for n in norms} | {o for n in norms for node in n.nodes for o in node.output}


def record_min_max(model: Model, feeds_list: list[dict], tensors: list[str]) -> dict[str, tuple[float, float]]:
    """Each tensor's min and max over the input sets (onnxruntime, a segment of nodes at a time)."""
    from qvl_surgery.core.segments import run_segments
    ranges: dict[str, tuple[float, float]] = {}

    def rec(name: str, v: np.ndarray) -> None:
        v = np.asarray(v, np.float32)
        lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
        old = ranges.get(name)
        ranges[name] = (min(lo, old[0]), max(hi, old[1])) if old else (lo, hi)
    run_segments(model, feeds_list, tensors, rec)
    return ranges


def emulator(model: Model, feeds_list: list[dict], target: str, linears: list[Linear]):
    """``build(kept) -> Model``: ``model`` in ``target``'s arithmetic (module docstring) with the
    linears in ``kept`` float, its activation ranges recorded on ``feeds_list``. The emulated graph
    keeps the original tensor names wherever the original graph had them (a block's input is still
    its name): the budget's segments cut it there."""
    tensors = activation_tensors(model)
    if target == "rknn":
        floats = residual_stream(model)
        tensors = [t for t in tensors if t not in floats]
    ranges = record_min_max(model, feeds_list, tensors)
    return lambda kept: emulate_rknn(model, ranges, linears, kept)


def _uint8_grid(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1e-30
    return np.float32(scale), np.uint8(np.clip(np.rint(-lo / scale), 0, 255))


def _per_channel_int8(w: np.ndarray, out_in: bool) -> np.ndarray:
    """``w`` rounded to the quantize pass's own int8 weights (per output channel) and back."""
    nk = np.asarray(w, np.float32) if out_in else np.asarray(w, np.float32).T
    q, scale = quant.quantize_per_channel(nk)
    back = q.astype(np.float32) * scale[:, None]
    return back if out_in else np.ascontiguousarray(back.T)


def emulate_rknn(model: Model, ranges: dict[str, tuple[float, float]], linears: list[Linear],
                 kept: dict[str, str]) -> Model:
    """``model`` with rknn's int8 arithmetic as fake quantization (module docstring): a
    QuantizeLinear -> DequantizeLinear after every activation in ``ranges`` (not after a kept
    linear), every linear weight not kept rounded per output channel (computed while read)."""
    g = model.graph
    kept_nodes = {lin.node.name for lin in linears if lin.name in kept}
    weights = {lin.weight: lin for lin in linears if lin.name not in kept}
    inits = {t.name: t for t in g.initializer}
    sources = dict(model.sources)
    new_inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    rename: dict[str, str] = {}

    def fake_quant(t: str, source: str, dst: str) -> None:
        """``source`` (holding ``t``'s values) through uint8 at ``t``'s range, as ``dst``."""
        scale, zp = _uint8_grid(*ranges[t])
        base = t.lstrip("/")
        new_inits.append(numpy_helper.from_array(np.asarray(scale, np.float32), f"{base}/rknn_scale"))
        new_inits.append(numpy_helper.from_array(np.asarray(zp, np.uint8), f"{base}/rknn_zero_point"))
        q = [source, f"{base}/rknn_scale", f"{base}/rknn_zero_point"]
        nodes.append(helper.make_node("QuantizeLinear", q, [f"{t}/rknn_q"], name=f"{t}/rknn/QuantizeLinear"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{t}/rknn_q", *q[1:]], [dst],
                                      name=f"{t}/rknn/DequantizeLinear"))

    for i in g.input:
        if i.name in ranges:                         # the input read through its fake quantization
            rename[i.name] = f"{i.name}/rknn_dq"
            fake_quant(i.name, i.name, rename[i.name])
    for n in g.node:
        nn = onnx.NodeProto()
        nn.CopyFrom(n)
        for k, i in enumerate(nn.input):
            if i in rename:
                nn.input[k] = rename[i]
            elif i in weights and k == 1:
                lin = weights[i]
                fq = f"{i}/rknn_int8"
                if fq not in sources:
                    t = TensorProto(name=fq, data_type=TensorProto.FLOAT, dims=list(inits[i].dims),
                                    data_location=TensorProto.EXTERNAL)
                    new_inits.append(t)
                    src = model.sources.get(i)
                    sources[fq] = Computed(lambda w=inits[i], s=src, oi=lin.out_in: _per_channel_int8(
                        read_initializer(w, s), oi), int(np.prod(inits[i].dims)) * 4)
                nn.input[k] = fq
        quantized = [o for o in nn.output if o in ranges and n.name not in kept_nodes]
        for k, o in enumerate(nn.output):
            if o in quantized:
                nn.output[k] = f"{o}/rknn_raw"
        nodes.append(nn)
        for o in quantized:
            fake_quant(o, f"{o}/rknn_raw", o)
    used = {i for n in nodes for i in n.input}
    inits_out = [t for t in list(g.initializer) + new_inits if t.name in used]
    ng = helper.make_graph(nodes, g.name, list(g.input), list(g.output), initializer=inits_out)
    return with_graph(model, ng, {k: v for k, v in sources.items() if k in used})
