"""Quantization numerics: weight scales and packing, activation range estimators, and a streaming
calibration recorder. No graph editing here (that is ``passes/quantize/``).

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

Calibration (:func:`record_ranges`) runs the fp32 model in onnxruntime a segment of nodes at a time
(:mod:`qvl_surgery.core.segments`: one segment's weights in memory, mapped from the model's own data
file), every input set through a segment before the next. Only the tensors asked for are
measured, into running histograms: never an augmented model and never all weights.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.modelfile import Computed, Model
from qvl_surgery.core.segments import run_segments

log = logging.getLogger(__name__)

QRANGE = {"int8": 127, "int16": 32767}   # symmetric activation grids (zero point 0)
METHODS = ("minmax", "percentile", "mse")
PERCENTILE = 99.99
MANTISSA_BITS = 9        # histogram buckets 2^-9 wide, relative
LOW_EXP, HIGH_EXP = -24, 40


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


CLIP_RATIOS = np.linspace(0.6, 1.0, 9)   # the per-block clip search of 4-bit weights


def quantize_blocked(w: np.ndarray, bits: int, block: int, *, search: bool = False,
                     signed_scale: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [N, K] -> (int8 codes [N, K], float32 scale [N, ceil(K/block)]).

    Plain: codes in ``[-qmax, qmax]``, scale ``max|w| / qmax`` per block. ``search``: each block's
    clip chosen from ``CLIP_RATIOS`` of that by the squared error it leaves, codes in
    ``[-qmax - 1, qmax]`` (the grid's whole range: int4 has 16 codes, not 15). ``signed_scale``: the
    block's largest-magnitude value maps to ``-qmax - 1`` exactly, the scale taking its sign (a
    negative scale where that value is positive; MatMulNBits multiplies by it as it is). Measured on
    the tiny model, 4 bits block 32, centered cosine of the output: plain 0.98447, search 0.98654,
    signed 0.98790, both 0.98891."""
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax - 1 if (search or signed_scale) else -qmax
    w = np.asarray(w, np.float32)
    n, k = w.shape
    nb = n_blocks(k, block)
    padded = np.zeros((n, nb * block), np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, nb, block)
    if signed_scale:
        idx = np.abs(blocks).argmax(axis=2)
        base = np.take_along_axis(blocks, idx[..., None], axis=2)[..., 0] / qmin
    else:
        base = np.abs(blocks).max(axis=2) / qmax
    base = np.where(base == 0, np.float32(1e-30), base).astype(np.float32)
    best_s, best_e = base, None
    for r in (CLIP_RATIOS if search else (1.0,)):
        s_ = (base * np.float32(r)).astype(np.float32)
        q = np.clip(np.rint(blocks / s_[..., None]), qmin, qmax)
        e = np.square(q * s_[..., None] - blocks).sum(axis=2)
        if best_e is None:
            best_s, best_e = s_, e
        else:
            better = e < best_e
            best_s, best_e = np.where(better, s_, best_s), np.where(better, e, best_e)
    q = np.clip(np.rint(blocks / best_s[..., None]), qmin, qmax).astype(np.int8)
    return q.reshape(n, nb * block)[:, :k], best_s.astype(np.float32)


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
    """Running histogram of ``|x|`` in logarithmic buckets: a float32's exponent and its top
    ``MANTISSA_BITS`` mantissa bits name the bucket (relative width 2^-9), read straight from the
    bits (no scaling pass, no rebinning when a larger value arrives). Buckets cover
    ``[2^LOW_EXP, 2^HIGH_EXP)``; smaller values count in the first bucket (they never decide a clip),
    larger finite ones in the last. Constant memory per tensor whatever the number of inputs."""

    SHIFT = 23 - MANTISSA_BITS
    FIRST = (127 + LOW_EXP) << MANTISSA_BITS
    COUNT = (HIGH_EXP - LOW_EXP) << MANTISSA_BITS

    def __init__(self):
        self.counts = np.zeros(self.COUNT, np.int64)
        self.amax = 0.0
        self.n = 0

    def add(self, x: np.ndarray) -> None:
        bits = np.ascontiguousarray(x, np.float32).reshape(-1).view(np.int32) & np.int32(0x7FFFFFFF)
        if not bits.size:
            return
        top = int(bits.max())
        if top >= 0x7F800000:                      # inf / nan: left out
            bits = bits[bits < 0x7F800000]
            if not bits.size:
                return
            top = int(bits.max())
        self.amax = max(self.amax, float(np.int32(top).view(np.float32)))
        self.n += bits.size
        found = np.bincount(bits >> self.SHIFT)
        lo, hi = self.FIRST, self.FIRST + self.COUNT
        self.counts[0] += found[:lo].sum()
        body = found[lo:hi]
        self.counts[:body.size] += body
        self.counts[-1] += found[hi:].sum()

    def edges(self) -> np.ndarray:
        """Upper edge of each bucket."""
        k = (np.arange(1, self.COUNT + 1, dtype=np.int64) + self.FIRST) << self.SHIFT
        return np.minimum(k, 0x7F7FFFFF).astype(np.int32).view(np.float32).astype(np.float64)

    def quantile(self, q: float) -> float:
        """The upper edge of the bucket holding the ``q`` quantile of ``|x|`` (at most the max)."""
        if not self.n:
            return 0.0
        cum = np.cumsum(self.counts)
        k = int(np.searchsorted(cum, cum[-1] * q))
        return float(np.minimum(self.edges(), self.amax)[min(k, self.COUNT - 1)])

    def clip(self, method: str, qmax: int) -> float:
        """The clip value ``c`` (scale ``c / qmax``) chosen by ``method``."""
        if self.amax == 0.0:
            return 0.0
        if method == "minmax":
            return self.amax
        if method == "percentile":
            return self.quantile(PERCENTILE / 100.0)
        upper = np.minimum(self.edges(), self.amax)
        if method == "mse":
            used = self.counts > 0
            counts, top = self.counts[used], upper[used]
            centers = top * (1 - 2.0 ** -(MANTISSA_BITS + 1))
            cands = np.linspace(0.05, 1.0, 96) * self.amax
            # expected squared error: rounding noise (step^2 / 12) inside the clip, the clipped
            # distance outside it
            err = []
            for c in cands:
                step = c / qmax
                inside = centers <= c
                err.append(counts[inside].sum() * step * step / 12.0
                           + float((counts[~inside] * (centers[~inside] - c) ** 2).sum()))
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

@dataclass
class Recording:
    histograms: dict[str, AbsHistogram] = field(default_factory=dict)
    inputs: int = 0


def record_ranges(model: Model, feeds_list: Iterable[Mapping[str, np.ndarray]], tensors: Iterable[str], *,
                  progress: bool = False, max_segment_bytes: int | None = None) -> Recording:
    """Run the fp32 ``model`` on every input set, a segment at a time in onnxruntime
    (:func:`segments.run_segments`), and keep a running ``|x|`` histogram of each named tensor."""
    wanted = list(dict.fromkeys(tensors))
    rec = Recording({t: AbsHistogram() for t in wanted})
    rec.inputs = run_segments(model, feeds_list, wanted, lambda name, v: rec.histograms[name].add(v),
                              max_segment_bytes=max_segment_bytes, progress=progress)
    return rec
