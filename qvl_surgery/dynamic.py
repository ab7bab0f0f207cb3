"""The dynamic export: one encoder file for any image size, several images and video.

Two contracts, one encoder body (``encoder_body``):

- **self-contained** (``host_inputs=False``, metadata ``qvl_surgery.dynamic = "self"``): inputs
  ``pixel_values`` float32 ``[num_patches, 1176]`` and ``image_grid_thw`` int64 ``[num_images, 3]``
  (rows ``[t, h, w]`` in patches, as transformers' processor returns them, images and videos in
  the order of ``pixel_values``); output ``image_features`` ``[num_patches/4, out_hidden]``, equal
  to ``Qwen2_5_VisionTransformerPretrainedModel.forward(pixel_values, grid_thw)``. Every
  grid-derived tensor below is computed inside the graph from ``image_grid_thw`` with plain
  opset-17 integer ops (no Loop, no If, no sort, no custom op), under the same names.
- **host inputs** (``host_inputs=True``, ``qvl_surgery.dynamic = "host"``): ``pixel_values`` plus
  the grid-derived tensors as inputs, computed on the host by
  :func:`qvl_surgery.hostinputs.host_inputs` (numpy), as TensorRT-Edge-LLM, OpenVINO GenAI and
  MNN pipelines do.

The grid-derived tensors (``GRID_TENSORS``; S = num_patches, M = S/4 merged tokens, W windows,
F frames = sum of t, L = the largest frame in patches, 64 = patches per window):

==================== ======= ================ ===================================================
name                 dtype   shape            meaning
==================== ======= ================ ===================================================
patch_order          int64   [S]              rows of pixel_values in window order
reverse_index        int64   [S/4]            window-order row of each output token
rotary_cos           float32 [S, head_dim]    rotary cos in window order
rotary_sin           float32 [S, head_dim]    rotary sin in window order
window_pad_index     int64   [W*64]           window-order row of every window slot (padding
                                              slots repeat a real row of their window)
window_key_mask      float32 [W, 1, 1, 64]    0 for real slots, float32 min for padding
window_unpad_index   int64   [S]              slot of every window-order row
frame_pad_index      int64   [F*L]            window-order row of every frame slot
frame_key_mask       float32 [F, 1, 1, L]     0 / float32 min, per frame (full-attention blocks)
frame_unpad_index    int64   [S]              frame slot of every window-order row
==================== ======= ================ ===================================================

Window order is transformers' ``get_window_index`` (images in order, then frames, then windows
of 4x4 merged tokens row by row, tokens row by row inside a window). The window order keeps
every image and every frame at the offsets it has in the input, so both directions of the
permutation are closed-form per token: with (image k, frame f, merged row r, col c) of a token,
its window row/col ``wr = r // 4, wc = c // 4``, the height ``hh`` of its window row and width
``ww`` of its window (4, or less at the bottom/right edge),

    position in window order = frame_start + wr*4*lw + wc*4*hh + (r % 4)*ww + (c % 4)

and the inverse divides the other way. The image of a token (or window, or frame) is found by
comparing its index against the cumulative ends of the images (``[M, num_images]`` booleans,
summed), so nothing is sorted and nothing is S x S.

Attention never builds an S x S tensor: window blocks gather the qkv rows into padded windows
``[W, heads, 64, head_dim]`` with the key mask ``[W, 1, 1, 64]`` (MatMul -> Div -> Add ->
Softmax -> MatMul), full-attention blocks into padded frames ``[F, heads, L, head_dim]`` with
``[F, 1, 1, L]`` (one frame per image or video frame: transformers' cu_seqlens); padded query
rows are dropped by the unpad Gather. Full-attention scores are computed in query chunks
(``FULL_CHUNKS`` Slices of the frame axis, each at least ``full_chunk_mb`` of scores) so large
images do not hold all scores at once.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from .config import VisionConfig
from .errors import BadInput
from .export import GraphBuilder, linear, encoder_block, encoder_model, merger, rotary, weight_getter
from .modelfile import Model, save_model
from .weights import WeightSource

log = logging.getLogger(__name__)

INPUT_NAME = "pixel_values"
GRID_NAME = "image_grid_thw"
OUTPUT_NAME = "image_features"
GRID_TENSORS = ("patch_order", "reverse_index", "rotary_cos", "rotary_sin",
                "window_pad_index", "window_key_mask", "window_unpad_index",
                "frame_pad_index", "frame_key_mask", "frame_unpad_index")
NEG = float(np.finfo(np.float32).min)
# Full attention: at most this many query chunks per block; each chunk's scores are at least
# FULL_CHUNK_MB (small inputs run in one chunk, the other chunks are empty Slices).
FULL_CHUNKS = 32
FULL_CHUNK_MB = 256


def window_slot(cfg: VisionConfig) -> int:
    """Patches per padded window: window_merged^2 merged tokens of merge_unit patches (64)."""
    return cfg.window_merged ** 2 * cfg.merge_unit


def host_input_shapes(cfg: VisionConfig) -> dict[str, tuple[int, list]]:
    """Dtype and (symbolic) shape of every grid tensor, as graph inputs of the host kind."""
    D, slot = cfg.head_dim, window_slot(cfg)
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    return {
        "patch_order": (i64, ["num_patches"]),
        "reverse_index": (i64, ["num_tokens"]),
        "rotary_cos": (f32, ["num_patches", D]),
        "rotary_sin": (f32, ["num_patches", D]),
        "window_pad_index": (i64, ["window_slots"]),
        "window_key_mask": (f32, ["num_windows", 1, 1, slot]),
        "window_unpad_index": (i64, ["num_patches"]),
        "frame_pad_index": (i64, ["frame_slots"]),
        "frame_key_mask": (f32, ["num_frames", 1, 1, "frame_len"]),
        "frame_unpad_index": (i64, ["num_patches"]),
    }


class _Ops:
    """Auto-named nodes under one prefix, and named int64 constants (grid arithmetic)."""

    def __init__(self, g: GraphBuilder, prefix: str):
        self.g, self.prefix, self.n = g, prefix, 0

    def __call__(self, op: str, *inputs: str, tag: str | None = None, out: str | None = None, **attrs) -> str:
        self.n += 1
        name = f"{self.prefix}/{tag or op}" if tag else f"{self.prefix}/{op}_{self.n}"
        return self.g.op(op, list(inputs), name, **({"outputs": [out]} if out else {}), **attrs)

    def i64(self, v) -> str:
        a = np.asarray(v, np.int64)
        text = "_".join(str(int(x)).replace("-", "m") for x in a.reshape(-1))
        return self.g.const(f"i64{'' if a.ndim == 0 else 'v'}_{text}", a)

    def f32(self, name: str, v) -> str:
        return self.g.const(name, np.asarray(v, np.float32))


def grid_tensors(g: GraphBuilder, cfg: VisionConfig, grid: str) -> dict[str, str]:
    """Nodes computing every GRID_TENSORS entry from ``grid`` (int64 [N, 3]); returns their names."""
    o = _Ops(g, "/grid")
    m, ws, mu = cfg.spatial_merge_size, cfg.window_merged, cfg.merge_unit
    ws2 = ws * ws
    D = cfg.head_dim
    I = o.i64

    def col(i: int, tag: str) -> str:
        return o("Gather", grid, I(i), axis=1, tag=tag)

    def owner(idx: str, ends: str, tag: str) -> str:
        """Index of the segment each entry of ``idx`` falls in, given the segments' cumulative ends."""
        ge = o("GreaterOrEqual", o("Unsqueeze", idx, I([1])), o("Unsqueeze", ends, I([0])), tag=f"{tag}_cmp")
        return o("ReduceSum", o("Cast", ge, to=TensorProto.INT64), I([1]), keepdims=0, tag=f"{tag}_owner")

    def units(merged: str, out: str) -> str:
        """Merged-token indices -> their merge_unit patch indices, flattened."""
        p = o("Add", o("Unsqueeze", o("Mul", merged, I(mu)), I([1])), I(np.arange(mu)))
        return o("Reshape", p, I([-1]), out=out)

    def at(x: str, k: str) -> str:
        return o("Gather", x, k, axis=0)

    def mn(a: str, b: str) -> str:
        return o("Min", a, b)

    t = col(0, "t")
    lh = o("Div", col(1, "h"), I(m), tag="llm_h")
    lw = o("Div", col(2, "w"), I(m), tag="llm_w")
    fr = o("Mul", lh, lw, tag="frame_tokens")
    tok = o("Mul", t, fr, tag="image_tokens")
    img_end = o("CumSum", tok, I(0), tag="image_end")
    img_start = o("Sub", img_end, tok, tag="image_start")
    nwh = o("Div", o("Add", lh, I(ws - 1)), I(ws))
    nww = o("Div", o("Add", lw, I(ws - 1)), I(ws), tag="windows_w")
    wf = o("Mul", nwh, nww, tag="frame_windows")
    wi = o("Mul", t, wf)
    win_end = o("CumSum", wi, I(0), tag="window_end")
    win_start = o("Sub", win_end, wi, tag="window_start")
    frm_end = o("CumSum", t, I(0), tag="frame_end")
    frm_start = o("Sub", frm_end, t, tag="frame_start")
    n_tok = o("ReduceSum", tok, keepdims=0, tag="num_tokens")
    n_win = o("ReduceSum", wi, keepdims=0, tag="num_windows")
    n_frm = o("ReduceSum", t, keepdims=0, tag="num_frames")
    lmax = o("ReduceMax", fr, keepdims=0, tag="frame_len")

    # --- every merged token, by its index p (window-order position and input position alike:
    # window order keeps images and frames where they are)
    p = o("Range", I(0), n_tok, I(1), tag="token_range")
    k = owner(p, img_end, "token_image")
    lh_p, lw_p, fr_p = at(lh, k), at(lw, k), at(fr, k)
    local = o("Sub", p, at(img_start, k))
    tf = o("Div", local, fr_p)
    q = o("Sub", local, o("Mul", tf, fr_p))                     # position inside its frame
    fstart = o("Sub", p, q, tag="token_frame_start")
    # input order -> window order (reverse_index)
    r = o("Div", q, lw_p)
    c = o("Sub", q, o("Mul", r, lw_p))
    wr, wc = o("Div", r, I(ws)), o("Div", c, I(ws))
    ir, ic = o("Sub", r, o("Mul", wr, I(ws))), o("Sub", c, o("Mul", wc, I(ws)))
    hh = mn(I(ws), o("Sub", lh_p, o("Mul", wr, I(ws))))
    ww = mn(I(ws), o("Sub", lw_p, o("Mul", wc, I(ws))))
    pos = o("Add", fstart, o("Mul", o("Mul", wr, I(ws)), lw_p))
    pos = o("Add", pos, o("Mul", o("Mul", wc, I(ws)), hh))
    pos = o("Add", pos, o("Add", o("Mul", ir, ww), ic), out="reverse_index")
    # window order -> input order (window_index), with window id and offset inside the window
    rb = o("Mul", lw_p, I(ws))
    wr2 = o("Div", q, rb)
    rem = o("Sub", q, o("Mul", wr2, rb))
    hh2 = mn(I(ws), o("Sub", lh_p, o("Mul", wr2, I(ws))))
    cb = o("Mul", hh2, I(ws))
    wc2 = o("Div", rem, cb)
    rem2 = o("Sub", rem, o("Mul", wc2, cb))
    ww2 = mn(I(ws), o("Sub", lw_p, o("Mul", wc2, I(ws))))
    ir2 = o("Div", rem2, ww2)
    ic2 = o("Sub", rem2, o("Mul", ir2, ww2))
    r2 = o("Add", o("Mul", wr2, I(ws)), ir2)
    c2 = o("Add", o("Mul", wc2, I(ws)), ic2)
    window_index = o("Add", fstart, o("Add", o("Mul", r2, lw_p), c2), tag="window_index")
    units(window_index, "patch_order")
    wid = o("Add", at(win_start, k), o("Mul", tf, at(wf, k)))
    wid = o("Add", wid, o("Add", o("Mul", wr2, at(nww, k)), wc2), tag="token_window")
    units(o("Add", o("Mul", wid, I(ws2)), rem2), "window_unpad_index")
    fid = o("Add", at(frm_start, k), tf, tag="token_frame")
    units(o("Add", o("Mul", fid, lmax), q), "frame_unpad_index")

    # --- rotary cos/sin in window order: patch (row, col) = (r2*m + a, c2*m + b)
    dim = D // 2
    inv_freq = (1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)
    freq = o.f32("rotary_inv_freq", inv_freq)
    a_off = I(np.repeat(np.arange(m), m))
    b_off = I(np.tile(np.arange(m), m))

    def angles(x: str, off: str) -> str:
        pp = o("Add", o("Unsqueeze", o("Mul", x, I(m)), I([1])), off)                # [M, mu]
        pf = o("Cast", o("Unsqueeze", pp, I([2])), to=TensorProto.FLOAT)             # [M, mu, 1]
        return o("Mul", pf, freq)                                                    # [M, mu, D/4]

    rot = o("Concat", angles(r2, a_off), angles(c2, b_off), axis=-1)               # [M, mu, D/2]
    rot = o("Reshape", rot, I([-1, dim]))
    emb = o("Concat", rot, rot, axis=-1, tag="rotary_emb")
    o("Cos", emb, out="rotary_cos")
    o("Sin", emb, out="rotary_sin")

    # --- window slots: W windows x ws2 merged slots
    zero, neg = o.f32("mask_zero", 0.0), o.f32("mask_min", NEG)
    sl = o("Range", I(0), o("Mul", n_win, I(ws2)), I(1), tag="window_slot_range")
    wv = o("Div", sl, I(ws2))
    e = o("Sub", sl, o("Mul", wv, I(ws2)))
    kw = owner(wv, win_end, "window_image")
    lwin = o("Sub", wv, at(win_start, kw))
    wf_w, nww_w, lw_w = at(wf, kw), at(nww, kw), at(lw, kw)
    tfw = o("Div", lwin, wf_w)
    wiw = o("Sub", lwin, o("Mul", tfw, wf_w))
    wrw = o("Div", wiw, nww_w)
    wcw = o("Sub", wiw, o("Mul", wrw, nww_w))
    hhw = mn(I(ws), o("Sub", at(lh, kw), o("Mul", wrw, I(ws))))
    www = mn(I(ws), o("Sub", lw_w, o("Mul", wcw, I(ws))))
    nw = o("Mul", hhw, www)
    start = o("Add", at(img_start, kw), o("Mul", tfw, at(fr, kw)))
    start = o("Add", start, o("Mul", o("Mul", wrw, I(ws)), lw_w))
    start = o("Add", start, o("Mul", o("Mul", wcw, I(ws)), hhw), tag="window_first")
    units(o("Add", start, mn(e, o("Sub", nw, I(1)))), "window_pad_index")
    valid = o("Less", e, nw)
    km = o("Expand", o("Unsqueeze", o("Where", valid, zero, neg), I([1])), I([1, mu]))
    o("Reshape", km, I([-1, 1, 1, ws2 * mu]), out="window_key_mask")

    # --- frame slots: F frames x lmax merged slots
    fs = o("Range", I(0), o("Mul", n_frm, lmax), I(1), tag="frame_slot_range")
    fv = o("Div", fs, lmax)
    e = o("Sub", fs, o("Mul", fv, lmax))
    kf = owner(fv, frm_end, "frame_image")
    fr_f = at(fr, kf)
    start = o("Add", at(img_start, kf), o("Mul", o("Sub", fv, at(frm_start, kf)), fr_f), tag="frame_first")
    units(o("Add", start, mn(e, o("Sub", fr_f, I(1)))), "frame_pad_index")
    valid = o("Less", e, fr_f)
    km = o("Expand", o("Unsqueeze", o("Where", valid, zero, neg), I([1])), I([1, mu]))
    shape = o("Concat", o("Unsqueeze", n_frm, I([0])), I([1, 1, -1]), axis=0)
    o("Reshape", km, shape, out="frame_key_mask")
    return {n: n for n in GRID_TENSORS}


