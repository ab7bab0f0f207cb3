"""The one fp32 export of the patched Qwen2.5-VL vision encoder.

The graph is written node by node from the vision config (no tracer): every op is the one
transformers' forward computes, with the python-side work done here, outside the graph:

- window order: the rows of ``pixel_values`` are gathered into window order once (a Gather
  on the input); the output is gathered back with the inverse order;
- rotary cos/sin for that order are constants ``[S, head_dim]`` shared by every block;
- window attention masks are built at run time from one int64 ``window_id`` vector
  (Equal of its column and row view, then Where): no S x S constant, computed once, shared;
  full-attention blocks of a single image carry no mask at all;
- attention is explicit: MatMul(Q, K^T) / sqrt(d) (+ mask) -> Softmax -> MatMul(V).

Linear layers are ``Gemm(transB=1)`` on the checkpoint's own ``[out, in]`` weights, so weight bytes
are written unchanged; the patch-embedding Conv3d (kernel == stride == one patch) is the same
Gemm on its weight viewed as ``[hidden, 1176]``.

The hidden state between blocks is named ``blocks.{i}.output`` (``patch_embed.output`` before
block 0); split and the other passes find their cut points there. ``metadata_props`` records
what later passes need (``qvl_surgery.*`` keys).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qvl_surgery import __version__
from qvl_surgery.core import imagein
from qvl_surgery.core.config import VisionConfig, check_image_size
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.grid import grid_tables_numpy
from qvl_surgery.core.layout import window_layout
from qvl_surgery.core.modelfile import Computed, Model, save_model
from qvl_surgery.core.weights import WeightSource

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
META = "qvl_surgery."


class GraphBuilder:
    """Minimal node/initializer bookkeeping with readable, unique names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.sources: dict[str, Computed] = {}
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, inputs: list[str], name: str, *, outputs: int | list[str] = 1, **attrs) -> str | list[str]:
        if isinstance(outputs, int):
            outs = [f"{name}_output_{k}" for k in range(outputs)]
        else:
            outs = outputs
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, name: str, value: np.ndarray) -> str:
        """A small or computed-once constant, stored once however often it is used."""
        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes()) if value.nbytes <= 64 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        t = numpy_helper.from_array(value, name)
        self.initializers.append(t)
        if key is not None:
            self._consts[key] = name
        return name

    def weight(self, name: str, shape: tuple[int, ...], make) -> str:
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        self.initializers.append(t)
        self.sources[name] = Computed(make, int(np.prod(shape)) * 4)
        return name


@dataclass
class ExportReport:
    output: Path
    image_size: tuple[int, int]
    grid: tuple[int, int, int]
    seq_len: int
    tokens: int
    parameters: int
    nodes: int
    weight_bytes: int
    image_input: str | None = None   # an image-in export's layout
    gathers: int = 0

    def lines(self) -> list[str]:
        beside = self.output.with_name(self.output.name + ".data").exists()
        out = [f"exported {self.output}" + (f" ({self.output.name}.data beside it)" if beside else " (one file)"),
               f"  image {self.image_size[0]}x{self.image_size[1]}: grid {list(self.grid)}, "
               f"{self.seq_len} patches -> {self.tokens} tokens",
               f"  {self.parameters:,} parameters, {self.weight_bytes / 1e9:.2f} GB fp32, {self.nodes} nodes"]
        if self.image_input:
            h, w = self.image_size
            form = {"nhwc": f"uint8 [1, {h}, {w}, 3]", "nchw": f"float [1, 3, {h}, {w}] in 0..255",
                    "nchw-normalized": f"float [1, 3, {h}, {w}], normalized by the toolchain"}[self.image_input]
            order = ("window order by Reshape/Transpose (no Gather)" if not self.gathers else
                     f"{self.gathers} Gathers of the window order (the windows do not tile {h}x{w}: "
                     "sides multiples of 112 px do)")
            mean, std = imagein.toolchain_mean_std(self.image_input)
            how = ("rescale and mean/std folded into the patch Conv" if self.image_input != "nchw-normalized" else
                   "the patch Conv unfolded")
            out.append(f"  input image {form}: {how} (toolchain mean {mean}, std {std}); {order}")
        return out


