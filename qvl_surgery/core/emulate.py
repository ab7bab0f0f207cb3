"""fp16 and bf16 emulation: run a model so that every fp16 (bf16) tensor is really rounded to it.

onnxruntime's CPU provider computes most fp16 ops in fp32 and even drops a rounding
Cast fp32->fp16->fp32, so it hides fp16 error. This runner uses ``onnx.reference``: every op
computes on numpy arrays of the model's own dtypes, so each fp16 output is rounded to fp16 as
on a GPU (numpy's fp16 ufuncs compute in fp32 and round the result; reductions accumulate in
fp32). MatMul and Gemm are replaced by BLAS calls that read fp16 operands as fp32, accumulate in
fp32 and round the result to fp16, as GPU tensor cores do; that also makes them fast.

bf16 (numpy has none; ml_dtypes gives it one, but ``onnx.reference`` casts to it one element at a
time in Python) runs the same way in fp32: bf16 weights, inputs and Constant values are read as the
fp32 numbers they are, Casts to bf16 become Casts to fp32, and every tensor the graph types bf16 is
rounded to bf16 (ml_dtypes: nearest even) as soon as its node has run, so each op computes in fp32
from bf16 operands and rounds its result, as bf16 hardware does. Outputs typed bf16 come back as
ml_dtypes' bfloat16.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.graphinfo import infer_graph
from qvl_surgery.core.manifest import is_manifest_path
from qvl_surgery.core.modelfile import Model, load_model
from qvl_surgery.core.runners import chain, uses_bf16
from qvl_surgery.core.signature import model_signature

log = logging.getLogger(__name__)


_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def _f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if getattr(a, "dtype", None) in (np.float16, _BFLOAT16) else a


class MatMul(OpRun):
    def _run(self, a, b):  # noqa: D401
        half = a.dtype == np.float16 or b.dtype == np.float16
        y = np.matmul(_f32(a), _f32(b))
        return (y.astype(np.float16) if half else y,)


class Gemm(OpRun):
    def _run(self, a, b, c=None, alpha=None, beta=None, transA=None, transB=None):
        half = a.dtype == np.float16
        a32, b32 = _f32(a), _f32(b)
        if transA:
            a32 = a32.T
        if transB:
            b32 = b32.T
        y = np.matmul(a32, b32)
        if alpha not in (None, 1.0):
            y *= np.float32(alpha)
        if c is not None:
            c32 = _f32(c)
            y += c32 if beta in (None, 1.0) else np.float32(beta) * c32
        return (y.astype(np.float16) if half else y,)


class Softmax(OpRun):
    """Softmax with fp32 accumulation of the sum and an fp16 result (as GPU kernels do)."""

    def _run(self, x, axis=None):
        axis = -1 if axis is None else axis
        x32 = _f32(x)
        e = np.exp(x32 - x32.max(axis=axis, keepdims=True))
        y = e / e.sum(axis=axis, keepdims=True)
        return (y.astype(x.dtype),)


CUSTOM_OPS = [MatMul, Gemm, Softmax]
BF16 = onnx.TensorProto.BFLOAT16


def bf16_tensors(model: Model) -> set[str]:
    """Names of the tensors a model types bfloat16 (empty, and no shape inference, when it has none)."""
    if not uses_bf16(model.graph):
        return set()
    g = infer_graph(model)
    names = {t.name for t in g.initializer if t.data_type == BF16}
    return names | {v.name for v in list(g.input) + list(g.output) + list(g.value_info)
                    if v.type.tensor_type.elem_type == BF16}


def _bf16_casts_to_fp32(graph: onnx.GraphProto) -> None:
    """Cast(to=bf16) -> Cast(to=fp32): the run loop rounds their outputs (onnx.reference's own bf16
    Cast converts one element at a time in Python)."""
    for n in graph.node:
        if n.op_type == "Cast":
            for a in n.attribute:
                if a.name == "to" and a.i == BF16:
                    a.i = onnx.TensorProto.FLOAT


class Emulator:
    """Run one model file, fp16 or bf16 (weights loaded; the model must be < 2 GB, as an fp16 or bf16
    encoder or a part is)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        model = load_model(path)
        self.signature = model_signature(model)
        self.input_names, self.output_names = self.signature.input_names, self.signature.output_names
        self.bf16 = bf16_tensors(model)
        try:
            proto = onnx.load(str(path))
        except Exception as e:
            raise BadInput(f"{path}: cannot load for emulation ({type(e).__name__}: {str(e)[:120]})") from None
        _bf16_casts_to_fp32(proto.graph)
        try:
            self.ref = ReferenceEvaluator(proto, new_ops=CUSTOM_OPS)
        except (NotImplementedError, RuntimeError) as e:   # an op (or opset of one) onnx.reference lacks
            raise BadInput(f"{path}: emulation cannot run this model ({str(e).split(',')[0]}); "
                           "compare it without --emulate-fp16, or emulate the model before that rewrite "
                           "(e.g. attention --mode windowed; a quantized file runs exactly in onnxruntime)") from None
        del proto
        if self.bf16 and any(n.need_context() for n in self.ref.rt_nodes_):
            raise BadInput(f"{path}: bf16 emulation runs a graph node by node; this one has subgraphs (If/Loop)")

    def _rounded(self, name: str, v):
        """A bf16-typed tensor as fp32 numbers that bf16 holds (rounded to nearest even)."""
        if name in self.bf16 and isinstance(v, np.ndarray) and v.dtype in (np.float32, _BFLOAT16):
            return v.astype(_BFLOAT16).astype(np.float32)
        return v

    def run(self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the nodes in order, dropping each tensor after its last use (onnx.reference's own
        ``run`` keeps every intermediate: several GB on the full-size encoder)."""
        feeds = self.signature.cast(feeds)
        if self.bf16:
            feeds = {k: self._rounded(k, v) for k, v in feeds.items()}
        names = list(outputs or self.output_names)
        nodes = self.ref.rt_nodes_
        if any(n.need_context() for n in nodes):
            return dict(zip(names, self.ref.run(names, feeds)))
        last_use: dict[str, int] = {}
        for k, n in enumerate(nodes):
            for i in n.input:
                last_use[i] = k
        keep = set(names)
        values: dict[str, object] = {"": None, **self.ref.rt_inits_, **feeds}
        for k, n in enumerate(nodes):
            # bf16 weights are read as fp32 where a node reads them (whole, they would be twice the size)
            args = [_f32(values[i]) for i in n.input] if self.bf16 else [values[i] for i in n.input]
            # float32 mask sentinels cast to fp16 become -inf on purpose: no overflow warnings for them
            with np.errstate(over="ignore"):
                outs = n.run(*args)
            for name, v in zip(n.output, outs):
                values[name] = self._rounded(name, v) if self.bf16 else v
            for i in n.input:
                if last_use.get(i) == k and i not in keep and i not in self.ref.rt_inits_:
                    values.pop(i, None)
        missing = [n for n in names if n not in values]
        if missing:
            raise BadInput(f"emulation: no tensor named {missing[0]!r} in this model")
        return {n: values[n].astype(_BFLOAT16) if n in self.bf16 else values[n] for n in names}


def emulate(path: str | Path, feeds: Mapping[str, np.ndarray], *, keep_intermediate: bool = False) -> dict[str, np.ndarray]:
    """A model file or a split (parts run in order, one loaded at a time)."""
    if not is_manifest_path(path):
        return Emulator(path).run(feeds)
    return chain(path, feeds, lambda p, values: Emulator(p).run(values), keep_intermediate=keep_intermediate)
