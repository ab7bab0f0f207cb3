"""Quantization numerics: weight scales and packing, activation range estimators, and a streaming
calibration recorder. No graph editing here (that is ``passes/quantize.py``).

Conventions. A linear layer's weight is handled as ``[out, in]`` (``[N, K]``), the layout of the
export's ``Gemm(transB=1)`` weights; callers transpose ``[K, N]`` MatMul weights first.

- int8 weights: symmetric, one scale per output channel (``max |w| / 127``), or per block of
  ``block`` input values.
- int4 weights: symmetric per block along the input dim, codes in ``[-8, 7]`` (scale ``max|w|/7``;
  -8 is never produced, so the grid is symmetric). A last block shorter than ``block`` is allowed
  (ONNX's blocked DequantizeLinear and MatMulNBits both take ``ceil(K / block)`` blocks).
- activations: symmetric per tensor (zero point 0: what TensorRT and most NPU importers require),
  the clip value chosen from a streaming histogram of ``|x|`` by ``minmax``, ``percentile`` or
  ``mse`` (:class:`AbsHistogram`).

Calibration (:func:`record_ranges`) runs the fp32 model node by node with ``onnx.reference`` (BLAS
for MatMul/Gemm, as the fp16 emulation does), reading each weight from its source only when its
node runs and dropping it after, and drops every activation after its last use. Only the tensors
asked for are measured, into running histograms: memory is one inference's live activations plus
one weight, never an augmented model and never all weights.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import BadInput
from .modelfile import Computed, FileRange, Model, dtype_of

log = logging.getLogger(__name__)

QRANGE = {"int8": 127, "int16": 32767}   # symmetric activation grids (zero point 0)
METHODS = ("minmax", "percentile", "mse")
PERCENTILE = 99.99
HIST_BINS = 4096


# ----------------------------------------------------------------------------- weights

def _safe(scale: np.ndarray) -> np.ndarray:
    """An all-zero row or block gets scale 1 (its codes are 0 either way), never 0 (DQ would be 0/0)."""
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def quantize_per_channel(w: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [N, K] -> (int8 codes [N, K], float32 scale [N]), symmetric."""
    qmax = 2 ** (bits - 1) - 1
    w = np.asarray(w, np.float32)
    scale = _safe(np.abs(w).max(axis=1) / qmax)
    q = np.clip(np.rint(w / scale[:, None]), -qmax, qmax).astype(np.int8)
    return q, scale


