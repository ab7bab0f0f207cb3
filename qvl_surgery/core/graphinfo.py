"""Facts about a graph that several passes need: constant-only nodes, single-tensor cut
points, value types. Works on the weightless proto; never reads weight bytes."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.imagein import IMAGE_NAME, layout_of
from qvl_surgery.core.modelfile import Model, read_initializer

log = logging.getLogger(__name__)


def side_inputs(model: Model) -> list[str]:
    """Graph inputs that every part of a split takes beside the activation: for the dynamic export,
    everything but ``pixel_values`` (``image_grid_thw``, or the host-computed grid tensors); for
    any model, its non-float inputs but an image-in export's image (uint8, and the activation).
    What they compute (window order, rotary tables, masks) is treated like constants: each part
    that needs it recomputes it from them."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    ins = [i for i in g.input if i.name not in inits]
    meta = model.metadata()
    if meta.get("qvl_surgery.dynamic"):
        return [i.name for i in ins if i.name != "pixel_values"]
    image = IMAGE_NAME if layout_of(meta) else None
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    return [i.name for i in ins if i.type.tensor_type.elem_type not in floats and i.name != image]


def constant_value(model: Model, name: str, *, max_size: int | None = None) -> np.ndarray | None:
    """The value of ``name`` when it is a constant: an initializer, or the output of a Constant node
    (exporters write both). None when it is not, or has more than ``max_size`` elements (a matcher
    that wants a scalar does not read a weight)."""
    t = model.initializers().get(name)
    if t is not None:
        if max_size is not None and int(np.prod(t.dims, dtype=np.int64)) > max_size:
            return None
        return read_initializer(t, model.sources.get(name))
    node = next((n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == name), None)
    a = node.attribute[0] if node is not None and len(node.attribute) == 1 else None
    if a is None or a.name not in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        return None
    value = numpy_helper.to_array(a.t) if a.name == "value" else np.asarray(helper.get_attribute_value(a))
    return None if max_size is not None and value.size > max_size else value


def constant_tensors(graph: onnx.GraphProto, side: Iterable[str] = ()) -> set[str]:
    """Initializers, the ``side`` inputs, and every tensor computed from those only (e.g. the
    window mask; in the dynamic export, everything derived from image_grid_thw)."""
    known = {t.name for t in graph.initializer} | {""} | set(side)
    for n in graph.node:
        if all(i in known for i in n.input):
            known.update(n.output)
    return known


def is_constant(node: onnx.NodeProto, constant: set[str]) -> bool:
    return all(i in constant for i in node.input)


def check_topological(graph: onnx.GraphProto) -> None:
    seen = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {""}
    for n in graph.node:
        for i in n.input:
            if i not in seen:
                raise BadInput(f"node {n.name!r} reads {i!r} before it is produced; the graph is not in "
                               "topological order (run it through onnx-graphsurgeon's toposort first)")
        seen.update(n.output)


@dataclass(frozen=True)
class CutPoint:
    position: int        # index into the live nodes (those not constant-only): the cut is before live node `position`
    tensor: str          # the one activation crossing the cut
    bytes_before: int    # weight bytes used by live nodes before the cut


@dataclass
class Plan:
    live: list[onnx.NodeProto]
    constant: set[str]
    cut_points: list[CutPoint]
    total_bytes: int
    node_bytes: list[int]


def analyse(model: Model) -> Plan:
    """Every place where exactly one non-constant tensor crosses from earlier to later nodes."""
    g = model.graph
    check_topological(g)
    side = side_inputs(model)
    constant = constant_tensors(g, side)
    live = [n for n in g.node if not is_constant(n, constant)]
    init_bytes = {t.name: model.tensor_nbytes(t) for t in g.initializer}
    produced_at: dict[str, int] = {i.name: -1 for i in g.input if i.name not in init_bytes and i.name not in side}
    last_use: dict[str, int] = {}
    node_bytes = []
    counted: set[str] = set()
    # Initializers reached through constant nodes (e.g. window_id) count where first used.
    constant_producer = {o: n for n in g.node if is_constant(n, constant) for o in n.output}

    def weight_inputs(name: str, acc: set[str]) -> None:
        if name in init_bytes:
            acc.add(name)
        elif name in constant_producer:
            for i in constant_producer[name].input:
                weight_inputs(i, acc)

    for k, n in enumerate(live):
        acc: set[str] = set()
        for i in n.input:
            if i in produced_at:
                last_use[i] = k
            elif i in constant:
                weight_inputs(i, acc)
        node_bytes.append(sum(init_bytes[a] for a in acc - counted))
        counted |= acc
        for o in n.output:
            produced_at[o] = k
    for o in g.output:
        last_use[o.name] = len(live)
    # crossing[p] = tensors with produced_at < p <= last_use
    delta = [0] * (len(live) + 2)
    for t, a in produced_at.items():
        b = last_use.get(t)
        if b is None or b <= a:
            continue
        delta[a + 1] += 1
        delta[b + 1] -= 1
    crossing_count, run = [], 0
    for p in range(len(live) + 1):
        run += delta[p]
        crossing_count.append(run)
    cuts = []
    cum = 0
    by_producer: dict[int, list[str]] = {}
    for t, a in produced_at.items():
        by_producer.setdefault(a, []).append(t)
    for p in range(1, len(live)):
        cum += node_bytes[p - 1]
        if crossing_count[p] != 1:
            continue
        # the crossing tensor is one produced before p and used at or after p
        cand = [t for t in live[p - 1].output if last_use.get(t, -1) >= p]
        if not cand:
            cand = [t for t, a in produced_at.items() if a < p <= last_use.get(t, -1)]
        cuts.append(CutPoint(p, cand[0], cum))
    return Plan(live, constant, cuts, sum(node_bytes), node_bytes)