def encoder_body(g: GraphBuilder, cfg: VisionConfig, weights: WeightSource, gt: dict[str, str],
                 *, full_chunks: int = FULL_CHUNKS, full_chunk_mb: float = FULL_CHUNK_MB) -> list[str]:
    """patch embed -> blocks -> merger on ``pixel_values`` given the grid tensors; returns the hidden states."""
    C, H, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    slot = window_slot(cfg)
    w = weight_getter(g, weights)
    o = _Ops(g, "/attn_layout")
    I = o.i64
    eps = g.const("rms_eps", np.array(1e-6, np.float32))

    x = g.op("Gather", [INPUT_NAME, gt["patch_order"]], "/patch_embed/Gather", axis=0)
    h = linear(g, x, w("patch_embed.proj.weight", (C, cfg.patch_dim)), None, "/patch_embed/proj/Gemm",
              output="patch_embed.output")
    block_outputs = [h]

    half = g.const("split_half", np.array([D // 2, D // 2], np.int64))
    split3 = g.const("split_qkv_heads", np.array([H, H, H], np.int64))
    scale = g.const("attn_scale", np.array(math.sqrt(D), np.float32))
    out_shape = I([-1, C])
    # windows: [W, 64, 3H, D] rows; rotary tables gathered once into the same padded layout
    win_qkv_shape = I([-1, slot, 3 * H, D])
    win_rot_shape = I([-1, 1, slot, D])
    cos_w = o("Reshape", o("Gather", gt["rotary_cos"], gt["window_pad_index"], axis=0), win_rot_shape,
              out="window_rotary_cos")
    sin_w = o("Reshape", o("Gather", gt["rotary_sin"], gt["window_pad_index"], axis=0), win_rot_shape,
              out="window_rotary_sin")
    # frames: [F, L, 3H, D]; F from the key mask
    kshape = o("Shape", gt["frame_key_mask"], tag="frame_mask_shape")
    n_frm = o("Slice", kshape, I([0]), I([1]), I([0]))
    f_len = o("Slice", kshape, I([3]), I([4]), I([0]), tag="frame_len")
    frm_qkv_shape = o("Concat", n_frm, I([-1, 3 * H, D]), axis=0)
    frm_rot_shape = o("Concat", n_frm, I([1, -1, D]), axis=0)
    cos_f = o("Reshape", o("Gather", gt["rotary_cos"], gt["frame_pad_index"], axis=0), frm_rot_shape,
              out="frame_rotary_cos")
    sin_f = o("Reshape", o("Gather", gt["rotary_sin"], gt["frame_pad_index"], axis=0), frm_rot_shape,
              out="frame_rotary_sin")
    chunk_rows = None
    if full_chunks > 1 and cfg.fullatt_block_indexes:
        # rows per query chunk: max(ceil(L / full_chunks), budget / (F * H * L * 4 bytes))
        fl = o("Squeeze", f_len, I([0]))
        nf = o("Squeeze", n_frm, I([0]))
        by_count = o("Div", o("Add", fl, I(full_chunks - 1)), I(full_chunks))
        denom = o("Mul", o("Mul", nf, fl), I(H * 4))
        by_budget = o("Div", I(int(full_chunk_mb * 1e6)), o("Max", denom, I(1)))
        chunk_rows = o("Max", o("Max", by_count, by_budget), I(1), tag="full_chunk_rows")

    def attention(q: str, kt: str, v: str, mask: str, p: str) -> str:
        s = g.op("MatMul", [q, kt], f"{p}/MatMul_qk")
        s = g.op("Div", [s, scale], f"{p}/Div_scale")
        s = g.op("Add", [s, mask], f"{p}/Add_mask")
        pr = g.op("Softmax", [s], f"{p}/Softmax", axis=-1)
        return g.op("MatMul", [pr, v], f"{p}/MatMul_v")

    def attend(qkv: str, p: str, b: int) -> str:
        full = b in cfg.fullatt_block_indexes
        kind = "frame" if full else "window"
        pad, unpad, mask = gt[f"{kind}_pad_index"], gt[f"{kind}_unpad_index"], gt[f"{kind}_key_mask"]
        cos, sin = (cos_f, sin_f) if full else (cos_w, sin_w)
        x = g.op("Gather", [qkv, pad], f"{p}/attn/Gather_pad", axis=0)                     # [G*L, 3C]
        x = g.op("Reshape", [x, frm_qkv_shape if full else win_qkv_shape], f"{p}/attn/Reshape")  # [G, L, 3H, D]
        x = g.op("Transpose", [x], f"{p}/attn/Transpose", perm=[0, 2, 1, 3])               # [G, 3H, L, D]
        q, k, v = g.op("Split", [x, split3], f"{p}/attn/Split", outputs=3, axis=1)         # [G, H, L, D]
        q = rotary(g, q, cos, sin, half, f"{p}/attn/rotary_q")
        k = rotary(g, k, cos, sin, half, f"{p}/attn/rotary_k")
        kt = g.op("Transpose", [k], f"{p}/attn/Transpose_k", perm=[0, 1, 3, 2])           # shared by the chunks
        if full and chunk_rows is not None:
            outs = []
            for j in range(full_chunks):
                cp = f"{p}/attn/chunk_{j}"
                lo = g.op("Mul", [chunk_rows, I(j)], f"{cp}/Mul_start")
                hi = g.op("Mul", [chunk_rows, I(j + 1)], f"{cp}/Mul_end")
                qc = g.op("Slice", [q, g.op("Unsqueeze", [lo, I([0])], f"{cp}/Unsqueeze_start"),
                                    g.op("Unsqueeze", [hi, I([0])], f"{cp}/Unsqueeze_end"), I([2])], f"{cp}/Slice_q")
                outs.append(attention(qc, kt, v, mask, cp))
            o_ = g.op("Concat", outs, f"{p}/attn/Concat_chunks", axis=2)
        else:
            o_ = attention(q, kt, v, mask, f"{p}/attn")
        o_ = g.op("Transpose", [o_], f"{p}/attn/Transpose_out", perm=[0, 2, 1, 3])         # [G, L, H, D]
        o_ = g.op("Reshape", [o_, out_shape], f"{p}/attn/Reshape_out")                     # [G*L, C]
        return g.op("Gather", [o_, unpad], f"{p}/attn/Gather_unpad", axis=0)                # [S, C]

    for b in range(cfg.depth):
        h = encoder_block(g, cfg, w, eps, h, b, attend)
        block_outputs.append(h)
    merger(g, cfg, w, eps, h, np.array([-1, C * cfg.merge_unit], np.int64), gt["reverse_index"], OUTPUT_NAME)
    return block_outputs


def build_dynamic_encoder(cfg: VisionConfig, weights: WeightSource, *, host_inputs: bool = False,
                          full_chunks: int = FULL_CHUNKS, full_chunk_mb: float = FULL_CHUNK_MB) -> Model:
    """The encoder for any grid(s) as a weightless Model (weights computed on save).

    ``host_inputs=False``: inputs ``pixel_values`` + ``image_grid_thw``; True: ``pixel_values`` +
    the GRID_TENSORS (see the module docstring and :func:`qvl_surgery.hostinputs.host_inputs`).
    """
    g = GraphBuilder()
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["num_patches", cfg.patch_dim])]
    if host_inputs:
        gt = {n: n for n in GRID_TENSORS}
        inputs += [helper.make_tensor_value_info(n, dt, shape) for n, (dt, shape) in host_input_shapes(cfg).items()]
    else:
        gt = grid_tensors(g, cfg, GRID_NAME)
        inputs.append(helper.make_tensor_value_info(GRID_NAME, TensorProto.INT64, ["num_images", 3]))
    block_outputs = encoder_body(g, cfg, weights, gt, full_chunks=full_chunks, full_chunk_mb=full_chunk_mb)
    graph = helper.make_graph(
        g.nodes, "qwen2_5_vl_vision_encoder_dynamic", inputs,
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["num_tokens", cfg.out_hidden_size])],
        initializer=g.initializers,
        value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT, ["num_patches", cfg.hidden_size])
                    for n in block_outputs],
    )
    return encoder_model(graph, g, cfg, weights, block_outputs, {
        "dynamic": "host" if host_inputs else "self",
        "grid_tensors": json.dumps(list(GRID_TENSORS)),
    })


