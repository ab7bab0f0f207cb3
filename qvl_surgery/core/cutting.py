"""Cutting a model into self-contained parts and joining parts back: the split and merge passes'
algorithms, and what simplify runs part by part.

Cutting (split):
- A cut point is a place in node order where exactly one activation crosses from earlier to
  later nodes (constants and tensors computed only from constants do not count: a part that
  needs them gets its own copy). In this toolkit's exports those places are the hidden state
  between blocks (``blocks.{i}.output``) and before the merger; when the model's metadata names
  them, only those are used, otherwise every single-tensor crossing is a candidate.
- Cut points are chosen to minimise the largest part's weight bytes (exact, by dynamic
  programming), or given explicitly with ``at``: a block index K cuts at the hidden state
  entering block K (``merger`` cuts before the merger), or a tensor name.
- Each part is ``partK.onnx`` + ``partK.onnx.data`` with only its own weights, < 2 GB, checked
  with ``onnx.checker`` by path. ``manifest.json`` lists the parts in chain order with their
  inputs, outputs (names, dtypes, shapes) and data-file sizes and hashes (xxh3_128).

Joining (merge): nodes are taken in chain order; a node whose outputs an earlier part already produces
(a constant subgraph that split repeated) is kept once; an initializer repeated in several
parts is stored once, and must be byte-identical in each (it is compared, it is small: only
constants are repeated). The result has part 0's inputs, the last part's outputs, the union of
value_info, and the source's metadata. Bytes are streamed by modelfile.save_model.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from onnx import helper

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.graphinfo import CutPoint, Plan, analyse, block_outputs, side_inputs, value_types, with_graph
from qvl_surgery.core.modelfile import PROTOBUF_LIMIT, Model
from qvl_surgery.core.values import Part, Split

log = logging.getLogger(__name__)


@dataclass
class JoinStats:
    parts: int
    nodes: int
    dropped_nodes: int
    shared_initializers: int


def _candidates(model: Model, plan: Plan) -> list[CutPoint]:
    named = set(block_outputs(model))
    if named:
        chosen = [c for c in plan.cut_points if c.tensor in named]
        if chosen:
            return chosen
    return plan.cut_points


def _resolve_at(model: Model, cands: list[CutPoint], plan: Plan, at: list[str]) -> list[CutPoint]:
    by_tensor = {c.tensor: c for c in plan.cut_points}
    names = block_outputs(model)
    chosen = []
    for item in at:
        item = str(item).strip()
        if item == "merger" and names:
            tensor = names[-1]
        elif item.lstrip("-").isdigit() and names:
            k = int(item)
            if not 0 <= k < len(names):
                raise BadInput("{at}: block index out of range " + f"(0..{len(names) - 1}, or 'merger')", at=item)
            tensor = names[k]
        else:
            tensor = item
        if tensor not in by_tensor:
            hint = ", ".join(c.tensor for c in cands[:4])
            raise BadInput("{at}: " + f"{tensor!r} is not a clean cut point (more than one activation crosses "
                           f"there, or no such tensor); clean ones include {hint}", at=item)
        chosen.append(by_tensor[tensor])
    chosen = sorted(set(chosen), key=lambda c: c.position)
    return chosen


def _balanced(cands: list[CutPoint], plan: Plan, parts: int) -> list[CutPoint]:
    """Cut points that minimise the largest part's weight bytes (DP over candidates)."""
    if parts - 1 > len(cands):
        raise BadInput("{parts}: " + f"this model has only {len(cands)} clean cut points, so at most "
                       f"{len(cands) + 1} parts; use fewer parts or choose the cuts with " + "{at}", parts=parts,
                       at="K,...")
    pos = [0] + [c.bytes_before for c in cands] + [plan.total_bytes]
    n = len(pos)
    INF = float("inf")
    # best[j][k]: minimal max part bytes covering [0, pos[j]] with k parts ending at j
    best = [[INF] * (parts + 1) for _ in range(n)]
    back = [[-1] * (parts + 1) for _ in range(n)]
    best[0][0] = 0
    for j in range(1, n):
        for k in range(1, parts + 1):
            for i in range(j):
                if best[i][k - 1] == INF:
                    continue
                if (i == 0) != (k - 1 == 0):
                    continue
                v = max(best[i][k - 1], pos[j] - pos[i])
                if v < best[j][k]:
                    best[j][k], back[j][k] = v, i
    j, k, idx = n - 1, parts, []
    while k > 0:
        i = back[j][k]
        if i > 0:
            idx.append(i)
        j, k = i, k - 1
    return [cands[i - 1] for i in sorted(idx)]


