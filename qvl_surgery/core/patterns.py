"""Patterns in a graph that passes and reports look for: who produces and who reads each tensor,
x*sigmoid(x) (SiLU), RMSNorm, attention (explicit or fused). Graph only: no weight is read."""
from __future__ import annotations

import numpy as np
import onnx

from qvl_surgery.core.graphinfo import constant_value
from qvl_surgery.core.modelfile import Model


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def sigmoid_mul_patterns(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """Every x * sigmoid(x): the Sigmoid and the Mul that multiplies its output by its input."""
    cons = consumers(graph)
    found = []
    for n in graph.node:
        if n.op_type != "Sigmoid":
            continue
        for m in cons.get(n.output[0], []):
            if m.op_type == "Mul" and n.input[0] in m.input:
                found.append((n, m))
    return found


FUSED_ATTENTION = {"MultiHeadAttention", "Attention", "GroupQueryAttention", "PackedMultiHeadAttention"}


def rmsnorm_patterns(model: Model, explain: list[str] | None = None) -> list[list[onnx.NodeProto]]:
    """Pow(x,2) -> ReduceMean -> Add(eps) -> Sqrt -> Div(x, .) [or Reciprocal -> Mul(x, .), either
    side] -> Mul(scale, either side); constants as initializers or Constant nodes (those read only
    by the pattern are part of it)."""
    g = model.graph
    cons = consumers(g)

    def only(t: str, op: str, why: str, node: onnx.NodeProto) -> onnx.NodeProto | None:
        cs = [c for c in cons.get(t, []) if c.op_type == op]
        if len(cs) != 1:
            if explain is not None:
                explain.append(f"{node.name}: {why} (found {[c.op_type for c in cons.get(t, [])]})")
            return None
        return cs[0]

    const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    constants = set(model.initializers()) | set(const_nodes)
    found = []
    for pw in g.node:
        if pw.op_type != "Pow":
            continue
        e = constant_value(model, pw.input[1], max_size=16)
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
        # the scale: Mul by a constant, on either side
        scale = [c for c in cons.get(last.output[0], []) if c.op_type == "Mul"]
        if len(scale) == 1 and any(i in constants for i in scale[0].input if i != last.output[0]):
            nodes.append(scale[0])
        # Constant nodes (exponent, eps, scale) read only here belong to the island: no Cast to fp32
        inside = {n.output[0] for n in nodes}
        nodes += [const_nodes[i] for n in nodes for i in n.input
                  if i in const_nodes and all(c.output[0] in inside for c in cons[i])]
        found.append(nodes)
    return found


def attention_count(graph: onnx.GraphProto) -> int:
    """Softmax nodes between two MatMuls (explicit attention) plus fused attention ops."""
    prod, cons = producers(graph), consumers(graph)
    count = 0
    for n in graph.node:
        if n.op_type in FUSED_ATTENTION:
            count += 1
        elif n.op_type == "Softmax":
            # Walk up through elementwise scale/mask/cast ops to the score MatMul.
            cur, up_ok = n, False
            for _ in range(4):
                p = prod.get(cur.input[0])
                if p is None:
                    break
                if p.op_type == "MatMul":
                    up_ok = True
                    break
                cur = p
            down = cons.get(n.output[0], [])
            for _ in range(2):
                if any(c.op_type == "MatMul" for c in down):
                    break
                down = [d for c in down if c.op_type == "Cast" for d in cons.get(c.output[0], [])]
            if up_ok and any(c.op_type == "MatMul" for c in down):
                count += 1
    return count