@dataclass
class DynamicExportReport:
    output: Path
    kind: str            # "self" or "host"
    inputs: list[str]
    parameters: int
    nodes: int
    weight_bytes: int

    def lines(self) -> list[str]:
        what = ("pixel_values + image_grid_thw" if self.kind == "self"
                else f"pixel_values + {len(self.inputs) - 1} host-computed grid tensors")
        beside = self.output.with_name(self.output.name + ".data").exists()
        return [f"exported {self.output}" + (f" ({self.output.name}.data beside it)" if beside else " (one file)"),
                f"  dynamic ({self.kind}): any grid, several images and video; inputs {what} -> {OUTPUT_NAME}",
                f"  {self.parameters:,} parameters, {self.weight_bytes / 1e9:.2f} GB fp32, {self.nodes} nodes"]


def export_dynamic(weights: WeightSource, out: str | Path, *, host_inputs: bool = False, progress: bool = True,
                   check: bool = True, overwrite: bool = False, full_chunks: int = FULL_CHUNKS,
                   full_chunk_mb: float = FULL_CHUNK_MB, single_file: bool = False) -> DynamicExportReport:
    """Build the dynamic graph and stream every weight into ``out.data`` (into ``out`` itself with
    ``single_file``, for models under 2 GB); returns what was written.

    ``full_chunks=1`` computes full attention in one piece (no query Slices, no empty tensors,
    for runtimes that reject zero-sized tensors; scores then grow as frames x heads x L^2).
    """
    out = Path(out)
    model = build_dynamic_encoder(weights.cfg, weights, host_inputs=host_inputs, full_chunks=full_chunks,
                                  full_chunk_mb=full_chunk_mb)
    save_model(model, out, check=check, progress="export" if progress else None, overwrite=overwrite,
               single_file=single_file)
    return DynamicExportReport(output=out, kind="host" if host_inputs else "self",
                               inputs=[i.name for i in model.graph.input],
                               parameters=sum(int(np.prod(s)) for s in weights.shapes.values()),
                               nodes=len(model.graph.node), weight_bytes=model.weight_bytes())


