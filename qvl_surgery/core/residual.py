"""The residual stream's RMSNorms and the linears that read or write it: what a pass that folds a
matrix into the weights around the stream needs (rotate folds an orthogonal rotation, smooth a
per-channel scale), and :func:`refolded`, the one way such a weight is recomputed while written."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.graphinfo import constant_value, value_types
from qvl_surgery.core.modelfile import Computed, Model, read_initializer
from qvl_surgery.core.patterns import consumers, rmsnorm_patterns


@dataclass
class StreamLinear:
    node: onnx.NodeProto
    weight: str
    bias: str
    out_in: bool   # weight [N, K] (Gemm transB=1)

    def k_dim(self, model: Model) -> int:
        dims = model.initializers()[self.weight].dims
        return int(dims[1] if self.out_in else dims[0])


def stream_linear(model: Model, n: onnx.NodeProto) -> StreamLinear | None:
    inits = model.initializers()
    if n.op_type not in ("Gemm", "MatMul") or len(n.input) < 2 or n.input[1] not in inits:
        return None
    w = inits[n.input[1]]
    if w.data_type != TensorProto.FLOAT or len(w.dims) != 2:
        return None
    a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
    if n.op_type == "Gemm" and (a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
        return None
    bias = n.input[2] if n.op_type == "Gemm" and len(n.input) > 2 else ""
    if bias and bias not in inits:
        return None
    return StreamLinear(n, n.input[1], bias, bool(a.get("transB", 0)))


def is_token_gather(model: Model, n: onnx.NodeProto) -> bool:
    axis = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), 0)
    return n.op_type == "Gather" and axis == 0


@dataclass
class Norm:
    x: str
    out: str          # the tensor the readers read (the scale Mul's output, or the core's)
    core_out: str     # x / rms(x)
    scale: str | None
    scale_node: onnx.NodeProto | None
    nodes: list[onnx.NodeProto]


def _norms(model: Model) -> list[Norm]:
    found = []
    for nodes in rmsnorm_patterns(model):
        x = nodes[0].input[0]
        core = [n for n in nodes if (n.op_type == "Div" and n.input[0] == x)
                or (n.op_type == "Mul" and x in n.input and any(m.op_type == "Reciprocal" for m in nodes))]
        core_out = core[0].output[0]
        sm = next((n for n in nodes if n.op_type == "Mul" and core_out in n.input), None)
        scale = next((i for i in sm.input if i != core_out), None) if sm is not None else None
        found.append(Norm(x, sm.output[0] if sm is not None else core_out, core_out, scale, sm, nodes))
    return found


def hidden_norms(model: Model, verb: str) -> tuple[list[Norm], int]:
    """The model's RMSNorms and the hidden size their scales give; one line where there are none."""
    norms = _norms(model)
    inits = model.initializers()
    scale_t = next((inits[n.scale] for n in norms if n.scale in inits), None)
    if scale_t is not None:
        return norms, int(np.prod(scale_t.dims))
    # scales already folded away (a rotated model): the width a linear reading a norm takes
    cons = consumers(model.graph)
    for norm in norms:
        for n in cons.get(norm.out, []):
            lin = stream_linear(model, n)
            if lin is not None and n.input[0] == norm.out:
                return norms, lin.k_dim(model)
    raise BadInput(f"{verb}: no RMSNorm (Pow 2 -> ReduceMean -> Add -> Sqrt -> Div [-> scale]) read by a linear in the "
                   "model; is it the encoder, before quantize?")


