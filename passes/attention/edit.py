"""The graph edit the emitters fill (new nodes before the ones they replace, nodes dropped, shared
constants), applied in one go; and the clean-ups after it (inverse Transposes cancelled, opset 23)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.modelfile import Model
from qvl_surgery.core.patterns import consumers, producers

from passes.attention.match import AttentionMatch


class Edit:
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


def apply_edit(model: Model, e: Edit) -> None:
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


def cancel_transposes(graph: onnx.GraphProto) -> int:
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


def upgrade_to_23(model: Model) -> None:
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