def n_blocks(k: int, block: int) -> int:
    return -(-k // block)


def quantize_blocked(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [N, K] -> (int8 codes [N, K] in ``[-qmax, qmax]``, float32 scale [N, ceil(K/block)])."""
    qmax = 2 ** (bits - 1) - 1
    w = np.asarray(w, np.float32)
    n, k = w.shape
    nb = n_blocks(k, block)
    padded = np.zeros((n, nb * block), np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, nb, block)
    scale = _safe(np.abs(blocks).max(axis=2) / qmax)
    q = np.clip(np.rint(blocks / scale[:, :, None]), -qmax, qmax).astype(np.int8)
    return q.reshape(n, nb * block)[:, :k], scale


def pack_nbits(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Codes [N, K] (signed) -> onnxruntime MatMulNBits' B: uint8 [N, ceil(K/block), block*bits/8].
    Codes are stored unsigned with the op's default zero point 2^(bits-1) (no zero_points input),
    4-bit codes two to a byte, the lower K index in the low nibble; the padded tail of the last
    block holds code 0 (the zero point)."""
    n, k = q.shape
    nb = n_blocks(k, block)
    zp = 1 << (bits - 1)
    u = np.full((n, nb * block), zp, np.uint8)
    u[:, :k] = (q.astype(np.int16) + zp).astype(np.uint8)
    u = u.reshape(n, nb, block)
    if bits == 8:
        return u
    if bits == 4:
        return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    raise ValueError(f"bits={bits}")


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed 4-bit codes -> ONNX INT4 raw bytes: consecutive elements (row-major) two to a byte,
    the first in the low nibble; an odd count leaves the last high nibble 0."""
    flat = (q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


class LazyQuant:
    """One weight quantized once, on first request, for several initializers that come from it
    (codes and scales). Thread-safe (the writer makes computed tensors on two threads); each part
    is dropped once taken, so a weight's results live only until the writer has both."""

    def __init__(self, read: Callable[[], np.ndarray], quantize: Callable[[np.ndarray], dict[str, np.ndarray]]):
        self._read, self._quantize = read, quantize
        self._lock = threading.Lock()
        self._parts: dict[str, np.ndarray] = {}

    def take(self, part: str) -> np.ndarray:
        with self._lock:
            if part not in self._parts:
                self._parts = self._quantize(self._read())
            return self._parts.pop(part)

    def source(self, part: str, nbytes: int) -> Computed:
        return Computed(lambda: self.take(part), nbytes)


# ----------------------------------------------------------------------------- activation ranges

class AbsHistogram:
    """Running histogram of ``|x|`` over ``[0, top]``, ``top`` doubling (bins merged in pairs) when a
    larger value arrives: constant memory per tensor whatever the number of inputs."""

    def __init__(self, bins: int = HIST_BINS):
        self.bins = bins
        self.counts = np.zeros(bins, np.int64)
        self.top = 0.0
        self.amax = 0.0
        self.n = 0

    def add(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, np.float32).reshape(-1))
        a = a[np.isfinite(a)]
        if not a.size:
            return
        m = float(a.max())
        self.amax = max(self.amax, m)
        self.n += a.size
        if m == 0.0 and self.top == 0.0:
            self.counts[0] += a.size
            return
        if self.top == 0.0:
            self.top = float(2.0 ** np.ceil(np.log2(m)))
        while m > self.top:
            self.counts = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.concatenate([self.counts, np.zeros(self.bins // 2, np.int64)])
            self.top *= 2.0
        idx = np.minimum((a * (self.bins / self.top)).astype(np.int64), self.bins - 1)
        self.counts += np.bincount(idx, minlength=self.bins)

    def clip(self, method: str, qmax: int) -> float:
        """The clip value ``c`` (scale ``c / qmax``) chosen by ``method``."""
        if self.amax == 0.0:
            return 0.0
        if method == "minmax":
            return self.amax
        width = self.top / self.bins
        edges = np.arange(1, self.bins + 1) * width
        if method == "percentile":
            cum = np.cumsum(self.counts)
            k = int(np.searchsorted(cum, cum[-1] * PERCENTILE / 100.0))
            return float(min(edges[min(k, self.bins - 1)], self.amax))
        if method == "mse":
            centers = edges - width / 2
            cands = np.linspace(0.05, 1.0, 96) * self.amax
            # expected squared error: rounding noise (step^2 / 12) inside the clip, the clipped
            # distance outside it
            err = []
            for c in cands:
                step = c / qmax
                inside = centers <= c
                e = (self.counts[inside].sum() * step * step / 12.0
                     + float((self.counts[~inside] * (centers[~inside] - c) ** 2).sum()))
                err.append(e)
            return float(cands[int(np.argmin(err))])
        raise BadInput(f"calibrate_method {method!r}: choose one of {', '.join(METHODS)}")


@dataclass
class ActivationRange:
    tensor: str
    clip: float
    amax: float
    scale: float


def activation_scale(hist: AbsHistogram, method: str, dtype: str) -> ActivationRange:
    qmax = QRANGE[dtype]
    c = hist.clip(method, qmax)
    scale = c / qmax if c > 0 else 1.0
    return ActivationRange("", c, hist.amax, float(np.float32(scale)))


# ----------------------------------------------------------------------------- streaming calibration

def _weightless_graph(model: Model) -> tuple[onnx.ModelProto, dict[str, TensorProto]]:
    """The model with every initializer turned into a graph input (so onnx.reference can be built
    without reading a weight byte); the initializers by name."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    g = proto.graph
    inits = {t.name: t for t in model.graph.initializer}
    del g.initializer[:]
    del g.value_info[:]
    have = {i.name for i in g.input}
    for t in inits.values():
        if t.name not in have:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return proto, inits


def _read_weight(model: Model, t: TensorProto) -> np.ndarray:
    """One initializer's values; a file range is mapped (the pages are dropped with the array)."""
    src = model.sources.get(t.name)
    if isinstance(src, FileRange):
        return np.memmap(src.path, dtype=dtype_of(t), mode="r", offset=src.offset, shape=tuple(t.dims))
    if isinstance(src, Computed):
        return np.asarray(src.make()).reshape(tuple(t.dims))
    return numpy_helper.to_array(t)


@dataclass
class Recording:
    histograms: dict[str, AbsHistogram] = field(default_factory=dict)
    inputs: int = 0


def record_ranges(model: Model, feeds_list: Iterable[Mapping[str, np.ndarray]], tensors: Iterable[str], *,
                  progress: bool = False) -> Recording:
    """Run the fp32 ``model`` on each input set (one at a time) and keep a running ``|x|`` histogram
    of each named tensor. Weights are read from their sources as their node runs (small ones kept),
    activations dropped after their last use."""
    from onnx.reference import ReferenceEvaluator

    from .emulate import CUSTOM_OPS

    proto, inits = _weightless_graph(model)
    try:
        ref = ReferenceEvaluator(proto, new_ops=CUSTOM_OPS)
    except NotImplementedError as e:
        raise BadInput(f"calibration: onnx.reference cannot run this model ({str(e).split(',')[0]})") from None
    nodes = ref.rt_nodes_
    if any(n.need_context() for n in nodes):
        raise BadInput("calibration: the model has control-flow nodes (If/Loop/Scan); calibrate the model "
                       "before the pass that added them")
    wanted = set(tensors)
    rec = Recording({t: AbsHistogram() for t in wanted})
    last_use: dict[str, int] = {}
    for k, n in enumerate(nodes):
        for i in n.input:
            last_use[i] = k
    small = {name: numpy_helper.to_array(t) for name, t in inits.items()
             if name not in model.sources and t.data_location != TensorProto.EXTERNAL}
    cached: dict[str, np.ndarray] = dict(small)
    for name, t in inits.items():   # tables read by many nodes (masks, rotary) are read once
        if name not in cached and model.tensor_nbytes(t) <= 1 << 20:
            cached[name] = np.array(_read_weight(model, t))
    graph_inputs = [i.name for i in model.graph.input if i.name not in inits]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc="calibration", unit="input", leave=False, disable=None)
    for feeds in feeds_list:
        values: dict[str, object] = {"": None}
        for name in graph_inputs:
            if name not in feeds:
                raise BadInput(f"calibration inputs: no array named {name!r}")
            values[name] = np.asarray(feeds[name])
            if name in wanted:
                rec.histograms[name].add(values[name])
        for k, n in enumerate(nodes):
            args = []
            for i in n.input:
                if i in values:
                    args.append(values[i])
                elif i in cached:
                    args.append(cached[i])
                else:
                    args.append(np.asarray(_read_weight(model, inits[i])))
            with np.errstate(over="ignore"):
                outs = n.run(*args)
            del args
            for name, v in zip(n.output, outs):
                values[name] = v
                if name in wanted:
                    rec.histograms[name].add(v)
            for i in n.input:
                if last_use.get(i) == k and i in values and i != "":
                    values.pop(i, None)
        rec.inputs += 1
        del values
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rec
