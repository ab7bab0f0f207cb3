"""fp16 emulation: run a model so that every fp16 tensor is really rounded to fp16.

onnxruntime's CPU provider computes most fp16 ops in fp32 and even drops a rounding
Cast fp32->fp16->fp32, so it hides fp16 error. This runner uses ``onnx.reference``: every op
computes on numpy arrays of the model's own dtypes, so each fp16 output is rounded to fp16 as
on a GPU (numpy's fp16 ufuncs compute in fp32 and round the result; reductions accumulate in
fp32). MatMul and Gemm are replaced by BLAS calls that read fp16 operands as fp32, accumulate in
fp32 and round the result to fp16, as GPU tensor cores do; that also makes them fast.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from .errors import BadInput
from .manifest import is_manifest_path
from .modelfile import Model
from .runners import chain
from .signature import model_signature

log = logging.getLogger(__name__)


def _f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype == np.float16 else a


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


class Fp16Emulator:
    """Run one model file (weights loaded; the model must be < 2 GB, as an fp16 encoder or a part is)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            proto = onnx.load(str(path))
        except Exception as e:
            raise BadInput(f"{path}: cannot load for emulation ({type(e).__name__}: {str(e)[:120]})") from None
        self.signature = model_signature(Model(proto))
        self.input_names, self.output_names = self.signature.input_names, self.signature.output_names
        try:
            self.ref = ReferenceEvaluator(proto, new_ops=CUSTOM_OPS)
        except NotImplementedError as e:
            raise BadInput(f"{path}: fp16 emulation cannot run this model ({str(e).split(',')[0]}); "
                           "compare it without --emulate-fp16, or emulate the model before that rewrite "
                           "(e.g. attention --mode windowed)") from None
        del proto

    def run(self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the nodes in order, dropping each tensor after its last use (onnx.reference's own
        ``run`` keeps every intermediate: several GB on the full-size encoder)."""
        feeds = self.signature.cast(feeds)
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
            # float32 mask sentinels cast to fp16 become -inf on purpose: no overflow warnings for them
            with np.errstate(over="ignore"):
                outs = n.run(*[values[i] for i in n.input])
            for name, v in zip(n.output, outs):
                values[name] = v
            for i in n.input:
                if last_use.get(i) == k and i not in keep and i not in self.ref.rt_inits_:
                    values.pop(i, None)
        missing = [n for n in names if n not in values]
        if missing:
            raise BadInput(f"emulation: no tensor named {missing[0]!r} in this model")
        return {n: values[n] for n in names}


def emulate(path: str | Path, feeds: Mapping[str, np.ndarray], *, keep_intermediate: bool = False) -> dict[str, np.ndarray]:
    """A model file or a split (parts run in order, one loaded at a time)."""
    if not is_manifest_path(path):
        return Fp16Emulator(path).run(feeds)
    return chain(path, feeds, lambda p, values: Fp16Emulator(p).run(values), keep_intermediate=keep_intermediate)