def norm_readers(model: Model, cons: dict, norm: Norm, c: int) -> tuple[list[tuple[StreamLinear, int]], onnx.NodeProto | None]:
    """The linears reading a norm's output, each with the tokens one of its rows holds (1, or 4 for the
    merger's Reshape to [T/4, 4C]); or the first reader that is neither (then the list is partial)."""
    readers: list[tuple[StreamLinear, int]] = []
    for n in cons.get(norm.out, []):
        lin = stream_linear(model, n)
        if lin is not None and n.input[0] == norm.out:
            readers.append((lin, 1))
            continue
        if n.op_type == "Reshape":
            shape = constant_value(model, n.input[1], max_size=8)
            last = int(shape.reshape(-1)[-1]) if shape is not None else 0
            after = cons.get(n.output[0], [])
            lins = [stream_linear(model, m) for m in after]
            if last > 0 and last % c == 0 and after and all(
                    lin is not None and m.input[0] == n.output[0] for lin, m in zip(lins, after)):
                readers += [(lin, last // c) for lin in lins]
                continue
        return readers, n
    return readers, None


def refolded(model: Model, like: TensorProto, fn, name: str | None = None) -> tuple[TensorProto, Computed]:
    """A float32 weight recomputed from ``like``'s values by ``fn`` (in float64) while the output is
    written: its tensor entry (named ``name``, default ``like``'s) and its source. rotate and smooth
    fold their matrices into weights this way."""
    t = TensorProto()
    t.CopyFrom(like)
    for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
        t.ClearField(f)
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    t.name = name or like.name
    src = model.sources.get(like.name)

    def make() -> np.ndarray:
        return fn(np.asarray(read_initializer(like, src), np.float64)).astype(np.float32)
    return t, Computed(make, int(np.prod(t.dims, dtype=np.int64)) * 4)


_REORDERS = ("Reshape", "Transpose", "Gather")


def conv_writer(model: Model, t: str, prod: dict, cons: dict, c: int) -> tuple[StreamLinear, list[onnx.NodeProto]] | None:
    """An image-in export writes the stream with a Conv (``c`` output channels, bias a constant)
    followed by token reorders (Reshape, Transpose, Gather on another axis) that move the channel axis,
    whole, to the end: that Conv and the reorder nodes, or None when ``t`` is not made that way. Each
    reorder is checked on the tensors' shapes (the channel axis stays one axis of ``c``), and nothing
    else reads the tensors in between, so a rotation of the channels commutes with the chain."""
    chain: list[onnx.NodeProto] = []
    p = prod.get(t)
    while p is not None and p.op_type in _REORDERS:
        chain.append(p)
        p = prod.get(p.input[0])
    if p is None or p.op_type != "Conv" or not chain:
        return None
    inits = model.initializers()
    if len(p.input) < 3 or p.input[1] not in inits or p.input[2] not in inits or inits[p.input[1]].dims[0] != c:
        return None
    chain.reverse()
    shapes = {k: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for k, v in value_types(model, {p.output[0]} | {n.output[0] for n in chain}).items()}
    # where the channels are: a whole axis, or (INNER) the innermost c elements of the last axis
    axis, INNER = 1, -1                              # Conv output [N, C, H, W]
    prev = p.output[0]
    for n in chain:
        if [r.name for r in cons.get(prev, [])] != [n.name]:
            return None                              # something else reads the unrotated tensor
        old, new = shapes.get(prev), shapes.get(n.output[0])
        if not old or not new or 0 in old + new:
            return None
        if axis == len(old) - 1:
            axis = INNER
        if n.op_type == "Transpose":
            perm = [list(a.ints) for a in n.attribute if a.name == "perm"][0]
            if axis == INNER and perm[-1] != len(perm) - 1:
                return None
            axis = INNER if axis == INNER else perm.index(axis)
        elif n.op_type == "Reshape":
            if axis == INNER:
                if new[-1] % c:
                    return None
            else:
                before = int(np.prod(old[:axis]))
                axis = next((b for b in range(len(new)) if new[b] == c and int(np.prod(new[:b])) == before), None)
                if axis is None:
                    return None
        else:                                         # Gather: constant indices on another axis
            g_axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            if g_axis % len(old) in (axis, len(old) - 1 if axis == INNER else axis) or len(old) != len(new) \
                    or n.input[1] not in inits:
                return None
        prev = n.output[0]
    if not (axis == len(shapes[prev]) - 1 or axis == INNER and shapes[prev][-1] == c):
        return None
    return StreamLinear(p, p.input[1], p.input[2], True), chain