def _rms_norm(g: GraphBuilder, x: str, weight: str, prefix: str, eps: str) -> str:
    two = g.const("const_two", np.array(2.0, np.float32))
    sq = g.op("Pow", [x, two], f"{prefix}/Pow")
    var = g.op("ReduceMean", [sq], f"{prefix}/ReduceMean", axes=[-1], keepdims=1)
    var = g.op("Add", [var, eps], f"{prefix}/Add")
    rms = g.op("Sqrt", [var], f"{prefix}/Sqrt")
    y = g.op("Div", [x, rms], f"{prefix}/Div")
    return g.op("Mul", [weight, y], f"{prefix}/Mul")


def linear(g: GraphBuilder, x: str, w: str, b: str | None, name: str, output: str | None = None) -> str:
    ins = [x, w] + ([b] if b else [])
    return g.op("Gemm", ins, name, transB=1, **({"outputs": [output]} if output else {}))


def weight_getter(g: GraphBuilder, weights: WeightSource):
    """``w(name[, shape])``: an external fp32 initializer whose bytes come from ``weights`` on save."""
    def w(name: str, shape: tuple[int, ...] | None = None) -> str:
        shape = shape or weights.shapes[name]
        return g.weight(name, shape, lambda n=name, s=shape: weights.array(n).reshape(s))
    return w


def patch_embed(g: GraphBuilder, cfg: VisionConfig, w, patch_order: str) -> str:
    """``pixel_values`` rows gathered into window order, then the patch Conv3d as one Gemm on its
    weight viewed as ``[hidden, 1176]``; returns ``patch_embed.output``."""
    x = g.op("Gather", [INPUT_NAME, patch_order], "/patch_embed/Gather", axis=0)
    return linear(g, x, w("patch_embed.proj.weight", (cfg.hidden_size, cfg.patch_dim)), None,
                  "/patch_embed/proj/Gemm", output="patch_embed.output")


def rotary(g: GraphBuilder, t: str, cos: str, sin: str, half: str, p: str) -> str:
    """Rotate-half rotary embedding: t * cos + rotate_half(t) * sin (last axis = head_dim)."""
    x1, x2 = g.op("Split", [t, half], f"{p}/Split", outputs=2, axis=-1)
    rot = g.op("Concat", [g.op("Neg", [x2], f"{p}/Neg"), x1], f"{p}/Concat", axis=-1)
    return g.op("Add", [g.op("Mul", [t, cos], f"{p}/Mul_cos"), g.op("Mul", [rot, sin], f"{p}/Mul_sin")], f"{p}/Add")


def rotate_qk(g: GraphBuilder, q: str, k: str, cos: str, sin: str, half: str, p: str) -> tuple[str, str]:
    """Rotary on q and k ``[..., L, head_dim]``; returns q and k transposed to ``[..., head_dim, L]``."""
    q = rotary(g, q, cos, sin, half, f"{p}/rotary_q")
    k = rotary(g, k, cos, sin, half, f"{p}/rotary_k")
    return q, g.op("Transpose", [k], f"{p}/Transpose_k", perm=[0, 1, 3, 2])


def attention(g: GraphBuilder, q: str, kt: str, v: str, scale: str, mask: str | None, p: str) -> str:
    """Explicit attention: MatMul(q, k^T) / sqrt(d) (+ mask) -> Softmax -> MatMul(v). The attention
    pass matches exactly this pattern."""
    s = g.op("MatMul", [q, kt], f"{p}/MatMul_qk")
    s = g.op("Div", [s, scale], f"{p}/Div_scale")
    if mask is not None:
        s = g.op("Add", [s, mask], f"{p}/Add_mask")
    pr = g.op("Softmax", [s], f"{p}/Softmax", axis=-1)
    return g.op("MatMul", [pr, v], f"{p}/MatMul_v")


