"""Mode ``windowed``: per-window attention as batched MatMuls, windows first; full attention whose
scores are too large computed in chunks of queries."""
from __future__ import annotations

import numpy as np
from onnx import helper

from passes.attention.emit import Emitter


class WindowedEmitter(Emitter):
    """Windows first, as every converter we target runs it correctly (OpenVINO's offline route
    folds other reshaped layouts into one unmasked attention): q, k, v become
    ``[windows, heads, w, head_dim]``; uneven windows get a key mask ``[windows, 1, 1, w]``."""

    tag = "windowed"

    def windows_of(self, t: str, tag: str, perm: list[int]) -> str:
        """[1, H, S, D] -> [nW, H, wmax, D] (k: [nW, H, D, wmax]); a Transpose is the last op before
        the MatMul, which keeps OpenVINO's SDPAReshapeFusion from folding the windows away."""
        H, D = self.plan.heads, self.plan.head_dim
        if self.padding is not None:
            t = self.op("Gather", [t, self.e.const("attn_window_pad_index", self.padding.pad)], f"Gather_pad_{tag}",
                        axis=2)
        t = self.op("Reshape", [t, self.e.const("attn_shape_hwld", np.array([H, self.nW, self.wmax, D], np.int64))],
                    f"Reshape_{tag}")
        return self.op("Transpose", [t], f"Transpose_{tag}", perm=perm)

    def build(self) -> None:
        m, H, S, D = self.m, self.plan.heads, self.plan.seq, self.plan.head_dim
        q4 = self.windows_of(m.q, "q", [1, 0, 2, 3])
        kt = self.windows_of(m.k, "k", [1, 0, 3, 2])
        v4 = self.windows_of(m.v, "v", [1, 0, 2, 3])
        s = self.op("MatMul", [q4, kt], "MatMul_qk")
        s = self.op(m.scale.op_type, [s, m.scale_const], "Scale")
        if self.padding is not None:
            mask = self.e.const("attn_window_key_mask", self.key_mask().reshape(self.nW, 1, 1, self.wmax))
            s = self.op("Add", [s, mask], "Add_key_mask")
        pr = self.op("Softmax", [s], "Softmax", axis=-1)
        o = self.op("MatMul", [pr, v4], "MatMul_v")                       # [nW, H, wmax, D]
        o = self.op("Transpose", [o], "Transpose_out", perm=[1, 0, 2, 3])  # [H, nW, wmax, D]
        out = m.pv.output[0]
        if self.padding is None:
            self.op("Reshape", [o, self.e.const("attn_shape_1hsd", np.array([1, H, S, D], np.int64))], "Reshape_out",
                    outs=[out])
        else:
            o = self.op("Reshape", [o, self.e.const("attn_shape_1hpd", np.array([1, H, self.nW * self.wmax, D],
                                                                                np.int64))], "Reshape_out")
            self.op("Gather", [o, self.e.const("attn_window_unpad_index", self.padding.unpad)], "Gather_unpad",
                    outs=[out], axis=2)


class ChunkedFullEmitter(Emitter):
    """Full attention with the queries in chunks of ``rows``: the same FLOPs, but the live score
    tensor is [1, H, rows, S] instead of [1, H, S, S] (5.4 GB per layer at 1344x1344 in fp32)."""

    tag = "chunked"

    def build(self) -> None:
        m, S, rows = self.m, self.plan.seq, self.plan.rows
        sizes = [rows] * (S // rows) + ([S % rows] if S % rows else [])
        split = self.e.const("attn_full_chunks_" + "_".join(map(str, sorted(set(sizes)))) + f"_{len(sizes)}",
                             np.array(sizes, np.int64))
        qs = [f"{self.prefix}/Split_q_output_{k}" for k in range(len(sizes))]
        self.nodes.append(helper.make_node("Split", [m.q, split], qs, name=f"{self.prefix}/Split_q", axis=2))
        kt = m.k_transpose.output[0]
        outs = []
        for k, q in enumerate(qs):
            c = f"chunk{k}"
            s = self.op("MatMul", [q, kt], f"{c}/MatMul_qk")
            s = self.op(m.scale.op_type, [s, m.scale_const], f"{c}/Scale")
            p = self.op("Softmax", [s], f"{c}/Softmax", axis=-1)
            outs.append(self.op("MatMul", [p, m.v], f"{c}/MatMul_v"))
        self.op("Concat", outs, "Concat", outs=[m.pv.output[0]], axis=2)
        self.chunks = len(sizes)

    def emit(self) -> None:
        self.build()
        self.e.replace(self.m, self.nodes, keep_k_transpose=True)
