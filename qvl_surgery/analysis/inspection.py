"""What is in a model file, read from the graph only: no weight bytes are touched."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from qvl_surgery.core.modelfile import PROTOBUF_LIMIT, Model, dtype_of, load_model
from qvl_surgery.core.patterns import attention_count, sigmoid_mul_patterns


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
