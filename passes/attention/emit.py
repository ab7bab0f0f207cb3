"""What every mode's emitter shares: one attention's replacement nodes under ``{attention}/{mode}``,
and the padding of uneven windows to the largest."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from passes.attention.edit import Edit
from passes.attention.plan import AttentionPlan


def _neg_big(np_dtype) -> float:
    return float(np.finfo(np_dtype).min)


@dataclass
class WindowPadding:
    """Uneven windows padded to the largest: ``pad`` gathers [windows * wmax] positions (padding
    repeats a real position: masked as a key, dropped as a query), ``unpad`` gathers them back,
    ``valid`` marks the real keys."""

    pad: np.ndarray
    unpad: np.ndarray
    valid: np.ndarray

    @classmethod
    def of(cls, windows: list[int]) -> "WindowPadding":
        wmax, nW, S = max(windows), len(windows), sum(windows)
        pad = np.zeros((nW, wmax), np.int64)
        valid = np.zeros((nW, wmax), bool)
        unpad = np.zeros(S, np.int64)
        start = 0
        for w_i, n in enumerate(windows):
            pad[w_i, :n] = np.arange(start, start + n)
            pad[w_i, n:] = start
            valid[w_i, :n] = True
            unpad[start:start + n] = w_i * wmax + np.arange(n)
            start += n
        return cls(pad.reshape(-1), unpad, valid)


class Emitter:
    """One attention's replacement nodes, named under ``{attention}/{mode}``."""

    tag = ""

    def __init__(self, e: Edit, plan: AttentionPlan):
        self.e, self.plan, self.m = e, plan, plan.match
        self.prefix = f"{self.m.name}/{self.tag}"
        self.nodes: list[onnx.NodeProto] = []
        windows = plan.windows
        self.nW, self.wmax = len(windows), max(windows)
        self.padding = None if plan.uniform else WindowPadding.of(windows)

    def op(self, op_type: str, inputs: list[str], name: str, outs: list[str] | None = None, **attrs) -> str:
        outs = outs or [f"{self.prefix}/{name}_output_0"]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{self.prefix}/{name}", **attrs))
        return outs[0]

    def key_mask(self) -> np.ndarray:
        return np.where(self.padding.valid, 0.0, _neg_big(self.e.np_dtype)).astype(self.e.np_dtype)

    def emit(self) -> None:
        self.build()
        self.e.replace(self.m, self.nodes)

    def build(self) -> None:
        raise NotImplementedError