def plan_cuts(model: Model, *, parts: int | None = None, at: list[str] | None = None,
              max_part_bytes: int | None = None) -> tuple[Plan, list[CutPoint], int]:
    plan = analyse(model)
    cands = _candidates(model, plan)
    if at:
        return plan, _resolve_at(model, cands, plan, at), len(cands)
    if max_part_bytes is not None:
        if max_part_bytes <= 0:
            raise BadInput("{max_part_bytes}: must be positive", max_part_bytes=max_part_bytes)
        for n in range(1, len(cands) + 2):
            cuts = _balanced(cands, plan, n) if n > 1 else []
            edges = [0] + [c.bytes_before for c in cuts] + [plan.total_bytes]
            if max(b - a for a, b in zip(edges, edges[1:])) <= max_part_bytes:
                return plan, cuts, len(cands)
        raise BadInput("{max_part_bytes}: even one part per cut point is larger; the largest block does not fit",
                       max_part_bytes=max_part_bytes)
    if parts is None or parts < 1:
        raise BadInput("{parts}: need at least 1 part", parts=parts)
    if parts > 1 and not cands:
        raise BadInput("this model has no clean cut point (no place where a single activation crosses); "
                       "name a tensor with {at} if you know one", at="TENSOR")
    return plan, (_balanced(cands, plan, parts) if parts > 1 else []), len(cands)


def _part_models(model: Model, plan: Plan, cuts: list[CutPoint]) -> list["Part"]:
    g = model.graph
    bounds = [0] + [c.position for c in cuts] + [len(plan.live)]
    # nodes are identified by their first output (protobuf wrappers have no stable id())
    live_keys = {n.output[0] for n in plan.live}
    constant_producer = {o: n for n in g.node if n.output[0] not in live_keys for o in n.output}
    inits = {t.name: t for t in g.initializer}
    graph_inputs = [i for i in g.input if i.name not in inits]
    side = [i for i in graph_inputs if i.name in set(side_inputs(model))]
    cut_tensors = [c.tensor for c in cuts]
    types = value_types(model, set(cut_tensors))
    result = []
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        chosen = {n.output[0] for n in plan.live[lo:hi]}
        # the constant-only nodes it needs
        stack = [i for n in plan.live[lo:hi] for i in n.input]
        while stack:
            t = stack.pop()
            p = constant_producer.get(t)
            if p is not None and p.output[0] not in chosen:
                chosen.add(p.output[0])
                stack.extend(p.input)
        nodes = [n for n in g.node if n.output[0] in chosen]
        used = {i for n in nodes for i in n.input}
        part_inits = [t for t in g.initializer if t.name in used]
        ins = graph_inputs if k == 0 else [types[cut_tensors[k - 1]]] + side
        ins = [i for i in ins if i.name in used]
        outs = list(g.output) if k == len(bounds) - 2 else [types[cut_tensors[k]]]
        produced = {o for n in nodes for o in n.output}
        vi = [v for v in g.value_info if v.name in produced and v.name not in {o.name for o in outs}]
        pg = helper.make_graph(nodes, f"{g.name}_part{k}", ins, outs, initializer=part_inits, value_info=vi)
        part = with_graph(model, pg, {t.name: model.sources[t.name] for t in part_inits if t.name in model.sources})
        part.set_metadata("qvl_surgery.part", json.dumps({"index": k, "of": len(bounds) - 1}))
        result.append(Part(part, [i.name for i in ins], [o.name for o in outs]))
    return result


