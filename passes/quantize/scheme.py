"""The quantization scheme, declared once: the options (``SCHEME_OPTIONS``: name, type, default,
choices, help) that the quantize pass, ``qvl-surgery sensitivity`` and the toolchains' ``--budget``
share, the :class:`Scheme` they make, and the checks that refuse a scheme before any work."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from qvl_surgery.core import quant
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.passbase import Option

NBITS_BLOCKS = (16, 32, 64, 128, 256)
DEFAULT_INT4_BLOCK = 32
DEFAULT_NBITS_INT8_BLOCK = 128
# Measured on the tiny model (random weights, 8 random inputs, centered cosine of w8a8 / w8a16 qdq
# against fp32): int8 percentile 0.999697, mse 0.999691, minmax 0.999525; int16 minmax 0.999913,
# percentile 0.999880 (16 bits have room for the tail: clipping it only costs).
DEFAULT_METHOD = {"int8": "percentile", "int16": "minmax"}

SCHEME_OPTIONS = (
    Option("weights", str, "int8", "weight precision", choices=("int8", "int4")),
    Option("activations", str, "none", "activation precision (int8 in onnxruntime format without "
           "--calibrate: dynamic per tensor)", choices=("int8", "int16", "none")),
    Option("format", str, "qdq", "qdq: QuantizeLinear/DequantizeLinear (OpenVINO, TensorRT, NPUs); "
           "onnxruntime: its integer contrib ops", choices=("qdq", "onnxruntime")),
    Option("block_size", int, None, "weights in blocks of N input values, a power of two (MatMulNBits, "
           f"format onnxruntime: {', '.join(map(str, NBITS_BLOCKS))}; int4: default 32; onnxruntime weight-only "
           "int8: default 128)", metavar="N"),
    Option("calibrate", str, None, "activation ranges from an .npz, image file(s) (comma separated) or "
           "random:N", metavar="SRC"),
    Option("calibrate_method", str, None, "activation clip value from the |x| histogram (default: "
           "percentile 99.99 for int8, minmax for int16: measured best on the tiny model)", choices=quant.METHODS),
    Option("activation_scale", str, "tensor", "int8 activations' scale: one per tensor (calibrated, or dynamic "
           "per run), or one per token (row), computed at run time (format onnxruntime: MatMulIntegerToFloat "
           "with a per-row scale; outliers in a few tokens no longer set every token's step)",
           choices=("tensor", "token")),
    Option("int8_kernel", str, "u8u8", "int8 activations in format onnxruntime: the integer matmul's operand types. "
           "u8u8: weights stored uint8 with zero point 128 (no 16-bit saturation on AVX2 CPUs without VNNI, where it "
           "is the fast one); u8s8: weights int8, VNNI's own instruction (2.5x the u8u8 kernel's speed on an "
           "AVX512-VNNI CPU; onnxruntime warns that it may saturate on AVX2 without VNNI)",
           choices=("u8u8", "u8s8")),
    Option("target", str, "onnxruntime", "the arithmetic --budget and sensitivity measure in: onnxruntime (the "
           "quantized file itself); rknn-int8 (an emulation of rknn-toolkit2's default int8 build: every "
           "activation per tensor, asymmetric uint8, weights per channel); rknn (the same, the residual stream "
           "float as the toolkit's rknn hybrid config keeps it); pulsar2-u8, pulsar2-u16, qnn-w8a16 (every activation "
           "at 8 or 16 bits; not compared with those toolchains). What the emulation covers: passes/quantize/target.py",
           choices=("onnxruntime", "rknn", "rknn-int8", "pulsar2-u8", "pulsar2-u16", "qnn-w8a16")),
)


@dataclass(frozen=True)
class Scheme:
    """The values of ``SCHEME_OPTIONS`` (where their defaults live), taken from an options namespace
    (the pass's ``self.o``) or a mapping by :meth:`of`; ``block``, ``method`` and ``static`` are what
    they resolve to."""

    weights: str
    activations: str
    format: str
    block_size: int | None
    calibrate: str | None
    calibrate_method: str | None
    activation_scale: str = "tensor"
    int8_kernel: str = "u8u8"
    target: str = "onnxruntime"

    @classmethod
    def of(cls, values: Any) -> "Scheme":
        get = values.get if isinstance(values, dict) else lambda name: getattr(values, name)
        return cls(**{o.name: get(o.name) for o in SCHEME_OPTIONS})

    @property
    def block(self) -> int | None:
        """The block size the scheme uses (None: per channel), or a one-line refusal."""
        return check_scheme(weights=self.weights, activations=self.activations, format=self.format,
                            block_size=self.block_size, activation_scale=self.activation_scale,
                            calibrate=self.calibrate, int8_kernel=self.int8_kernel)

    @property
    def method(self) -> str:
        return self.calibrate_method or DEFAULT_METHOD.get(self.activations, "percentile")

    @property
    def static(self) -> bool:
        return static_ranges(self.activations, self.format, self.calibrate, self.activation_scale)

    @property
    def per_token(self) -> bool:
        return self.activation_scale == "token"


assert [f.name for f in fields(Scheme)] == [o.name for o in SCHEME_OPTIONS]


def check_scheme(*, weights: str, activations: str, format: str, block_size: int | None,
                 activation_scale: str = "tensor", calibrate: str | None = None,
                 int8_kernel: str = "u8u8") -> int | None:
    """The block size the scheme uses (None: per channel), or a one-line refusal."""
    if int8_kernel != "u8u8" and (activations != "int8" or format != "onnxruntime"):
        raise BadInput("{int8_kernel}: the kernel choice is for int8 activations in format onnxruntime "
                       "(DynamicQuantizeMatMul / MatMulIntegerToFloat); give {activations} {format}",
                       int8_kernel=int8_kernel, activations="int8", format="onnxruntime")
    if activation_scale == "token":
        if activations != "int8" or format != "onnxruntime":
            raise BadInput("{activation_scale}: per-token scales are for int8 activations in format onnxruntime "
                           "(MatMulIntegerToFloat with a per-row scale); give {activations} {format}",
                           activation_scale="token", activations="int8", format="onnxruntime")
    if weights == "int4" and activations != "none":
        raise BadInput("{weights}: int4 weights are weight-only; give {activations} (onnxruntime's MatMulNBits "
                       "with accuracy_level 4 quantizes activations to int8 itself)", weights="int4", activations="none")
    if format == "onnxruntime" and activations == "int16":
        raise BadInput("{format}: onnxruntime's CPU provider has no 16-bit integer matmul; use format qdq for "
                       "int16 activations", format=format)
    block = block_size
    if weights == "int4" and block is None:
        block = DEFAULT_INT4_BLOCK
    if format == "onnxruntime" and activations == "none" and block is None:
        block = DEFAULT_NBITS_INT8_BLOCK   # MatMulNBits is blockwise only
    if block is not None:
        if format == "onnxruntime" and activations != "none":
            raise BadInput("{block_size}: DynamicQuantizeMatMul / MatMulIntegerToFloat take per-channel "
                           "weight scales only; leave it out, or quantize weights only", block_size=block)
        if format == "onnxruntime" and block not in NBITS_BLOCKS:
            raise BadInput("{block_size}: MatMulNBits takes " + ", ".join(map(str, NBITS_BLOCKS)), block_size=block)
        if block < 2 or block & (block - 1):
            raise BadInput("{block_size}: not a power of two (e.g. 32, 64, 128)", block_size=block)
    return block


def static_ranges(activations: str, format: str, calibrate: str | None, activation_scale: str = "tensor") -> bool:
    """Whether a scheme records static activation ranges: qdq always quantizes activations statically,
    onnxruntime format does when calibrated (else DynamicQuantizeMatMul scales them per run); per-token
    scales never (computed from each token at run time)."""
    if activation_scale == "token":
        return False
    return activations != "none" and (format == "qdq" or bool(calibrate))


def check_budget_and_method(v: dict) -> None:
    """Refuse, before any work, a budget outside (0, 1] and options the scheme would ignore."""
    b = v.get("budget")
    if b is not None and not (math.isfinite(b) and 0.0 < b <= 1.0):
        raise BadInput("{budget}: a token-centered cosine in (0, 1], e.g. 0.9995", budget=b)
    static = static_ranges(v["activations"], v["format"], v["calibrate"], v.get("activation_scale") or "tensor")
    if v["calibrate"] and v.get("activation_scale") == "token" and b is None:
        raise BadInput("{calibrate}: per-token scales are computed from each token at run time, so there is "
                       "nothing to calibrate; drop it, use {activation_scale}, or give {budget} (it measures on "
                       "these inputs)", calibrate=v["calibrate"], activation_scale="tensor", budget="COSINE")
    if v["calibrate"] and v["activations"] == "none":
        raise BadInput("{calibrate}: weight-only quantization records no activation ranges; drop it, or give "
                       "{activations}", calibrate=v["calibrate"], activations="int8")
    if v["calibrate_method"] and not static:
        raise BadInput("{calibrate_method}: applies to static activation ranges (activations int8 / int16 with "
                       "{calibrate}); drop it", calibrate_method=v["calibrate_method"], calibrate="SRC")
    for pat in v.get("keep_node") or []:
        if not pat.strip():
            raise BadInput("{keep_node}: an empty pattern; give a node-name glob such as '/merger/*'", keep_node=pat)
