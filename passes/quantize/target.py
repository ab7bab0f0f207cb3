"""Measuring a plan in the target's own arithmetic (``target``): the keep-list ``--budget`` chooses and
the errors ``sensitivity`` reports are measured where the plan will run.

- ``onnxruntime`` (the default): the quantized file itself, run in onnxruntime (only the linears'
  inputs quantized; the residual stream, norms, attention and Softmax stay float).
- ``rknn-int8``: an emulation of rknn-toolkit2's default int8 build, run in onnxruntime as fake
  quantization, following the graph rknn's ``hybrid_quantization_step1`` writes (2.5.0, read from its
  ``.model`` and ``.quantization.cfg``): every tensor rknn quantizes, per tensor, asymmetric uint8 over
  its calibrated min..max (rknn's default ``normal`` algorithm is min..max: its cfg's ``min``/``max``
  equal ``ori_min``/``ori_max``): the image or pixel input and each computed float output (linears,
  residual Adds, RoPE's Mul/Add, attention's Q.K and Softmax, MatMul by V, SiLU and GELU outputs,
  the gate x up Mul, smooth's own Mul/Sub); every linear's weight per output channel, symmetric int8.
  Not quantized, as rknn fuses them into one op that computes inside without quantizing
  (:func:`fused_internals`): the inside of each RMSNorm (exNorm, with smooth's shift Sub after it),
  SiLU's Sigmoid (exSwish), GELU's Div/Erf/Add/Mul (exGelu), Q.K before its scale (exSDPAttention);
  nor data movement (Reshape, Transpose, Gather, ..., and RoPE's Neg, which rknn folds into a
  Gather and the sine table). A kept linear (a 16-bit layer of rknn's hybrid config) keeps its
  weight, its output and its input float, the input back to the op that computes it through data
  movement, as ``toolchains --rknn-step1`` writes the config (:func:`kept_inputs`).
- ``rknn``: the same with the residual stream (each residual Add an RMSNorm reads) float, as the
  toolkit's rknn hybrid config keeps it in int16; each norm's output is still int8 for the int8
  layers that read it (rknn converts it), float for a kept linear.
- ``pulsar2-u8``, ``pulsar2-u16``, ``qnn-w8a16``: AXERA pulsar2's and Qualcomm QNN's builds, every
  activation per tensor at 8 or 16 bits (asymmetric unsigned), weights int8 per output channel, a
  kept linear (pulsar2's U16 layer_configs) float. Neither toolchain can run here (neither is on
  PyPI): their fusions are taken to be rknn's and these emulations are not compared with the real
  builds; their 16-bit figures bound what 16-bit activations leave, not what the toolchain gives.

Measured against rknn-toolkit2 2.5.0's rk3588 simulator (``rknn``; tiny, calibrated on four
scikit-image photos, worst of three others; scripts/toolchains-proof's "targets" table), with the
hybrid configs ``toolchains --budget 0.99 --target rknn`` writes: random weights 0.99943 emulated /
0.99914 simulated (nothing kept), smoothed 0.99919 / 0.99910; the outlier stand-in 0.99892 / 0.99848
(the merger kept), smoothed 0.99888 / 0.99849. Far from any budget the two still agree in kind (the
outlier stand-in with nothing kept: -0.014 / -0.005, smoothed 0.23 / 0.20). Before the fusions were
followed, quantizing GELU's inside alone took the outlier stand-in with the merger kept from 0.999
to 0.37 (the simulator: 0.998). ``rknn-int8`` was not compared with rknn's own int8 build here.

What the emulation does not cover: rknn's rounding and saturation modes; its other calibration
algorithms (KL, MMSE); 16-bit layers are float32 here (rknn's int16 steps, 1/32768 of the range,
and float16's rounding in a float16 config are left out: measured, rknn's own float16 build of the
outlier stand-in reaches only 0.967 centered on a photo, its int16 layers 0.998); the constants
inside fused ops, which rknn rounds to int8 per tensor (an RMSNorm's weight and smooth's shift);
the patch Conv's weight (float here); ops rknn places on the CPU.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qvl_surgery.core import quant
from qvl_surgery.core.graphinfo import constant_tensors, elem_types, with_graph
from qvl_surgery.core.linears import Linear
from qvl_surgery.core.modelfile import Computed, Model, read_initializer

# the emulated targets and the bits of their activations (every one: the fused ops' insides and data
# movement excepted, as rknn's graph does; 'rknn' keeps its residual stream float)
ACTIVATION_BITS = {"rknn": 8, "rknn-int8": 8, "pulsar2-u8": 8, "pulsar2-u16": 16, "qnn-w8a16": 16}
TARGETS = ("onnxruntime", *ACTIVATION_BITS)
_FLOAT = (TensorProto.FLOAT, TensorProto.FLOAT16)
# data movement: the output holds the input's values, in the input's precision (quantized or float);
# rknn turns RoPE's rotate-half (Split, Neg, Concat) into one Gather with the sign in the sine table
_MOVES = {"Reshape", "Transpose", "Gather", "Squeeze", "Unsqueeze", "Split", "Concat", "Slice", "Identity",
          "Flatten", "Expand", "Neg"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}


def activation_tensors(model: Model) -> list[str]:
    """The tensors rknn quantizes: float graph inputs and the float outputs of nodes that depend on an
    input (constant-only subgraphs are folded by the toolchain), but data movement (its output keeps
    the input's precision) and what rknn computes inside a fused op (:func:`fused_internals`)."""
    g = model.graph
    inits = model.initializers()
    types = elem_types(model)
    constant = constant_tensors(g)
    inside = fused_internals(model)
    out = [i.name for i in g.input if i.name not in inits and i.type.tensor_type.elem_type in _FLOAT]
    for n in g.node:
        if all(i in constant for i in n.input if i) or n.op_type in _MOVES:
            continue
        out += [o for o in n.output if o and types.get(o) in _FLOAT and o not in inside]
    return out


def fused_internals(model: Model) -> set[str]:
    """The tensors computed inside the ops rknn fuses (its step-1 graph: exNorm, exSwish, exGelu,
    exSDPAttention), which it does not quantize: each RMSNorm's inside (with smooth's shift Sub after
    the norm, which exNorm takes in), SiLU's Sigmoid, GELU's chain from the Erf's input to its last
    Mul, Q.K before the scale Softmax reads."""
    from qvl_surgery.core.patterns import consumers, producers, rmsnorm_patterns, sigmoid_mul_patterns
    g = model.graph
    cons, prod = consumers(g), producers(g)
    constant = constant_tensors(g)

    def with_constant(n: onnx.NodeProto, t: str) -> bool:   # elementwise op of ``t`` and a constant
        return n.op_type in _ELEMENTWISE and all(i == t or i in constant for i in n.input)

    inside: set[str] = set()
    for nodes in rmsnorm_patterns(model):
        computed = [n for n in nodes if n.op_type != "Constant"]
        outs = [n.output[0] for n in computed]
        last = outs[-1]
        after = cons.get(last, [])
        if len(after) == 1 and after[0].op_type in ("Sub", "Add") and with_constant(after[0], last):
            inside.add(last)
        inside.update(outs[:-1])
    inside.update(s.output[0] for s, _ in sigmoid_mul_patterns(g))
    for erf in (n for n in g.node if n.op_type == "Erf"):
        head = prod.get(erf.input[0])
        if head is not None and with_constant(head, head.input[0]):
            inside.add(head.output[0])
        t = erf.output[0]
        while len(cons.get(t, [])) == 1 and cons[t][0].op_type in _ELEMENTWISE:
            inside.add(t)
            t = cons[t][0].output[0]
    for n in g.node:
        after = cons.get(n.output[0], []) if n.op_type == "MatMul" else []
        if len(after) == 1 and with_constant(after[0], n.output[0]) and \
                any(c.op_type == "Softmax" for c in cons.get(after[0].output[0], [])):
            inside.add(n.output[0])
    return inside


def residual_stream(model: Model) -> set[str]:
    """The tensors the toolkit's rknn hybrid config keeps at 16 bits: each residual Add an RMSNorm
    reads (the norms' inside is never quantized; their outputs are, for int8 readers)."""
    from qvl_surgery.core.residual import hidden_norms
    norms, _ = hidden_norms(model, "target rknn")
    return {n.x for n in norms}


def kept_inputs(model: Model, linears: list[Linear], kept: dict[str, str]) -> set[str]:
    """The tensors a kept linear reads, back through data movement to the op that computes them: a
    16-bit layer of rknn's hybrid config fed an int8 tensor would still see its rounding, so the
    config keeps these at 16 bits too (toolchains' ``rknn_input_chains``)."""
    from qvl_surgery.core.patterns import producers
    prod = producers(model.graph)
    out: set[str] = set()
    for lin in linears:
        if lin.name not in kept:
            continue
        t = lin.x
        out.add(t)
        while t in prod and prod[t].op_type in _MOVES and prod[t].input:
            t = prod[t].input[0]
            out.add(t)
    return out


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
    bits = ACTIVATION_BITS[target]
    return lambda kept: emulate_rknn(model, ranges, linears, kept, bits)


def _grid(lo: float, hi: float, bits: int = 8) -> tuple[np.float32, int]:
    """Asymmetric unsigned ``bits`` over lo..hi (zero included): the scale and the zero point."""
    top = (1 << bits) - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / top or 1e-30
    return np.float32(scale), int(np.clip(np.rint(-lo / scale), 0, top))


def _per_channel_int8(w: np.ndarray, out_in: bool) -> np.ndarray:
    """``w`` rounded to the quantize pass's own int8 weights (per output channel) and back."""
    nk = np.asarray(w, np.float32) if out_in else np.asarray(w, np.float32).T
    q, scale = quant.quantize_per_channel(nk)
    back = q.astype(np.float32) * scale[:, None]
    return back if out_in else np.ascontiguousarray(back.T)


def emulate_rknn(model: Model, ranges: dict[str, tuple[float, float]], linears: list[Linear],
                 kept: dict[str, str], bits: int = 8) -> Model:
    """``model`` with rknn's int8 arithmetic as fake quantization (module docstring): a
    QuantizeLinear -> DequantizeLinear after every activation in ``ranges`` (not after a kept
    linear, nor on what it reads: :func:`kept_inputs`), every linear weight not kept rounded per
    output channel (computed while read). ``bits`` 16: the activations' grid is unsigned 16-bit,
    written as float ops (Div, Round, Add, Clip, Sub, Mul: opset 17 has no 16-bit QuantizeLinear)."""
    g = model.graph
    kept_nodes = {lin.node.name for lin in linears if lin.name in kept}
    ranges = {k: v for k, v in ranges.items() if k not in kept_inputs(model, linears, kept)}
    weights = {lin.weight: lin for lin in linears if lin.name not in kept}
    inits = {t.name: t for t in g.initializer}
    sources = dict(model.sources)
    new_inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    rename: dict[str, str] = {}

    def fake_quant(t: str, source: str, dst: str) -> None:
        """``source`` (holding ``t``'s values) through ``bits`` at ``t``'s range, as ``dst``."""
        scale, zp = _grid(*ranges[t], bits)
        base = t.lstrip("/")
        new_inits.append(numpy_helper.from_array(np.asarray(scale, np.float32), f"{base}/rknn_scale"))
        if bits != 8:
            c = {k: f"{base}/rknn_{k}" for k in ("zero_point", "low", "high")}
            for k, v in (("zero_point", zp), ("low", 0), ("high", (1 << bits) - 1)):
                new_inits.append(numpy_helper.from_array(np.asarray(v, np.float32), c[k]))
            steps = [("Div", [source, f"{base}/rknn_scale"]), ("Round", None), ("Add", [c["zero_point"]]),
                     ("Clip", [c["low"], c["high"]]), ("Sub", [c["zero_point"]]), ("Mul", [f"{base}/rknn_scale"])]
            x = source
            for k, (op, args) in enumerate(steps):
                y = dst if k == len(steps) - 1 else f"{t}/rknn_{op.lower()}"
                ins = args if k == 0 else [x, *(args or [])]
                nodes.append(helper.make_node(op, ins, [y], name=f"{t}/rknn/{op}"))
                x = y
            return
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
