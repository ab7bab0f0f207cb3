"""What to do with each matched attention, from its shapes, its windows and the mode."""
from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import onnx

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.graphinfo import constant_value
from qvl_surgery.core.modelfile import Model

from passes.attention.match import AttentionMatch, windows_of_mask


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


def tensor_shapes(model: Model) -> dict[str, onnx.TypeProto.Tensor]:
    inferred = onnx.shape_inference.infer_shapes(model.proto).graph
    return {v.name: v.type.tensor_type for v in list(inferred.value_info) + list(inferred.input)}


def plan_attention(model: Model, matches: list[AttentionMatch], o: SimpleNamespace, itemsize: int,
                   shapes: dict) -> list[AttentionPlan]:
    """One plan per match; ``o``: the pass's options (``self.o``: ``mode``, ``full_chunk_mb``)."""
    mode, full_chunk_mb = o.mode, o.full_chunk_mb
    layout = json.loads(model.metadata().get("qvl_surgery.window_layout", "null") or "null")
    plans = []
    for m in matches:
        t = shapes.get(m.q)
        dims = [d.dim_value for d in t.shape.dim] if t is not None else []
        if len(dims) != 4 or dims[0] != 1 or not all(dims):
            raise BadInput(f"{m.name}: q must have a static shape [1, heads, seq, head_dim]; found {dims or 'unknown'}")
        _, H, S, D = dims
        if m.mask is not None:
            m.windows = windows_of_mask(model, m.mask, S)
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
