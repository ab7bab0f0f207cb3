"""What a model or a split takes and gives, read from the graph (or a split's manifest) alone: no
onnxruntime session, no weight read. The one reader of inputs and outputs: compare, inputs,
emulate, calibrate, runners and scripts/compat all use it.

A dimension is an int (fixed), a str (symbolic, e.g. ``num_patches`` of the dynamic export) or
None (unknown); only fixed dimensions constrain what a feed may be.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ml_dtypes  # noqa: F401  numpy knows "bfloat16" by name once it is imported (a split's manifest)
import numpy as np
import onnx

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.manifest import is_manifest_path, read_manifest
from qvl_surgery.core.modelfile import Model, load_model


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def mismatch(self, array) -> str | None:
        """Why ``array`` cannot feed this input (None when it can; its dtype is cast by the caller)."""
        got = list(np.shape(array))
        if len(got) != len(self.shape) or any(isinstance(d, int) and d != g for d, g in zip(self.shape, got)):
            return f"{self.name!r} has shape {got}, the model takes {list(self.shape)}"
        return None


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def check_feeds(self, feeds, where: str | None = "inputs") -> None:
        """One line for a missing input or a shape the graph cannot take (prefixed ``where:`` unless None)."""
        prefix = f"{where}: " if where else ""
        for t in self.inputs:
            if t.name not in feeds:
                raise BadInput(f"{prefix}no array named {t.name!r} (the model takes {self.input_names})")
            why = t.mismatch(feeds[t.name])
            if why:
                raise BadInput(prefix + why)

    def cast(self, feeds) -> dict[str, np.ndarray]:
        """The model's inputs from ``feeds``, each cast to the dtype the graph declares (an fp16 model
        takes fp32 pixels; a bf16 one, fp32 pixels rounded to ml_dtypes' bfloat16, nearest even);
        extra arrays are left out."""
        out = {}
        for t in self.inputs:
            if t.name not in feeds:
                raise BadInput(f"no value for input {t.name!r} (the model takes {self.input_names})")
            out[t.name] = np.asarray(feeds[t.name]).astype(t.dtype, copy=False)
        return out


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _spec(v: onnx.ValueInfoProto) -> TensorSpec:
    t = v.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
    return TensorSpec(v.name, _np_dtype(t.elem_type), dims)


def _from_record(r: dict) -> TensorSpec:
    return TensorSpec(r["name"], np.dtype(r["dtype"]), tuple(r["shape"]))


def model_signature(model: Model) -> Signature:
    inits = {t.name for t in model.graph.initializer}
    return Signature(tuple(_spec(i) for i in model.graph.input if i.name not in inits),
                     tuple(_spec(o) for o in model.graph.output))


def split_signature(manifest_path: str | Path) -> Signature:
    """A split's chain: part 0's inputs plus the side inputs later parts take (a dynamic export's
    grid tensors that part 0 may not need), and the last part's outputs."""
    m = read_manifest(manifest_path, verify_hashes=False)
    ins: dict[str, TensorSpec] = {}
    produced: set[str] = set()
    for p in m.parts:
        for r in p["inputs"]:
            if r["name"] not in produced and r["name"] not in ins:
                ins[r["name"]] = _from_record(r)
        produced.update(o["name"] for o in p["outputs"])
    return Signature(tuple(ins.values()), tuple(_from_record(o) for o in m.parts[-1]["outputs"]))


def head_model(path: str | Path) -> Model:
    """The model at ``path``, or a split's first part (where its metadata lives), weights unread."""
    if is_manifest_path(path):
        return load_model(read_manifest(path, verify_hashes=False).part_paths()[0])
    return load_model(path)


def signature(source: str | Path | Model) -> Signature:
    """The signature of a Model, a model file, or a split (its folder or manifest.json)."""
    if isinstance(source, Model):
        return model_signature(source)
    if is_manifest_path(source):
        return split_signature(source)
    return model_signature(load_model(source))