def cut_model(model: Model, *, parts: int | None, at: list[str] | None,
              max_part_bytes: float | None) -> Split:
    """``model`` cut into a :class:`Split` value (exactly one of ``parts``, ``at``, ``max_part_bytes``);
    nothing is written."""
    given = sum(x is not None and x != [] for x in (parts, at, max_part_bytes))
    if given != 1:
        raise BadInput("split: give exactly one of {parts}, {at}, {max_part_bytes}", parts="N", at="CUT[,CUT...]",
                       max_part_bytes="BYTES")
    if max_part_bytes is not None:
        max_part_bytes = int(max_part_bytes)
    plan, cuts, ncand = plan_cuts(model, parts=parts, at=at, max_part_bytes=max_part_bytes)
    built = _part_models(model, plan, cuts)
    for k, part in enumerate(built):
        size = part.model.weight_bytes() + part.model.proto.ByteSize()
        if size > PROTOBUF_LIMIT:
            raise BadInput(f"part {k} would be {size / 1e9:.2f} GB, above protobuf's 2 GB limit; use more parts or "
                           "{max_part_bytes}", max_part_bytes="1.5e9")
    chain_inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    return Split(built, [c.tensor for c in cuts], str(model.path) if model.path else None, ncand,
                 inputs=chain_inputs)


def join_parts(parts: list[Model], input_order: list[str] | None = None) -> tuple[Model, JoinStats]:
    """The parts of a split joined into one model (merge's rules, above). ``input_order``: the chain's input names in the source model's order (a split records them)."""
    nodes, produced = [], set()
    inits, sources, vinfo = {}, {}, {}
    dropped = shared = 0
    for k, part in enumerate(parts):
        g = part.graph
        for n in g.node:
            if n.output and all(o in produced for o in n.output):
                dropped += 1
                continue
            nodes.append(n)
            produced.update(n.output)
        for t in g.initializer:
            if t.name in inits:
                a, b = parts[inits[t.name][0]].read_array(t.name), part.read_array(t.name)
                if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
                    raise BadInput(f"initializer {t.name!r} differs between parts {inits[t.name][0]} and {k}; "
                                   "these parts do not come from one split")
                shared += 1
                continue
            inits[t.name] = (k, t)
            if t.name in part.sources:
                sources[t.name] = part.sources[t.name]
        for v in list(g.value_info) + (list(g.input) if k else []) + (list(g.output) if k < len(parts) - 1 else []):
            vinfo.setdefault(v.name, v)
    first, last = parts[0], parts[-1]
    init_names = set(inits)
    # the chain's inputs: part 0's, then side inputs a later part takes that no part before it makes
    # (a host-inputs export's reverse_index is first read by the merger)
    chain_inputs, made = [], set()
    for part in parts:
        for i in part.graph.input:
            if i.name not in init_names and i.name not in made and i.name not in {c.name for c in chain_inputs}:
                chain_inputs.append(i)
        made.update(o for n in part.graph.node for o in n.output)
    if input_order:
        rank = {n: k for k, n in enumerate(input_order)}
        chain_inputs.sort(key=lambda i: rank.get(i.name, len(rank)))
    g = helper.make_graph(nodes, first.graph.name.removesuffix("_part0"), chain_inputs, list(last.graph.output),
                          initializer=[t for _, t in inits.values()],
                          value_info=[v for name, v in vinfo.items() if name in produced])
    merged = with_graph(first, g, sources, drop_metadata=("qvl_surgery.part",))
    return merged, JoinStats(len(parts), len(nodes), dropped, shared)