def encoder_block(g: GraphBuilder, cfg: VisionConfig, w, eps: str, h: str, b: int, attend) -> str:
    """One vision block on the hidden state ``h`` ``[S, C]``; returns ``blocks.{b}.output``.

    ``attend(qkv, prefix, b)`` maps the qkv projection ``[S, 3C]`` to the attention output
    ``[S, C]`` before ``attn.proj``: the only part that differs between the static and the
    dynamic exports. Node names are ``/blocks.{b}/...``.
    """
    p = f"/blocks.{b}"
    wp = f"blocks.{b}."
    n1 = _rms_norm(g, h, w(wp + "norm1.weight"), f"{p}/norm1", eps)
    qkv = linear(g, n1, w(wp + "attn.qkv.weight"), w(wp + "attn.qkv.bias"), f"{p}/attn/qkv/Gemm")
    o = attend(qkv, p, b)
    a = linear(g, o, w(wp + "attn.proj.weight"), w(wp + "attn.proj.bias"), f"{p}/attn/proj/Gemm")
    h = g.op("Add", [h, a], f"{p}/Add_attn")
    n2 = _rms_norm(g, h, w(wp + "norm2.weight"), f"{p}/norm2", eps)
    gate = linear(g, n2, w(wp + "mlp.gate_proj.weight"), w(wp + "mlp.gate_proj.bias"), f"{p}/mlp/gate_proj/Gemm")
    up = linear(g, n2, w(wp + "mlp.up_proj.weight"), w(wp + "mlp.up_proj.bias"), f"{p}/mlp/up_proj/Gemm")
    sig = g.op("Sigmoid", [gate], f"{p}/mlp/act/Sigmoid")
    act = g.op("Mul", [gate, sig], f"{p}/mlp/act/Mul")
    m = g.op("Mul", [act, up], f"{p}/mlp/Mul")
    d = linear(g, m, w(wp + "mlp.down_proj.weight"), w(wp + "mlp.down_proj.bias"), f"{p}/mlp/down_proj/Gemm")
    return g.op("Add", [h, d], f"{p}/Add_mlp", outputs=[f"blocks.{b}.output"])


def merger(g: GraphBuilder, cfg: VisionConfig, w, eps: str, h: str, merged_shape: np.ndarray,
           reverse_index: str | None, output: str) -> str:
    """ln_q -> 2x2 merge (Reshape to ``merged_shape``) -> MLP with exact GELU -> back to input order
    (a Gather of ``reverse_index``; None: left in window order, as ``merger.output``)."""
    n = _rms_norm(g, h, w("merger.ln_q.weight"), "/merger/ln_q", eps)
    n = g.op("Reshape", [n, g.const("merger_shape", np.asarray(merged_shape, np.int64))], "/merger/Reshape")
    y = linear(g, n, w("merger.mlp.0.weight"), w("merger.mlp.0.bias"), "/merger/mlp.0/Gemm")
    # Exact GELU (nn.GELU()): 0.5 * x * (1 + erf(x / sqrt(2))); opset 17 has no Gelu op.
    e = g.op("Erf", [g.op("Div", [y, g.const("sqrt2", np.array(math.sqrt(2.0), np.float32))], "/merger/gelu/Div")],
             "/merger/gelu/Erf")
    e = g.op("Add", [e, g.const("one", np.array(1.0, np.float32))], "/merger/gelu/Add")
    y = g.op("Mul", [g.op("Mul", [y, e], "/merger/gelu/Mul"), g.const("half", np.array(0.5, np.float32))],
             "/merger/gelu/Mul_half")
    y = linear(g, y, w("merger.mlp.2.weight"), w("merger.mlp.2.bias"), "/merger/mlp.2/Gemm", output="merger.output")
    if reverse_index is None:
        return y
    return g.op("Gather", [y, reverse_index], "/merger/Gather_reverse", axis=0, outputs=[output])


# transformers' Qwen2VLImageProcessor (4.49.0) resizes every image with smart_resize(factor=28,
# min_pixels=56*56) (the released Qwen2.5-VL preprocessor_config.json sets the same min_pixels):
# no image it returns has fewer pixels.
PROCESSOR_MIN_PIXELS = 56 * 56


