"""The dynamic export: one encoder file for any image size, several images and video.

Two contracts, one encoder body (``encoder_body``):

- **self-contained** (``host_inputs=False``, metadata ``qvl_surgery.dynamic = "self"``): inputs
  ``pixel_values`` float32 ``[num_patches, 1176]`` and ``image_grid_thw`` int64 ``[num_images, 3]``
  (rows ``[t, h, w]`` in patches, as transformers' processor returns them, images and videos in
  the order of ``pixel_values``); output ``image_features`` ``[num_patches/4, out_hidden]``, equal
  to ``Qwen2_5_VisionTransformerPretrainedModel.forward(pixel_values, grid_thw)``. Every
  grid-derived tensor (below) is computed inside the graph from ``image_grid_thw`` with plain
  opset-17 integer ops (no Loop, no If, no sort, no custom op), under the same names.
- **host inputs** (``host_inputs=True``, ``qvl_surgery.dynamic = "host"``): ``pixel_values`` plus
  the grid-derived tensors as inputs, computed on the host by
  :func:`qvl_surgery.core.hostinputs.host_inputs` (numpy), as TensorRT-Edge-LLM, OpenVINO GenAI and
  MNN pipelines do.

The grid-derived tensors (``GRID_TENSORS``: patch and window order, its inverse, rotary cos/sin,
padded window and frame slots with their key masks) are :mod:`qvl_surgery.core.grid`'s tables: one
computation with a numpy backend (the host kind's inputs, the static export's constants) and a
graph backend (the self-contained kind); that module lists each table's dtype, shape and meaning.

The patch embedding, the rotary and attention core (:func:`qvl_surgery.core.export.rotate_qk`,
:func:`qvl_surgery.core.export.attention`), the blocks and the merger are the static export's own
builders; only the attention layout differs. Attention never builds an S x S tensor: window
blocks gather the qkv rows into padded windows ``[W, heads, 64, head_dim]`` with the key mask
``[W, 1, 1, 64]``, full-attention blocks into padded frames ``[F, heads, L, head_dim]`` with
``[F, 1, 1, L]`` (one frame per image or video frame: transformers' cu_seqlens); padded query
rows are dropped by the unpad Gather.

Full-attention scores are computed in query chunks so large images do not hold all scores at
once. ``full_chunk_mb`` is a ceiling on one chunk's scores (``[F, heads, rows, L]`` float32, MB
= 1e6 bytes), as in the attention pass; 0 means no chunks. The graph holds ``full_chunks``
Slices of the query axis (the unused ones empty), so the ceiling holds while the frames' scores
fit in that many chunks, ``F * heads * L^2 * 4 <= full_chunks * full_chunk_mb * 1e6``: at the
defaults (32 x 256 MB) on the 3b, one frame of up to 11,313 patches (about 1484x1484 px). Past
that the rows grow to ``ceil(L / full_chunks)`` per chunk and each chunk holds more than the
ceiling: a graph without Loop cannot add chunks at run time (raise ``full_chunks`` at export
for larger inputs).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from qvl_surgery.core.config import VisionConfig
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.export import (GraphBuilder, attention, encoder_block, encoder_model, merger, patch_embed, rotate_qk,
                     weight_getter)
from qvl_surgery.core.grid import GRID_TENSORS, GraphArrays, GraphValue, grid_tables_graph, table_shapes, window_slot
from qvl_surgery.core.modelfile import Model, save_model
from qvl_surgery.core.weights import WeightSource

log = logging.getLogger(__name__)

INPUT_NAME = "pixel_values"
GRID_NAME = "image_grid_thw"
OUTPUT_NAME = "image_features"
# Full attention: this many query Slices per block; each chunk's scores stay under FULL_CHUNK_MB
# while the frames fit in FULL_CHUNKS chunks (small inputs run in one chunk, the others are empty).
FULL_CHUNKS = 32
FULL_CHUNK_MB = 256


def full_chunk_rows(x: GraphArrays, cfg: VisionConfig, frames: GraphValue, frame_len: GraphValue, *, full_chunks: int,
                    full_chunk_mb: float) -> GraphValue:
    """Query rows per full-attention chunk, computed in the graph from the padded frames' shape.

    One chunk's scores are ``[F, heads, rows, L]`` float32: ``rows = full_chunk_mb * 1e6 // (F *
    heads * L * 4)`` keeps them under the ceiling (at least one row). The graph holds
    ``full_chunks`` Slices, so where the frames need more chunks than that, the rows grow to
    ``ceil(L / full_chunks)`` and the ceiling cannot hold (module docstring).
    """
    row_bytes = frames * frame_len * (cfg.num_heads * 4)
    under_ceiling = x.ints(int(full_chunk_mb * 1e6)) // x.node("Max", row_bytes, 1)
    fits_the_slices = (frame_len + (full_chunks - 1)) // full_chunks
    return x.node("Max", x.node("Max", under_ceiling, fits_the_slices), 1)


def encoder_body(g: GraphBuilder, cfg: VisionConfig, weights: WeightSource, gt: dict[str, str],
                 *, full_chunks: int = FULL_CHUNKS, full_chunk_mb: float = FULL_CHUNK_MB) -> list[str]:
    """patch embed -> blocks -> merger on ``pixel_values`` given the grid tables; returns the hidden states."""
    C, H, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    slot = window_slot(cfg)
    w = weight_getter(g, weights)
    x = GraphArrays(g, cfg, "/attn_layout")
    eps = g.const("rms_eps", np.array(1e-6, np.float32))

    h = patch_embed(g, cfg, w, gt["patch_order"])
    block_outputs = [h]

    half = g.const("split_half", np.array([D // 2, D // 2], np.int64))
    split3 = g.const("split_qkv_heads", np.array([H, H, H], np.int64))
    scale = g.const("attn_scale", np.array(math.sqrt(D), np.float32))
    out_shape = x.ints([-1, C]).name

    def padded_rotary(kind: str, shape) -> tuple[str, str]:
        """Rotary cos and sin gathered once into the kind's padded layout ``[G, 1, L, D]`` (all its blocks read them)."""
        pad = x.tensor(gt[f"{kind}_pad_index"])
        return tuple(g.op("Reshape", [x.take(x.tensor(gt[f"rotary_{t}"]), pad).name, x.name_of(shape)],
                          f"/attn_layout/{kind}_rotary_{t}", outputs=[f"{kind}_rotary_{t}"]) for t in ("cos", "sin"))

    # windows: [W, 64, 3H, D] rows
    win_qkv_shape = x.ints([-1, slot, 3 * H, D]).name
    rotary_w = padded_rotary("window", [-1, 1, slot, D])
    # frames: [F, L, 3H, D]; F and L from the key mask
    mask_shape = x.node("Shape", x.tensor(gt["frame_key_mask"]))
    frames = x.node("Slice", mask_shape, [0], [1], [0])
    frm_qkv_shape = x.concat([frames, x.ints([-1, 3 * H, D])], axis=0).name
    rotary_f = padded_rotary("frame", x.concat([frames, x.ints([1, -1, D])], axis=0))
    chunk_rows = None
    if full_chunks > 1 and full_chunk_mb and cfg.fullatt_block_indexes:
        frame_len = x.node("Squeeze", x.node("Slice", mask_shape, [3], [4], [0]), [0])
        chunk_rows = full_chunk_rows(x, cfg, x.node("Squeeze", frames, [0]), frame_len,
                                     full_chunks=full_chunks, full_chunk_mb=full_chunk_mb).name

    def attend(qkv: str, p: str, b: int) -> str:
        full = b in cfg.fullatt_block_indexes
        kind = "frame" if full else "window"
        pad, unpad, mask = gt[f"{kind}_pad_index"], gt[f"{kind}_unpad_index"], gt[f"{kind}_key_mask"]
        cos, sin = rotary_f if full else rotary_w
        t = g.op("Gather", [qkv, pad], f"{p}/attn/Gather_pad", axis=0)                     # [G*L, 3C]
        t = g.op("Reshape", [t, frm_qkv_shape if full else win_qkv_shape], f"{p}/attn/Reshape")  # [G, L, 3H, D]
        t = g.op("Transpose", [t], f"{p}/attn/Transpose", perm=[0, 2, 1, 3])               # [G, 3H, L, D]
        q, k, v = g.op("Split", [t, split3], f"{p}/attn/Split", outputs=3, axis=1)         # [G, H, L, D]
        q, kt = rotate_qk(g, q, k, cos, sin, half, f"{p}/attn")                           # kt shared by the chunks
        if full and chunk_rows is not None:
            outs = []
            for j in range(full_chunks):
                cp = f"{p}/attn/chunk_{j}"
                lo = g.op("Mul", [chunk_rows, x.name_of(j)], f"{cp}/Mul_start")
                hi = g.op("Mul", [chunk_rows, x.name_of(j + 1)], f"{cp}/Mul_end")
                qc = g.op("Slice", [q, g.op("Unsqueeze", [lo, x.name_of([0])], f"{cp}/Unsqueeze_start"),
                                    g.op("Unsqueeze", [hi, x.name_of([0])], f"{cp}/Unsqueeze_end"),
                                    x.name_of([2])], f"{cp}/Slice_q")
                outs.append(attention(g, qc, kt, v, scale, mask, cp))
            o = g.op("Concat", outs, f"{p}/attn/Concat_chunks", axis=2)
        else:
            o = attention(g, q, kt, v, scale, mask, f"{p}/attn")
        o = g.op("Transpose", [o], f"{p}/attn/Transpose_out", perm=[0, 2, 1, 3])           # [G, L, H, D]
        o = g.op("Reshape", [o, out_shape], f"{p}/attn/Reshape_out")                       # [G*L, C]
        return g.op("Gather", [o, unpad], f"{p}/attn/Gather_unpad", axis=0)                 # [S, C]

    for b in range(cfg.depth):
        h = encoder_block(g, cfg, w, eps, h, b, attend)
        block_outputs.append(h)
    merger(g, cfg, w, eps, h, np.array([-1, C * cfg.merge_unit], np.int64), gt["reverse_index"], OUTPUT_NAME)
    return block_outputs


def build_dynamic_encoder(cfg: VisionConfig, weights: WeightSource, *, host_inputs: bool = False,
                          full_chunks: int = FULL_CHUNKS, full_chunk_mb: float = FULL_CHUNK_MB) -> Model:
    """The encoder for any grid(s) as a weightless Model (weights computed on save).

    ``host_inputs=False``: inputs ``pixel_values`` + ``image_grid_thw``; True: ``pixel_values`` +
    the GRID_TENSORS (see the module docstring and :func:`qvl_surgery.core.hostinputs.host_inputs`).
    """
    g = GraphBuilder()
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["num_patches", cfg.patch_dim])]
    if host_inputs:
        gt = {n: n for n in GRID_TENSORS}
        inputs += [helper.make_tensor_value_info(n, dt, shape) for n, (dt, shape) in table_shapes(cfg).items()]
    else:
        gt = grid_tables_graph(g, cfg, GRID_NAME)
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

    ``full_chunk_mb``: ceiling in MB on one chunk of full-attention scores (module docstring).
    ``full_chunks=1`` or ``full_chunk_mb=0`` computes full attention in one piece (no query Slices,
    no empty tensors, for runtimes that reject zero-sized tensors; scores then grow as frames x
    heads x L^2).
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
