"""What a quantization does, decided before any node is written: the scheme, the linears to
quantize and the ones kept float (and why), the activation ranges, the opset the result needs."""
from __future__ import annotations

from dataclasses import dataclass

from qvl_surgery.core import quant
from qvl_surgery.core.linears import Linear
from qvl_surgery.core.modelfile import Model

from passes.quantize.scheme import Scheme


@dataclass
class QuantPlan:
    scheme: Scheme
    block: int | None            # the scheme's block size; None: per output channel
    linears: list[Linear]        # to quantize
    kept: dict[str, str]
    ranges: dict[str, quant.ActivationRange]   # activation tensor -> range (static activations)
    opset: int

    @property
    def bits(self) -> int:
        return 4 if self.scheme.weights == "int4" else 8

    @property
    def dynamic_activations(self) -> bool:
        """int8 activations scaled per tensor at run time (DynamicQuantizeMatMul)."""
        return (self.scheme.format == "onnxruntime" and self.scheme.activations == "int8" and not self.ranges
                and not self.scheme.per_token)

    @property
    def label(self) -> str:
        """The scheme in short: ``w8a8 (dynamic) per channel``, ``w4 block 32``."""
        w = "w8" if self.scheme.weights == "int8" else "w4"
        a = {"none": "", "int8": "a8", "int16": "a16"}[self.scheme.activations]
        blk = f" block {self.block}" if self.block else " per channel"
        dyn = " (per token)" if self.scheme.per_token else " (dynamic)" if self.dynamic_activations else ""
        return f"{w}{a}{dyn}{blk}"


def model_opset(model: Model) -> int:
    return next((o.version for o in model.proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def plan_quantize(model: Model, scheme: Scheme, linears: list[Linear], kept: dict[str, str],
                  ranges: dict[str, quant.ActivationRange]) -> QuantPlan:
    todo = [lin for lin in linears if lin.name not in kept]
    block = scheme.block
    need = 13
    if scheme.format == "qdq" and (scheme.activations == "int16" or block is not None):
        need = 21   # int16 Q/DQ, blocked DQ, INT4
    return QuantPlan(scheme, block, todo, kept, ranges, max(model_opset(model), need))