def check_processor_size(cfg: VisionConfig, size: tuple[int, int], min_pixels: int = PROCESSOR_MIN_PIXELS
                         ) -> tuple[int, int]:
    """``size`` if transformers' image processor can return an image of it; else BadInput in one line
    naming the size the processor makes of such an image (smart_resize's own rule)."""
    h, w = size
    if h * w >= min_pixels:
        return h, w
    factor = cfg.patch_size * cfg.spatial_merge_size
    beta = math.sqrt(min_pixels / (h * w))
    up_h, up_w = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    raise BadInput(f"image size {h}x{w}: {h * w} pixels, below min_pixels {min_pixels} of transformers' Qwen2-VL "
                   f"image processor, so no processor output has this size (it resizes a {h}x{w} image to "
                   f"{up_h}x{up_w}); export at {up_h}x{up_w}, or use --dynamic")


def build_encoder(cfg: VisionConfig, weights: WeightSource, image_size: tuple[int, int], *,
                  image_input: str | None = None) -> Model:
    """The patched encoder for one image of ``image_size`` as a weightless Model (weights computed on save).
    Sizes transformers' image processor cannot return are refused (:func:`check_processor_size`).
    ``image_input`` ``"nhwc"``, ``"nchw"`` or ``"nchw-normalized"``: the input is the resized image, not ``pixel_values``
    (:mod:`qvl_surgery.core.imagein`)."""
    image_size = check_processor_size(cfg, check_image_size(cfg, image_size))
    if image_input is not None:
        imagein.check_layout(image_input)
    lay = window_layout(cfg, image_size)
    S, C, H, D = lay.seq_len, cfg.hidden_size, cfg.num_heads, cfg.head_dim
    mu = cfg.merge_unit
    g = GraphBuilder()
    w = weight_getter(g, weights)

    eps = g.const("rms_eps", np.array(1e-6, np.float32))
    # Shared per-image constants: the grid tables of this one image, in numpy (grid.py, the same
    # computation the dynamic export runs in its graph).
    tables = grid_tables_numpy(cfg, np.array([[lay.grid_t, lay.grid_h, lay.grid_w]], np.int64))
    tiled = image_input is not None and imagein.windows_tile(cfg, image_size)
    reverse_index = None if tiled else g.const("window_reverse_index", tables["reverse_index"])
    cos = g.const("rotary_cos", tables["rotary_cos"])
    sin = g.const("rotary_sin", tables["rotary_sin"])
    window_blocks = [b for b in range(cfg.depth) if b not in cfg.fullatt_block_indexes]
    mask = None
    if window_blocks and lay.num_windows > 1:
        wid = g.const("window_id", lay.window_id.astype(np.int64))
        col = g.op("Unsqueeze", [wid, g.const("axes_1", np.array([1], np.int64))], "/window_mask/Unsqueeze_col")
        row = g.op("Unsqueeze", [wid, g.const("axes_0", np.array([0], np.int64))], "/window_mask/Unsqueeze_row")
        same = g.op("Equal", [col, row], "/window_mask/Equal")
        mask = g.op("Where", [same, g.const("mask_zero", np.array(0.0, np.float32)),
                              g.const("mask_min", np.array(np.finfo(np.float32).min, np.float32))],
                    "/window_mask/Where", outputs=["window_attention_mask"])

    if image_input is None:
        h = patch_embed(g, cfg, w, g.const("window_patch_order", tables["patch_order"]))
    else:
        h = imagein.image_patch_embed(g, cfg, weights, image_size, image_input,
                                      imagein.row_patch_order(cfg, image_size, tables["patch_order"]))
    block_outputs = [h]

    qkv_shape = g.const("qkv_shape", np.array([S, 3, H, D], np.int64))
    out_shape = g.const("attn_out_shape", np.array([S, C], np.int64))
    split3 = g.const("split_qkv", np.array([1, 1, 1], np.int64))
    half = g.const("split_half", np.array([D // 2, D // 2], np.int64))
    scale = g.const("attn_scale", np.array(math.sqrt(D), np.float32))

    def attend(qkv: str, p: str, b: int) -> str:
        qkv = g.op("Reshape", [qkv, qkv_shape], f"{p}/attn/Reshape")
        qkv = g.op("Transpose", [qkv], f"{p}/attn/Transpose", perm=[1, 2, 0, 3])      # [3, H, S, D]
        q, k, v = g.op("Split", [qkv, split3], f"{p}/attn/Split", outputs=3, axis=0)  # [1, H, S, D] each
        q, kt = rotate_qk(g, q, k, cos, sin, half, f"{p}/attn")
        o = attention(g, q, kt, v, scale, None if b in cfg.fullatt_block_indexes else mask, f"{p}/attn")
        o = g.op("Transpose", [o], f"{p}/attn/Transpose_out", perm=[0, 2, 1, 3])
        return g.op("Reshape", [o, out_shape], f"{p}/attn/Reshape_out")

    for b in range(cfg.depth):
        h = encoder_block(g, cfg, w, eps, h, b, attend)
        block_outputs.append(h)

    y = merger(g, cfg, w, eps, h, np.array([S // mu, C * mu], np.int64), reverse_index, OUTPUT_NAME)
    if tiled:
        imagein.merged_to_row_order(g, cfg, image_size, y, OUTPUT_NAME)

    graph = helper.make_graph(
        g.nodes, "qwen2_5_vl_vision_encoder",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [S, cfg.patch_dim]) if image_input is None
         else imagein.input_info(image_input, image_size)],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [S // mu, cfg.out_hidden_size])],
        initializer=g.initializers,
        value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT, [S, C]) for n in block_outputs],
    )
    return encoder_model(graph, g, cfg, weights, block_outputs, {
        "image_size": f"{image_size[0]}x{image_size[1]}",
        "grid": json.dumps([lay.grid_t, lay.grid_h, lay.grid_w]),
        "window_layout": json.dumps(lay.to_metadata()),
        **(imagein.input_metadata(image_input) if image_input else {}),
    })


def encoder_model(graph: onnx.GraphProto, g: GraphBuilder, cfg: VisionConfig, weights: WeightSource,
                  block_outputs: list[str], kind_meta: dict[str, str]) -> Model:
    """The Model of an export (static or dynamic): opset, IR version, producer, and the
    ``qvl_surgery.*`` metadata every pass reads, with the kind's own keys after the config."""
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qvl-surgery", producer_version=__version__)
    proto.ir_version = 8
    model = Model(proto, dict(g.sources))
    meta = {
        "version": __version__,
        "vision_config": json.dumps(cfg.to_dict()),
        **kind_meta,
        "fullatt_blocks": json.dumps(list(cfg.fullatt_block_indexes)),
        "block_outputs": json.dumps(block_outputs),
        "weights": weights.description,
        "dtype": "float32",
        "passes": json.dumps(["export"]),
    }
    for k, v in meta.items():
        model.set_metadata(META + k, v)
    return model


def export(weights: WeightSource, out: str | Path, image_size: tuple[int, int], *, progress: bool = True,
           check: bool = True, overwrite: bool = False, single_file: bool = False,
           image_input: str | None = None) -> ExportReport:
    """Build the graph and stream every weight into ``out.data`` (or into ``out`` itself with
    ``single_file``, for models under 2 GB); returns what was written. ``image_input``: as in
    :func:`build_encoder`."""
    out = Path(out)
    model = build_encoder(weights.cfg, weights, image_size, image_input=image_input)
    save_model(model, out, check=check, progress="export" if progress else None, overwrite=overwrite,
               single_file=single_file)
    lay_grid = json.loads(model.metadata()[META + "grid"])
    S = int(np.prod(lay_grid))
    return ExportReport(output=out, image_size=tuple(image_size), grid=tuple(lay_grid), seq_len=S,
                        tokens=S // weights.cfg.merge_unit,
                        parameters=sum(int(np.prod(s)) for s in weights.shapes.values()),
                        nodes=len(model.graph.node), weight_bytes=model.weight_bytes(), image_input=image_input,
                        gathers=sum(n.op_type == "Gather" for n in model.graph.node))
