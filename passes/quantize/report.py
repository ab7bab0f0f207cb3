"""What the quantize pass did: the scheme and format, the linears quantized and kept float (and
why), the ops added, the calibration and budget measurements, the weight bytes before and after."""
from __future__ import annotations

from dataclasses import dataclass, field

from qvl_surgery.core.passbase import PassReport


@dataclass(kw_only=True)
class QuantizeReport(PassReport):
    scheme: str = ""
    format: str = ""
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, list[str]] = field(default_factory=dict)        # reason -> node names
    ops: dict[str, int] = field(default_factory=dict)               # op types added
    opset: int = 0
    method: str = ""
    calibration: list[str] = field(default_factory=list)
    weight_bytes: list[int] = field(default_factory=list)           # [before, after]
    kept_share: list = field(default_factory=list)                  # [share of the linears' work, counted by]
    budget: dict = field(default_factory=dict)                      # allocate_budget's measurements

    def summary(self) -> list[str]:
        kept = sum(len(v) for v in self.kept.values())
        out = [f"quantize: {self.scheme} as {self.format} (opset {self.opset}): {len(self.quantized)} linears "
               f"quantized, {kept} kept float"]
        if self.budget:
            b = self.budget
            out.append(f"  budget: centered cosine {b['achieved']} (target {b['target_centered_cosine']}) with "
                       f"{', '.join(b['groups_kept']) or 'nothing'} kept float "
                       f"({100 * b['kept_share_of_multiply_adds']:.2f}% of the multiply-adds; {b['calibration']})")
            out.append("  error when quantized alone: " + ", ".join(
                f"{s['group']} {s['alone_error']:.2e}{'' if s['measured'] == 'end to end' else ' (estimated)'} "
                f"({100 * s['share']:.1f}%)" for s in b["sensitivity"][:5]))
        if self.kept_share:
            out.append(f"  kept float: {100 * self.kept_share[0]:.2f}% of the linear layers' {self.kept_share[1]}")
        for why, names in self.kept.items():
            out.append(f"  kept ({why}): {', '.join(names[:6])}" + (f" ... {len(names) - 6} more" if len(names) > 6 else ""))
        if self.ops:
            out.append("  ops: " + ", ".join(f"{k} x{v}" for k, v in self.ops.items()))
        if len(self.weight_bytes) == 2:
            b, a = self.weight_bytes
            out.append(f"  weights {b / 1e6:.1f} MB -> {a / 1e6:.1f} MB ({a / max(b, 1):.3f}x)")
        out += ["  " + line for line in self.calibration]
        out += [f"  skipped: {s}" for s in self.skipped]
        return out