def block_outputs(model: Model) -> list[str]:
    raw = model.metadata().get("qvl_surgery.block_outputs")
    return json.loads(raw) if raw else []


# contrib ops whose output type is not their first input's: the input whose type they give
# (MatMulIntegerToFloat reads uint8 / int8 and gives its scale's float type)
_OUTPUT_TYPE_OF_INPUT = {"MatMulIntegerToFloat": 2}


def infer_graph(model: Model) -> onnx.GraphProto:
    """Shape inference on the weightless proto (small). Outputs of ops that onnx cannot infer
    (com.microsoft.MultiHeadAttention, ...) take the element type of the node's first input (or the
    input :data:`_OUTPUT_TYPE_OF_INPUT` names), and inference runs again from there, so tensors after
    them get types too."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    for _ in range(8):
        g = onnx.shape_inference.infer_shapes(proto).graph
        known = {t.name for t in g.initializer} | {v.name for v in list(g.input) + list(g.output) + list(g.value_info)
                                                    if v.type.tensor_type.elem_type}
        types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.value_info)}
        types.update({t.name: t.data_type for t in g.initializer})
        added = False
        for n in g.node:
            k = _OUTPUT_TYPE_OF_INPUT.get(n.op_type, 0)
            first = n.input[k] if len(n.input) > k else ""
            if n.domain in ("", "ai.onnx") or first not in types:
                continue
            for o in n.output:
                if o and o not in known:
                    proto.graph.value_info.append(helper.make_tensor_value_info(o, types[first], None))
                    added = True
        if not added:
            return g
    return g


def elem_types(model: Model) -> dict[str, int]:
    """Element type of every tensor the graph names that :func:`infer_graph` can type."""
    g = infer_graph(model)
    types = {t.name: t.data_type for t in g.initializer}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    return types


def value_types(model: Model, names: set[str]) -> dict[str, onnx.ValueInfoProto]:
    """Type and shape of the named tensors: from the graph, else from :func:`infer_graph`."""
    g = model.graph
    found = {v.name: v for v in list(g.input) + list(g.output) + list(g.value_info) if v.name in names}
    missing = names - set(found)
    if missing:
        inferred = infer_graph(model)
        for v in list(inferred.value_info) + list(inferred.output):
            if v.name in missing:
                found[v.name] = v
    still = names - set(found)
    if still:
        raise BadInput(f"cannot tell the type of {sorted(still)[0]!r}; the graph has no value_info for it "
                       "and shape inference could not find it")
    return found


def describe_value(v: onnx.ValueInfoProto) -> dict:
    t = v.type.tensor_type
    return {"name": v.name, "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]}


def with_graph(source: Model, graph: onnx.GraphProto, sources: dict, *,
               drop_metadata: tuple[str, ...] = ()) -> Model:
    """A new Model around ``graph`` that keeps the source's opset imports, IR version, producer and
    metadata (less the ``drop_metadata`` keys): split, merge and fp16 all rebuild models this way."""
    proto = helper.make_model(graph, opset_imports=list(source.proto.opset_import),
                              producer_name=source.proto.producer_name,
                              producer_version=source.proto.producer_version)
    proto.ir_version = source.proto.ir_version
    for p in source.proto.metadata_props:
        if p.key not in drop_metadata:
            proto.metadata_props.add(key=p.key, value=p.value)
    return Model(proto, dict(sources))


def cleanup(model: Model) -> tuple[Model, int]:
    """Dead nodes and unused initializers removed, nodes in topological order: onnx-graphsurgeon's
    ``cleanup().toposort()`` on the weightless graph (its Constants keep the tensor protos as
    ``LazyValues``, so no weight byte is read). Returns the new Model and how many nodes went."""
    import onnx_graphsurgeon as gs
    before = len(model.graph.node)
    g = gs.import_onnx(model.proto)
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    graph = gs.export_onnx(g, do_type_check=False).graph
    alive = {t.name for t in graph.initializer}
    out = with_graph(model, graph, {k: v for k, v in model.sources.items() if k in alive})
    out.path = model.path
    return out, before - len(graph.node)
