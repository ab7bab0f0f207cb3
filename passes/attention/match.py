"""Finding attention: the declared pattern and its variants (see the package docstring), each miss
explained; the windows a mask stands for; attention this pass already rewrote."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.graphinfo import constant_value
from qvl_surgery.core.modelfile import Model
from qvl_surgery.core.patterns import FUSED_ATTENTION, consumers, producers

from passes.attention.report import AttentionReport

log = logging.getLogger(__package__)   # "passes.attention": the pass's name in --verbose output


@dataclass
class AttentionMatch:
    softmax: onnx.NodeProto
    qk: onnx.NodeProto
    k_transpose: onnx.NodeProto
    scale: onnx.NodeProto
    scale_const: str          # the scalar the scale node divides or multiplies by
    mask_add: onnx.NodeProto | None
    mask: str | None
    pv: onnx.NodeProto
    q: str
    k: str
    v: str
    windows: list[int] | None = None   # window lengths in sequence order; None: full attention

    @property
    def name(self) -> str:
        return self.qk.name.rsplit("/", 1)[0] or self.qk.output[0]


def _windows_from_ids(ids: np.ndarray, where: str) -> list[int]:
    ids = np.asarray(ids).reshape(-1)
    change = np.flatnonzero(np.diff(ids) != 0) + 1
    bounds = np.concatenate([[0], change, [len(ids)]])
    runs = ids[bounds[:-1]]
    if len(set(runs.tolist())) != len(runs):
        raise BadInput(f"{where}: the attention mask is not block-diagonal (window ids are not contiguous runs); "
                       "this pass only rewrites contiguous windows")
    return np.diff(bounds).astype(int).tolist()


def windows_of_mask(model: Model, mask: str, seq: int) -> list[int]:
    prod = producers(model.graph)
    node = prod.get(mask)
    # this toolkit's export: Where(Equal(Unsqueeze(id), Unsqueeze(id)), 0, min) (possibly through a Cast)
    while node is not None and node.op_type == "Cast":
        node = prod.get(node.input[0])
    if node is not None and node.op_type == "Where":
        eq = prod.get(node.input[0])
        if eq is not None and eq.op_type == "Equal":
            srcs = []
            for i in eq.input:
                u = prod.get(i)
                srcs.append(u.input[0] if u is not None and u.op_type in ("Unsqueeze", "Reshape") else i)
            if srcs[0] == srcs[1]:
                ids = constant_value(model, srcs[0])
                if ids is not None:
                    return _windows_from_ids(ids, mask)
    dense = constant_value(model, mask) if node is None or node.op_type == "Constant" else None
    if dense is not None:
        m = dense.reshape(dense.shape[-2], dense.shape[-1])
        allowed = m > -1e4
        sizes, start = [], 0
        while start < m.shape[0]:
            row = np.flatnonzero(allowed[start])
            end = int(row.max()) + 1 if row.size else start + 1
            if row.size == 0 or row.min() != start:
                raise BadInput(f"{mask}: the attention mask is not block-diagonal at row {start}")
            block = allowed[start:end, start:end]
            if not block.all() or allowed[start:end].sum() != block.sum():
                raise BadInput(f"{mask}: the attention mask is not block-diagonal at rows {start}..{end}")
            sizes.append(end - start)
            start = end
        return sizes
    raise BadInput(f"{mask}: cannot tell the windows of this attention mask (it is neither built from a "
                   "window-id vector nor a constant); the attention pass needs one of those")


def rewritten_attention(graph: onnx.GraphProto) -> str | None:
    """Where the graph's attention was already rewritten, read from the graph alone (a file whose
    metadata was lost): a fused attention op, or this pass's windowed layout (scores of
    ``[windows, H, w, w]`` from k transposed with perm [1,0,3,2]). None for an export's attention."""
    prod = producers(graph)
    for n in graph.node:
        if n.op_type in FUSED_ATTENTION:
            return f"{n.name} is a fused {n.op_type}"
        if n.op_type != "Softmax":
            continue
        cur = prod.get(n.input[0])
        while cur is not None and cur.op_type in ("Add", "Div", "Mul"):
            cur = prod.get(cur.input[0])
        kt = prod.get(cur.input[1]) if cur is not None and cur.op_type == "MatMul" else None
        if kt is not None and kt.op_type == "Transpose" and \
                next((list(a.ints) for a in kt.attribute if a.name == "perm"), None) == [1, 0, 3, 2]:
            return f"{cur.name} is windowed attention (windows first)"
    return None


def _scaled_scores(model: Model, prod: dict[str, onnx.NodeProto], name: str
                   ) -> tuple[onnx.NodeProto, str, onnx.NodeProto] | str:
    """``name`` as scaled scores: (Div or Mul node, its scalar constant, the MatMul it scales), or
    why it is not one."""
    scale = prod.get(name)
    if scale is None or scale.op_type not in ("Div", "Mul"):
        return "Softmax input is not a scaled score (Div or Mul by a constant), optionally plus a mask"
    orders = [(0, 1)] if scale.op_type == "Div" else [(0, 1), (1, 0)]
    for s_in, c_in in orders:
        c = constant_value(model, scale.input[c_in], max_size=1)
        if c is None or c.size != 1:
            continue
        qk = prod.get(scale.input[s_in])
        if qk is None or qk.op_type != "MatMul":
            return (f"{scale.name} does not read a MatMul (a Cast in between? rewrite attention before fp16 "
                    "islands that split it)")
        return scale, scale.input[c_in], qk
    return f"{scale.name} does not scale by a scalar constant"


def find_attention(model: Model, report: AttentionReport | None = None) -> list[AttentionMatch]:
    g = model.graph
    prod, cons = producers(g), consumers(g)
    found = []

    def miss(node: onnx.NodeProto, why: str) -> None:
        log.debug("attention: no match at %s: %s", node.name, why)
        if report is not None:
            report.misses.append(f"{node.name}: {why}")

    for sm in g.node:
        if sm.op_type != "Softmax":
            continue
        axis = next((a.i for a in sm.attribute if a.name == "axis"), -1)
        if axis not in (-1, 3):
            miss(sm, f"Softmax axis is {axis}, not the last")
            continue
        mask_add, mask = None, None
        scored = _scaled_scores(model, prod, sm.input[0])
        add = prod.get(sm.input[0])
        if isinstance(scored, str) and add is not None and add.op_type == "Add":
            # a mask added on either side: the scores are the operand that is a scaled q.k^T
            a, b = add.input
            sides = [(_scaled_scores(model, prod, a), b), (_scaled_scores(model, prod, b), a)]
            scored, mask = next(((sc, m) for sc, m in sides if not isinstance(sc, str)), (sides[0][0], None))
            mask_add = add if mask is not None else None
        if isinstance(scored, str):
            miss(sm, scored)
            continue
        scale_node, scale_const, qk = scored
        kt = prod.get(qk.input[1])
        perm = next((list(a.ints) for a in kt.attribute if a.name == "perm"), None) if kt is not None else None
        if kt is None or kt.op_type != "Transpose" or perm != [0, 1, 3, 2]:
            miss(sm, f"{qk.name}: second input is not Transpose(k, perm=[0,1,3,2])")
            continue
        readers = cons.get(sm.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "MatMul" or readers[0].input[0] != sm.output[0]:
            miss(sm, "Softmax output is not read by exactly one MatMul(probs, v)")
            continue
        found.append(AttentionMatch(sm, qk, kt, scale_node, scale_const, mask_add, mask, readers[0], qk.input[0],
                                    kt.input[0], readers[0].input[1]))
    return found
