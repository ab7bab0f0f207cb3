"""The outlier report (``inspect --activations``): per block, how large the residual stream and the
linear layers' inputs get on calibration inputs, how far each is from fp16's limit, and what a
per-tensor int8 scale leaves of it.

One run of the fp32 model, segment by segment (:func:`~qvl_surgery.core.segments.run_segments`: never
more than one segment's weights in memory), watching the block outputs (the export's
``qvl_surgery.block_outputs`` metadata) and every linear's input. Each tensor's ``|x|`` goes into a
log histogram (:class:`~qvl_surgery.core.quant.AbsHistogram`), merged over the inputs, from which:

- ``max``: the largest ``|x|``; ``fp16 headroom``: ``65504 / max`` (below 1 the tensor overflows
  fp16; below 2 it is flagged: fp16's own rounding and a different image can take it over);
- ``int8 zeroed``: the share of the values a symmetric per-tensor int8 scale (``max / 127``) rounds
  to zero (``|x| < max / 254``): a massive activation in a few channels makes that scale crush
  everything else; flagged above half;
- ``max / p99.9``: how far the largest value stands out of the bulk (a few huge channels: 100x and
  more).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qvl_surgery.core.calibrate import FP16_MAX, calibration_sets
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.linears import find_linears, group_of
from qvl_surgery.core.modelfile import load_model
from qvl_surgery.core.quant import AbsHistogram
from qvl_surgery.core.segments import run_segments

FP16_FLAG = 2.0        # flag a tensor within this factor of fp16's largest value
ZEROED_FLAG = 0.5      # flag a tensor when a per-tensor int8 scale rounds more than this share to zero


@dataclass
class TensorStats:
    tensor: str
    role: str               # "residual" (a block's output) or "input of <linear>[, ...]"
    max: float
    p999: float
    zeroed: float           # share of values under half an int8 step of a per-tensor scale

    @property
    def headroom(self) -> float:
        return FP16_MAX / self.max if self.max > 0 else float("inf")

    @property
    def flags(self) -> list[str]:
        out = []
        if self.max > FP16_MAX:
            out.append("overflows fp16")
        elif self.headroom < FP16_FLAG:
            out.append(f"within {FP16_FLAG:g}x of fp16's max")
        if self.role != "residual" and self.zeroed > ZEROED_FLAG:   # the residual Adds stay float
            out.append(f"int8 per-tensor rounds {100 * self.zeroed:.0f}% to 0")
        return out

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "role": self.role, "max_abs": self.max, "p99.9_abs": self.p999,
                "fp16_headroom": self.headroom, "int8_per_tensor_zeroed": self.zeroed, "flags": self.flags}


@dataclass
class ActivationReport:
    model: Path
    calibration: str
    groups: dict[str, list[TensorStats]] = field(default_factory=dict)   # block -> its tensors

    def flagged(self) -> dict[str, list[str]]:
        return {g: sorted({f for t in ts for f in t.flags}) for g, ts in self.groups.items()
                if any(t.flags for t in ts)}

    def to_dict(self) -> dict:
        return {"model": str(self.model), "calibration": self.calibration,
                "blocks": {g: [t.to_dict() for t in ts] for g, ts in self.groups.items()},
                "flagged": self.flagged()}

    def lines(self) -> list[str]:
        out = [f"activations of {self.model} ({self.calibration}):",
               f"  {'block':<12} {'residual max':>12} {'fp16 room':>9}  {'linear input worst for int8':<34} "
               f"{'max':>9} {'max/p99.9':>9} {'int8 zeroed':>11}  flags"]
        for g, ts in self.groups.items():
            res = next((t for t in ts if t.role == "residual"), None)
            ins = [t for t in ts if t.role != "residual"]
            worst = max(ins, key=lambda t: (t.zeroed, t.max), default=None)
            cells = [f"  {g:<12}",
                     f"{res.max:12.4g} {res.headroom:9.3g}" if res else f"{'':12} {'':9}"]
            if worst:
                who = worst.role.removeprefix("input of ").split(",")[0]
                who = who if len(who) <= 34 else "..." + who[-31:]
                ratio = worst.max / worst.p999 if worst.p999 > 0 else float("inf")
                cells.append(f" {who:<34} {worst.max:9.4g} {ratio:9.3g} {100 * worst.zeroed:10.1f}%")
            else:
                cells.append(f" {'':<34} {'':9} {'':9} {'':11}")
            flags = sorted({f for t in ts for f in t.flags})
            out.append(" ".join(cells) + ("  " + "; ".join(flags) if flags else ""))
        flagged = self.flagged()
        out.append(f"  flagged: {', '.join(flagged) if flagged else 'nothing'}"
                   + (" (smooth or rotate move linear-input outliers into the weights; fp16 --calibrate keeps "
                      "the overflowing nodes fp32)" if flagged else ""))
        return out


def _zeroed(h: AbsHistogram) -> float:
    """Share of the values under half an int8 step of the per-tensor scale ``max / 127``."""
    if not h.n or h.amax == 0.0:
        return 0.0
    below = h.edges() <= h.amax / 254.0
    return float(h.counts[below].sum() / h.n)


def activation_report(path: str | Path, *, calibrate: str = "random:2") -> ActivationReport:
    """Run ``path`` (fp32) on ``calibrate``'s inputs and measure its block outputs and linear inputs."""
    model = load_model(path)
    blocks = json.loads(model.metadata().get("qvl_surgery.block_outputs") or "[]")
    linears = find_linears(model, [])
    if not linears and not blocks:
        raise BadInput(f"{path}: no linear layer (Gemm/MatMul with a float32 weight) and no block outputs to "
                       "measure; --activations reads an fp32 qvl-surgery export or a pass's output")
    readers: dict[str, list[str]] = {}
    for lin in linears:
        readers.setdefault(lin.x, []).append(lin.name)
    feeds, what = calibration_sets(model, calibrate, 2)
    hists = {t: AbsHistogram() for t in [*blocks, *readers]}
    run_segments(model, feeds, hists, lambda name, v: hists[name].add(np.asarray(v, np.float32)))
    report = ActivationReport(Path(path), what)

    def stats(t: str, role: str) -> TensorStats:
        h = hists[t]
        return TensorStats(t, role, float(h.amax), h.quantile(0.999), _zeroed(h))

    for i, t in enumerate(blocks):   # patch_embed.output, blocks.0.output, ...
        g = "patch_embed" if i == 0 else f"blocks.{i - 1}"
        report.groups.setdefault(g, []).append(stats(t, "residual"))
    for t, names in readers.items():
        report.groups.setdefault(group_of(names[0]), []).append(stats(t, "input of " + ", ".join(names)))
    return report
