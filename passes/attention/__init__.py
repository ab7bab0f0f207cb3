"""attention: rewrite explicit attention so window layers stop computing S x S scores.

Pattern (each Softmax is tried; a miss is explained at debug level and in the report):

    MatMul(q, Transpose(k, perm=[0,1,3,2])) -> Div|Mul(scalar) -> [Add(mask)] -> Softmax(-1) -> MatMul(., v)

with q, k, v of shape ``[1, H, S, D]``. Declared variants (tests/test_matchers.py builds each): the
scale as Div(scores, c), Mul(scores, c) or Mul(c, scores); the mask added on either side
(Add(scores, mask), Add(mask, scores)); a constant is an initializer or a Constant node. The mask
tells the windows: this toolkit's export builds it from one int64 ``window_id`` vector
(``Where(Equal(id_col, id_row), 0, min)``), and a constant dense mask is read directly; either way
the windows must be contiguous runs (block-diagonal) or the pass refuses. Without a mask the layer is full attention of a single image. The export's
``qvl_surgery.window_layout`` metadata, when present, must agree.

Modes:
- ``windowed`` (default): window layers become batched attention over ``[windows, H, w, D]``,
  windows first and a Transpose right before each MatMul: the layout OpenVINO's offline route
  (``convert_model``/``ovc``, whose SDPAReshapeFusion folds a Reshape-fed per-window attention
  into one unmasked full attention), rknn-toolkit2, MNN, onnx2tf and onnxruntime all run
  correctly. Uniform windows need no mask; uneven ones (edge windows of e.g. 252x364) are padded
  to the largest window with a Gather, get a small per-window key mask ``[windows, 1, 1, w]``,
  and are gathered back. Full-attention layers are left as they are or chunked by queries.
- ``mha``: every attention becomes onnxruntime's ``com.microsoft.MultiHeadAttention`` (windows
  as the batch), for onnxruntime.
- ``onnx-attention``: the ONNX ``Attention`` op (opset 23); a model below opset 23 is refused
  unless ``upgrade_opset``.
The mask construction and ``window_id`` disappear when no layer reads them any more.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.graphinfo import cleanup, constant_value
from qvl_surgery.core.patterns import FUSED_ATTENTION, consumers, producers
from qvl_surgery.core.modelfile import Model
from qvl_surgery.core.passbase import Context, Option, Pass, PassReport, PassResult

log = logging.getLogger(__name__)

MODES = ("windowed", "mha", "onnx-attention")


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


@dataclass
class AttentionReport(PassReport):
    mode: str
    rewritten: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed_nodes: int = 0

    def summary(self) -> list[str]:
        out = [f"attention ({self.mode}): {len(self.rewritten)} rewritten, {len(self.unchanged)} unchanged"]
        out += [f"  {r}" for r in self.rewritten[:4]] + ([f"  ... {len(self.rewritten) - 4} more"]
                                                       if len(self.rewritten) > 4 else [])
        out += [f"  unchanged: {u}" for u in self.unchanged[:4]]
        if self.removed_nodes:
            out.append(f"  removed {self.removed_nodes} nodes that only built the dense mask")
        out += [f"  no match: {m}" for m in self.misses[:6]]
        return out


# ----------------------------------------------------------------------------- matching

def _windows_from_ids(ids: np.ndarray, where: str) -> list[int]:
    ids = np.asarray(ids).reshape(-1)
    change = np.flatnonzero(np.diff(ids) != 0) + 1
    bounds = np.concatenate([[0], change, [len(ids)]])
    runs = ids[bounds[:-1]]
    if len(set(runs.tolist())) != len(runs):
        raise BadInput(f"{where}: the attention mask is not block-diagonal (window ids are not contiguous runs); "
                       "this pass only rewrites contiguous windows")
    return np.diff(bounds).astype(int).tolist()


def _windows_of_mask(model: Model, mask: str, seq: int) -> list[int]:
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


# ----------------------------------------------------------------------------- plan

@dataclass
class AttentionPlan:
    """What to do with one matched attention: ``action`` is ``windows`` (per-window attention in
    the mode's layout), ``chunk`` (full attention, queries in chunks of ``rows``), ``drop_mask``
    (one window covering everything), or ``keep``."""

    match: AttentionMatch
    heads: int
    seq: int
    head_dim: int
    action: str
    scale_value: float = 1.0
    rows: int = 0

    @property
    def windows(self) -> list[int]:
        return self.match.windows or [self.seq]

    @property
    def uniform(self) -> bool:
        return len(set(self.windows)) == 1


def _shapes(model: Model) -> dict[str, onnx.TypeProto.Tensor]:
    inferred = onnx.shape_inference.infer_shapes(model.proto).graph
    return {v.name: v.type.tensor_type for v in list(inferred.value_info) + list(inferred.input)}


def plan_attention(model: Model, matches: list[AttentionMatch], mode: str, full_chunk_mb: float,
                   itemsize: int, shapes: dict) -> list[AttentionPlan]:
    layout = json.loads(model.metadata().get("qvl_surgery.window_layout", "null") or "null")
    plans = []
    for m in matches:
        t = shapes.get(m.q)
        dims = [d.dim_value for d in t.shape.dim] if t is not None else []
        if len(dims) != 4 or dims[0] != 1 or not all(dims):
            raise BadInput(f"{m.name}: q must have a static shape [1, heads, seq, head_dim]; found {dims or 'unknown'}")
        _, H, S, D = dims
        if m.mask is not None:
            m.windows = _windows_of_mask(model, m.mask, S)
            if sum(m.windows) != S:
                raise BadInput(f"{m.name}: the mask's windows cover {sum(m.windows)} positions, q has {S}")
            if layout and layout.get("window_sizes") and layout["window_sizes"] != m.windows:
                raise BadInput(f"{m.name}: the mask's windows disagree with the export's window_layout metadata")
        sc = float(constant_value(model, m.scale_const).reshape(-1)[0])
        plan = AttentionPlan(m, H, S, D, "windows", 1.0 / sc if m.scale.op_type == "Div" else sc)
        if mode == "windowed" and m.windows is None:
            score_mb = H * S * S * itemsize / 1e6
            if full_chunk_mb and score_mb > full_chunk_mb:
                plan.action, plan.rows = "chunk", max(1, int(full_chunk_mb * 1e6 // (H * S * itemsize)))
            else:
                plan.action = "keep"
        elif mode == "windowed" and len(m.windows) == 1:
            plan.action = "drop_mask"
        plans.append(plan)
    return plans


# ----------------------------------------------------------------------------- emit

class _Edit:
    """New nodes (inserted before the node they replace), nodes to drop, and new constants."""

    def __init__(self, model: Model, dtype: int):
        self.model = model
        self.dtype = dtype
        self.np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        self.new_nodes: dict[str, list[onnx.NodeProto]] = {}   # insert before the node with this first output
        self.drop: set[str] = set()                            # first outputs of nodes to drop
        self.inits: list[TensorProto] = []
        self._names: set[str] = {t.name for t in model.graph.initializer}
        self._consts: dict[tuple, str] = {}

    def const(self, name: str, value: np.ndarray) -> str:
        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes())
        if key in self._consts:
            return self._consts[key]
        base, k = name, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        self.inits.append(numpy_helper.from_array(value, name))
        self._consts[key] = name
        return name

    def replace(self, m: AttentionMatch, nodes: list[onnx.NodeProto], *, keep_k_transpose: bool = False) -> None:
        self.new_nodes[m.pv.output[0]] = nodes
        for n in (m.qk, None if keep_k_transpose else m.k_transpose, m.scale, m.mask_add, m.softmax, m.pv):
            if n is not None:
                self.drop.add(n.output[0])


def _neg_big(np_dtype) -> float:
    return float(np.finfo(np_dtype).min)


@dataclass
class WindowPadding:
    """Uneven windows padded to the largest: ``pad`` gathers [windows * wmax] positions (padding
    repeats a real position: masked as a key, dropped as a query), ``unpad`` gathers them back,
    ``valid`` marks the real keys."""

    pad: np.ndarray
    unpad: np.ndarray
    valid: np.ndarray

    @classmethod
    def of(cls, windows: list[int]) -> "WindowPadding":
        wmax, nW, S = max(windows), len(windows), sum(windows)
        pad = np.zeros((nW, wmax), np.int64)
        valid = np.zeros((nW, wmax), bool)
        unpad = np.zeros(S, np.int64)
        start = 0
        for w_i, n in enumerate(windows):
            pad[w_i, :n] = np.arange(start, start + n)
            pad[w_i, n:] = start
            valid[w_i, :n] = True
            unpad[start:start + n] = w_i * wmax + np.arange(n)
            start += n
        return cls(pad.reshape(-1), unpad, valid)


class _Emitter:
    """One attention's replacement nodes, named under ``{attention}/{mode}``."""

    tag = ""

    def __init__(self, e: _Edit, plan: AttentionPlan):
        self.e, self.plan, self.m = e, plan, plan.match
        self.prefix = f"{self.m.name}/{self.tag}"
        self.nodes: list[onnx.NodeProto] = []
        windows = plan.windows
        self.nW, self.wmax = len(windows), max(windows)
        self.padding = None if plan.uniform else WindowPadding.of(windows)

    def op(self, op_type: str, inputs: list[str], name: str, outs: list[str] | None = None, **attrs) -> str:
        outs = outs or [f"{self.prefix}/{name}_output_0"]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{self.prefix}/{name}", **attrs))
        return outs[0]

    def key_mask(self) -> np.ndarray:
        return np.where(self.padding.valid, 0.0, _neg_big(self.e.np_dtype)).astype(self.e.np_dtype)

    def emit(self) -> None:
        self.build()
        self.e.replace(self.m, self.nodes)

    def build(self) -> None:
        raise NotImplementedError


class WindowedEmitter(_Emitter):
    """Windows first, as every converter we target runs it correctly (OpenVINO's offline route
    folds other reshaped layouts into one unmasked attention): q, k, v become
    ``[windows, heads, w, head_dim]``; uneven windows get a key mask ``[windows, 1, 1, w]``."""

    tag = "windowed"

    def windows_of(self, t: str, tag: str, perm: list[int]) -> str:
        """[1, H, S, D] -> [nW, H, wmax, D] (k: [nW, H, D, wmax]); a Transpose is the last op before
        the MatMul, which keeps OpenVINO's SDPAReshapeFusion from folding the windows away."""
        H, D = self.plan.heads, self.plan.head_dim
        if self.padding is not None:
            t = self.op("Gather", [t, self.e.const("attn_window_pad_index", self.padding.pad)], f"Gather_pad_{tag}",
                        axis=2)
        t = self.op("Reshape", [t, self.e.const("attn_shape_hwld", np.array([H, self.nW, self.wmax, D], np.int64))],
                    f"Reshape_{tag}")
        return self.op("Transpose", [t], f"Transpose_{tag}", perm=perm)

    def build(self) -> None:
        m, H, S, D = self.m, self.plan.heads, self.plan.seq, self.plan.head_dim
        q4 = self.windows_of(m.q, "q", [1, 0, 2, 3])
        kt = self.windows_of(m.k, "k", [1, 0, 3, 2])
        v4 = self.windows_of(m.v, "v", [1, 0, 2, 3])
        s = self.op("MatMul", [q4, kt], "MatMul_qk")
        s = self.op(m.scale.op_type, [s, m.scale_const], "Scale")
        if self.padding is not None:
            mask = self.e.const("attn_window_key_mask", self.key_mask().reshape(self.nW, 1, 1, self.wmax))
            s = self.op("Add", [s, mask], "Add_key_mask")
        pr = self.op("Softmax", [s], "Softmax", axis=-1)
        o = self.op("MatMul", [pr, v4], "MatMul_v")                       # [nW, H, wmax, D]
        o = self.op("Transpose", [o], "Transpose_out", perm=[1, 0, 2, 3])  # [H, nW, wmax, D]
        out = m.pv.output[0]
        if self.padding is None:
            self.op("Reshape", [o, self.e.const("attn_shape_1hsd", np.array([1, H, S, D], np.int64))], "Reshape_out",
                    outs=[out])
        else:
            o = self.op("Reshape", [o, self.e.const("attn_shape_1hpd", np.array([1, H, self.nW * self.wmax, D],
                                                                                np.int64))], "Reshape_out")
            self.op("Gather", [o, self.e.const("attn_window_unpad_index", self.padding.unpad)], "Gather_unpad",
                    outs=[out], axis=2)


class _FusedEmitter(_Emitter):
    """Fused attention ops take ``[batch, L, H*D]``: windows are the batch."""

    def seq3(self, t: str, tag: str) -> str:
        H, D = self.plan.heads, self.plan.head_dim
        t = self.op("Transpose", [t], f"Transpose_{tag}", perm=[0, 2, 1, 3])  # [1, S, H, D]
        if self.padding is not None:
            t = self.op("Gather", [t, self.e.const("attn_window_pad_index", self.padding.pad)], f"Gather_pad_{tag}",
                        axis=1)
        return self.op("Reshape", [t, self.e.const("attn_shape_blc", np.array([self.nW, self.wmax, H * D], np.int64))],
                       f"Reshape_{tag}")

    def bias(self) -> list[str]:
        if self.padding is None:
            return []
        full = np.broadcast_to(self.key_mask().reshape(self.nW, 1, 1, self.wmax),
                               (self.nW, 1, self.wmax, self.wmax)).copy()
        return [self.e.const("attn_window_bias", full)]

    def fused(self, q3: str, k3: str, v3: str) -> str:
        raise NotImplementedError

    def build(self) -> None:
        m, H, S, D = self.m, self.plan.heads, self.plan.seq, self.plan.head_dim
        o = self.fused(self.seq3(m.q, "q"), self.seq3(m.k, "k"), self.seq3(m.v, "v"))
        if self.padding is None:
            o = self.op("Reshape", [o, self.e.const("attn_shape_1shd", np.array([1, S, H, D], np.int64))], "Reshape_out")
        else:
            o = self.op("Reshape", [o, self.e.const("attn_shape_1pc", np.array([1, self.nW * self.wmax, H * D],
                                                                               np.int64))], "Reshape_pad")
            o = self.op("Gather", [o, self.e.const("attn_window_unpad_index", self.padding.unpad)], "Gather_unpad",
                        axis=1)
            o = self.op("Reshape", [o, self.e.const("attn_shape_1shd", np.array([1, S, H, D], np.int64))], "Reshape_out")
        self.op("Transpose", [o], "Transpose_out", outs=[m.pv.output[0]], perm=[0, 2, 1, 3])


class MhaEmitter(_FusedEmitter):
    """onnxruntime's ``com.microsoft.MultiHeadAttention``."""

    tag = "mha"

    def fused(self, q3: str, k3: str, v3: str) -> str:
        bias = self.bias()
        return self.op("MultiHeadAttention", [q3, k3, v3] + (["", ""] + bias if bias else []), "MultiHeadAttention",
                       domain="com.microsoft", num_heads=self.plan.heads, scale=self.plan.scale_value)


class OnnxAttentionEmitter(_FusedEmitter):
    """The ONNX ``Attention`` op (opset 23)."""

    tag = "onnx-attention"

    def fused(self, q3: str, k3: str, v3: str) -> str:
        H = self.plan.heads
        return self.op("Attention", [q3, k3, v3] + self.bias(), "Attention", q_num_heads=H, kv_num_heads=H,
                       scale=self.plan.scale_value)


class ChunkedFullEmitter(_Emitter):
    """Full attention with the queries in chunks of ``rows``: the same FLOPs, but the live score
    tensor is [1, H, rows, S] instead of [1, H, S, S] (5.4 GB per layer at 1344x1344 in fp32)."""

    tag = "chunked"

    def build(self) -> None:
        m, S, rows = self.m, self.plan.seq, self.plan.rows
        sizes = [rows] * (S // rows) + ([S % rows] if S % rows else [])
        split = self.e.const("attn_full_chunks_" + "_".join(map(str, sorted(set(sizes)))) + f"_{len(sizes)}",
                             np.array(sizes, np.int64))
        qs = [f"{self.prefix}/Split_q_output_{k}" for k in range(len(sizes))]
        self.nodes.append(helper.make_node("Split", [m.q, split], qs, name=f"{self.prefix}/Split_q", axis=2))
        kt = m.k_transpose.output[0]
        outs = []
        for k, q in enumerate(qs):
            c = f"chunk{k}"
            s = self.op("MatMul", [q, kt], f"{c}/MatMul_qk")
            s = self.op(m.scale.op_type, [s, m.scale_const], f"{c}/Scale")
            p = self.op("Softmax", [s], f"{c}/Softmax", axis=-1)
            outs.append(self.op("MatMul", [p, m.v], f"{c}/MatMul_v"))
        self.op("Concat", outs, "Concat", outs=[m.pv.output[0]], axis=2)
        self.chunks = len(sizes)

    def emit(self) -> None:
        self.build()
        self.e.replace(self.m, self.nodes, keep_k_transpose=True)


EMITTERS: dict[str, type[_Emitter]] = {"windowed": WindowedEmitter, "mha": MhaEmitter,
                                       "onnx-attention": OnnxAttentionEmitter}


def _cancel_transposes(graph: onnx.GraphProto) -> int:
    """Transpose(perm P) feeding only Transpose(perm P^-1): both go (the fused modes make these)."""
    prod, cons = producers(graph), consumers(graph)
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    drop: set[str] = set()
    for n in graph.node:
        if n.op_type != "Transpose" or n.output[0] in drop:
            continue
        first = prod.get(n.input[0])
        if first is None or first.op_type != "Transpose" or first.output[0] in outputs:
            continue
        p1 = next(list(a.ints) for a in first.attribute if a.name == "perm")
        p2 = next(list(a.ints) for a in n.attribute if a.name == "perm")
        if [p1[i] for i in p2] != list(range(len(p1))) or len(cons.get(first.output[0], [])) != 1:
            continue
        if n.output[0] in outputs:
            continue
        rename[n.output[0]] = first.input[0]
        drop |= {n.output[0], first.output[0]}
    if not drop:
        return 0
    keep = [n for n in graph.node if n.output[0] not in drop]
    for n in keep:
        n.input[:] = [rename.get(i, i) for i in n.input]
    del graph.node[:]
    graph.node.extend(keep)
    return len(drop)


def _upgrade_to_23(model: Model) -> None:
    """Opset 17 -> 23 for the ops this toolkit writes (ReduceMean's axes becomes an input in 18)."""
    g = model.graph
    names = {t.name for t in g.initializer}
    for n in g.node:
        if n.op_type in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd") and n.domain in ("", "ai.onnx"):
            axes = next((list(a.ints) for a in n.attribute if a.name == "axes"), None)
            if axes is None:
                continue
            name = f"{n.name or n.output[0]}/axes"
            if name not in names:
                g.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), name))
                names.add(name)
            keep = [a for a in n.attribute if a.name != "axes"]
            del n.attribute[:]
            n.attribute.extend(keep)
            n.input.append(name)
        elif n.op_type in ("Split",) and len(n.input) < 2 and any(a.name == "split" for a in n.attribute):
            raise BadInput(f"{n.name}: Split with a 'split' attribute cannot be upgraded here; re-export")
    for o in model.proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 23
    model.proto.ir_version = max(model.proto.ir_version, 10)