def check_grid(cfg: VisionConfig, pixel_values_rows: int, grid_thw) -> np.ndarray:
    """``image_grid_thw`` as int64 ``[N, 3]`` if it fits ``pixel_values_rows``; else BadInput in one line."""
    g = np.asarray(grid_thw)
    if g.ndim != 2 or g.shape[1] != 3 or g.shape[0] < 1:
        raise BadInput(f"image_grid_thw has shape {list(g.shape)}: it must be [num_images, 3] rows of (t, h, w)")
    if not np.issubdtype(g.dtype, np.integer):
        raise BadInput(f"image_grid_thw has dtype {g.dtype}: it must be integer (int64), rows of (t, h, w) in patches")
    g = g.astype(np.int64)
    bad = np.flatnonzero((g <= 0).any(axis=1))
    if bad.size:
        raise BadInput(f"image_grid_thw row {int(bad[0])} is {g[bad[0]].tolist()}: t, h and w must all be positive")
    m = cfg.spatial_merge_size
    bad = np.flatnonzero((g[:, 1:] % m).any(axis=1))
    if bad.size:
        raise BadInput(f"image_grid_thw row {int(bad[0])} is {g[bad[0]].tolist()}: h and w must be multiples of "
                       f"spatial_merge_size {m} (images resized to multiples of {m * cfg.patch_size} px)")
    total = int(np.prod(g, axis=1).sum())
    if total != int(pixel_values_rows):
        raise BadInput(f"image_grid_thw covers {total} patches (sum of t*h*w) but pixel_values has "
                       f"{int(pixel_values_rows)} rows: pass the grid that came with these pixel values")
    return g
