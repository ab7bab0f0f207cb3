"""Modes ``mha`` and ``onnx-attention``: one fused attention op per attention, windows as the batch."""
from __future__ import annotations

import numpy as np

from passes.attention.emit import Emitter


class _FusedEmitter(Emitter):
    """Fused attention ops take ``[batch, L, H*D]``: windows are the batch."""

    def seq3(self, t: str, tag: str) -> str:
        H, D = self.plan.heads, self.plan.head_dim
        t = self.op("Transpose", [t], f"Transpose_{tag}", perm=[0, 2, 1, 3])  # [1, S, H, D]
        if self.padding is not None:
            t = self.op("Gather", [t, self.e.const("attn_window_pad_index", self.padding.pad)], f"Gather_pad_{tag}",
                        axis=1)
        return self.op("Reshape", [t, self.e.const("attn_shape_blc", np.array([self.nW, self.wmax, H * D], np.int64))],
                       f"Reshape_{tag}")

    def bias(self) -> list[str]:
        if self.padding is None:
            return []
        full = np.broadcast_to(self.key_mask().reshape(self.nW, 1, 1, self.wmax),
                               (self.nW, 1, self.wmax, self.wmax)).copy()
        return [self.e.const("attn_window_bias", full)]

    def fused(self, q3: str, k3: str, v3: str) -> str:
        raise NotImplementedError

    def build(self) -> None:
        m, H, S, D = self.m, self.plan.heads, self.plan.seq, self.plan.head_dim
        o = self.fused(self.seq3(m.q, "q"), self.seq3(m.k, "k"), self.seq3(m.v, "v"))
        if self.padding is None:
            o = self.op("Reshape", [o, self.e.const("attn_shape_1shd", np.array([1, S, H, D], np.int64))], "Reshape_out")
        else:
            o = self.op("Reshape", [o, self.e.const("attn_shape_1pc", np.array([1, self.nW * self.wmax, H * D],
                                                                               np.int64))], "Reshape_pad")
            o = self.op("Gather", [o, self.e.const("attn_window_unpad_index", self.padding.unpad)], "Gather_unpad",
                        axis=1)
            o = self.op("Reshape", [o, self.e.const("attn_shape_1shd", np.array([1, S, H, D], np.int64))], "Reshape_out")
        self.op("Transpose", [o], "Transpose_out", outs=[m.pv.output[0]], perm=[0, 2, 1, 3])


class MhaEmitter(_FusedEmitter):
    """onnxruntime's ``com.microsoft.MultiHeadAttention``."""

    tag = "mha"

    def fused(self, q3: str, k3: str, v3: str) -> str:
        bias = self.bias()
        return self.op("MultiHeadAttention", [q3, k3, v3] + (["", ""] + bias if bias else []), "MultiHeadAttention",
                       domain="com.microsoft", num_heads=self.plan.heads, scale=self.plan.scale_value)


class OnnxAttentionEmitter(_FusedEmitter):
    """The ONNX ``Attention`` op (opset 23)."""

    tag = "onnx-attention"

    def fused(self, q3: str, k3: str, v3: str) -> str:
        H = self.plan.heads
        return self.op("Attention", [q3, k3, v3] + self.bias(), "Attention", q_num_heads=H, kv_num_heads=H,
                       scale=self.plan.scale_value)