DYNAMIC_REFUSAL = ("this is a dynamic export: its attention is already per window (padded windows [windows, heads, "
                   "64, head_dim] with a key mask, full attention per frame) and has no S x S mask to drop; the "
                   "attention pass rewrites static exports (fused modes included)")


def _rewrite_attention(model: Model, *, mode: str, upgrade_opset: bool, full_chunk_mb: float
                       ) -> tuple[Model, AttentionReport]:
    """match (find_attention) -> plan (plan_attention) -> emit (one emitter per mode);
    ``full_chunk_mb``: the option's help (a ceiling)."""
    if mode not in MODES:
        raise BadInput("{mode}: choose one of " + ", ".join(MODES), mode=mode)
    if model.metadata().get("qvl_surgery.dynamic"):
        raise BadInput(DYNAMIC_REFUSAL)
    done = model.metadata().get("qvl_surgery.attention") or rewritten_attention(model.graph)
    if done:
        raise BadInput(f"attention was already rewritten here ({done}); the pass rewrites an export's attention "
                       "once: run it on the fp32 export")
    model = model.copy()
    g = model.graph
    report = AttentionReport(mode)
    opset = next((o.version for o in model.proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if mode == "onnx-attention" and opset < 23 and not upgrade_opset:
        raise BadInput("{mode} needs opset 23 (the ONNX Attention op); this model is opset "
                       f"{opset}: add {{upgrade_opset}}, or use mode windowed or mha", mode=mode, upgrade_opset=True)
    matches = find_attention(model, report)
    if not matches:
        hint = f" ({report.misses[0]})" if report.misses else ""
        raise BadInput(f"no attention pattern (MatMul(q, k^T) -> scale -> [mask] -> Softmax -> MatMul(v)) in this "
                       f"model{hint}")
    shapes = _shapes(model)
    e = _Edit(model, shapes[matches[0].q].elem_type)
    itemsize = np.dtype(e.np_dtype).itemsize
    for plan in plan_attention(model, matches, mode, full_chunk_mb, itemsize, shapes):
        m, H, S = plan.match, plan.heads, plan.seq
        if plan.action == "keep":
            report.unchanged.append(f"{m.name}: full attention, no mask (nothing to drop)")
        elif plan.action == "chunk":
            em = ChunkedFullEmitter(e, plan)
            em.emit()
            report.rewritten.append(f"{m.name}: full attention, queries in {em.chunks} chunks of {plan.rows} rows "
                                    f"(scores {H * plan.rows * S * itemsize / 1e6:.0f} MB instead of "
                                    f"{H * S * S * itemsize / 1e6:.0f} MB)")
        elif plan.action == "drop_mask":
            e.new_nodes[m.softmax.output[0]] = [helper.make_node("Softmax", [m.scale.output[0]], [m.softmax.output[0]],
                                                                 name=m.softmax.name, axis=-1)]
            e.drop |= {m.mask_add.output[0], m.softmax.output[0]}
            report.rewritten.append(f"{m.name}: dropped an all-true mask")
        else:
            EMITTERS[mode](e, plan).emit()
            w = plan.windows
            kind = "full" if m.windows is None else (f"{len(w)} windows of {w[0]}" if plan.uniform
                                                      else f"{len(w)} windows of {min(w)}..{max(w)}, padded to {max(w)}")
            report.rewritten.append(f"{m.name}: {kind}")
    _apply_edit(model, e)
    if mode != "windowed":
        _cancel_transposes(g)
    if mode == "mha" and not any(o.domain == "com.microsoft" for o in model.proto.opset_import):
        model.proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if mode == "onnx-attention" and opset < 23:
        _upgrade_to_23(model)
    model, report.removed_nodes = cleanup(model)
    model.set_metadata("qvl_surgery.attention", mode)
    return model, report


def _apply_edit(model: Model, e: _Edit) -> None:
    g = model.graph
    nodes = []
    for n in g.node:
        key = n.output[0]
        if key in e.new_nodes:
            nodes.extend(e.new_nodes[key])
        if key not in e.drop:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(e.inits)
    # types do not change here: keep the value_info of tensors that still exist (the export's hidden
    # states, which split reads), drop the rest
    produced = {o for n in g.node for o in n.output}
    kept_vi = [v for v in g.value_info if v.name in produced]
    del g.value_info[:]
    g.value_info.extend(kept_vi)


class AttentionPass(Pass):
    name = "attention"
    help = "rewrite attention: windowed blocks without dense masks, or fused ops"
    example = ("qvl-surgery attention out/model.onnx -o out/windowed.onnx\n"
               "  qvl-surgery attention out/model.onnx -o out/mha.onnx --mode mha")
    options = (
        Option("mode", str, "windowed", "windowed: batched per-window attention; mha: "
               "com.microsoft.MultiHeadAttention for onnxruntime; onnx-attention: the ONNX Attention op (opset 23)",
               choices=MODES),
        Option("upgrade_opset", bool, False, "with mode onnx-attention: raise the model to opset 23"),
        Option("full_chunk_mb", float, 256.0, "windowed mode: ceiling in MB on one chunk of full-attention scores; "
               "layers whose S x S scores exceed it compute their queries in chunks under it (0: never chunk)",
               metavar="MB"),
    )

    def preflight(self, facts: dict) -> None:
        if facts.get("dynamic"):
            raise BadInput(DYNAMIC_REFUSAL)

    def apply(self, model: Model, context: Context) -> PassResult:
        out, report = _rewrite_attention(model, **vars(self.o))
        return PassResult(out, report)


rewrite_attention = AttentionPass.function("rewrite_attention")
