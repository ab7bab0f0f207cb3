"""What is in a model file, read from the graph only: no weight bytes are touched."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .graphinfo import constant_value
from .modelfile import PROTOBUF_LIMIT, Model, dtype_of, load_model


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


@dataclass
class InspectReport:
    path: Path
    onnx_bytes: int
    data_files: dict[str, int]
    weights_by_dtype: dict[str, tuple[int, int]]  # dtype -> (tensors, bytes)
    ops: Counter
    opsets: dict[str, int]
    metadata: dict[str, str]
    attention: int
    sigmoid_mul: int
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(b for _, b in self.weights_by_dtype.values())

    @property
    def inline_size(self) -> int:
        """Size the model would have as a single protobuf with every weight inline."""
        return self.onnx_bytes + sum(self.data_files.values())

    @property
    def fits_protobuf(self) -> bool:
        return self.inline_size <= PROTOBUF_LIMIT

    def to_dict(self) -> dict:
        return {"path": str(self.path), "onnx_bytes": self.onnx_bytes, "data_files": self.data_files,
                "weights_by_dtype": {k: {"tensors": n, "bytes": b} for k, (n, b) in self.weights_by_dtype.items()},
                "ops": dict(self.ops), "opsets": self.opsets, "metadata": self.metadata,
                "attention_patterns": self.attention, "sigmoid_mul_patterns": self.sigmoid_mul,
                "inputs": self.inputs, "outputs": self.outputs,
                "fits_protobuf_2gb": self.fits_protobuf}

    def lines(self) -> list[str]:
        gb = 1e9
        out = [f"{self.path}",
               f"  graph file      {self.onnx_bytes:,} bytes",
               *[f"  data file       {k}: {v:,} bytes" for k, v in self.data_files.items()],
               f"  weights         {self.weight_bytes / gb:.3f} GB in "
               f"{sum(n for n, _ in self.weights_by_dtype.values())} tensors"]
        for dt, (n, b) in sorted(self.weights_by_dtype.items()):
            out.append(f"    {dt:<10} {n:5d} tensors {b / gb:9.3f} GB")
        out.append(f"  2 GB protobuf   {'fits' if self.fits_protobuf else 'does NOT fit'} as one file "
                   f"({self.inline_size / gb:.2f} GB with weights inline)"
                   + ("" if self.fits_protobuf else "; keep external data, or split it"))
        out.append("  opset           " + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in self.opsets.items()))
        out += [f"  inputs          {', '.join(self.inputs)}", f"  outputs         {', '.join(self.outputs)}"]
        out.append(f"  attention       {self.attention} patterns")
        out.append(f"  sigmoid*mul     {self.sigmoid_mul} patterns (x * sigmoid(x))")
        out.append(f"  nodes           {sum(self.ops.values())}: "
                   + ", ".join(f"{op} {n}" for op, n in self.ops.most_common()))
        for k, v in self.metadata.items():
            v = v if len(v) <= 100 else v[:97] + "..."
            out.append(f"  meta {k} = {v}")
        return out


def _value_desc(v: onnx.ValueInfoProto) -> str:
    t = v.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return f"{v.name} {onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}{dims}"


def inspect_model(path: str | Path) -> InspectReport:
    model: Model = load_model(path)
    g = model.graph
    by_dtype: dict[str, list[int]] = {}
    for t in g.initializer:
        e = by_dtype.setdefault(dtype_of(t).name, [0, 0])
        e[0] += 1
        e[1] += model.tensor_nbytes(t)
    files = {p.name: p.stat().st_size for p in sorted(model.data_files())}
    return InspectReport(
        path=Path(path), onnx_bytes=Path(path).stat().st_size, data_files=files,
        weights_by_dtype={k: (v[0], v[1]) for k, v in by_dtype.items()},
        ops=Counter(n.op_type for n in g.node),
        opsets={o.domain: o.version for o in model.proto.opset_import},
        metadata=model.metadata(), attention=attention_count(g), sigmoid_mul=len(sigmoid_mul_patterns(g)),
        inputs=[_value_desc(v) for v in g.input if v.name not in {t.name for t in g.initializer}],
        outputs=[_value_desc(v) for v in g.output])
