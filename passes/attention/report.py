"""What the attention pass did: per attention, rewritten (how) or unchanged (why); the patterns
tried that did not match; the nodes that only built the dense mask, removed."""
from __future__ import annotations

from dataclasses import dataclass, field

from qvl_surgery.core.passbase import PassReport


@dataclass
class AttentionReport(PassReport):
    mode: str
    rewritten: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed_nodes: int = 0

    def summary(self) -> list[str]:
        out = [f"attention ({self.mode}): {len(self.rewritten)} rewritten, {len(self.unchanged)} unchanged"]
        out += [f"  {r}" for r in self.rewritten[:4]] + ([f"  ... {len(self.rewritten) - 4} more"]
                                                       if len(self.rewritten) > 4 else [])
        out += [f"  unchanged: {u}" for u in self.unchanged[:4]]
        if self.removed_nodes:
            out.append(f"  removed {self.removed_nodes} nodes that only built the dense mask")
        out += [f"  no match: {m}" for m in self.misses[:6]]
        return out
