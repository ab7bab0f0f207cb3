"""Image in: a static export whose input is the resized image itself, as NPU toolchains take it.

transformers' processor turns a resized uint8 image into ``pixel_values [S, 1176]``: rescale by
1/255, normalize per channel with mean/std, repeat the frame (temporal patch 2), cut 14x14
patches in 2x2 merge groups. All of it is linear or a reorder, so an image-in export computes it
inside the graph, exactly, with nothing new to approximate:

- rescale and mean/std are **folded into the patch-embed weights**: the first tensor is the image
  as the host has it (uint8 NHWC, or float NCHW in 0..255), so 8-bit input quantization is lossless
  and a toolchain's config says mean 0, std 1. ``nchw-normalized`` leaves them to the toolchain's
  input stage instead (mean 255 x IMAGE_MEAN, std 255 x IMAGE_STD): rknn-toolkit2's fp16 build
  computes that form more precisely (9.8e-4 of the output's max against 1.45e-3 folded, tiny 448x448,
  rk3588 simulator: the folded weights' 1/(255 std) on 0..255 inputs cost fp16 bits);
- the two identical frames are **folded**: the Conv3d over two equal frames is one Conv2d (kernel
  and stride 14) whose kernel is the two temporal slices summed;
- the window order is a **Reshape/Transpose** of the Conv's feature map (channels moved last first:
  rknn-toolkit2 2.5.0 computes a reorder that moves the channel axis wrongly, without an error),
  and the merged tokens go back to row-major order the same way, where the windows tile the grid: both sides a multiple of
  ``window_size`` (112 px for Qwen2.5-VL). Elsewhere the last window row and column are partial, so
  window order interleaves whole and partial windows, which no reshape expresses: there a Gather of
  a constant index does the reorder (as the ``pixel_values`` export does on both sides). Ranks stay
  at 6 or below.

The host side is here too: :func:`smart_resize` (the processor's size rule for a pixel budget),
:func:`resize_image` (PIL bicubic on uint8, as the processor resizes) and :func:`image_feed`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from qvl_surgery.core.config import VisionConfig
from qvl_surgery.core.errors import BadInput

IMAGE_NAME = "image"
# uint8 [1, H, W, 3] as PIL/numpy give it; float [1, 3, H, W] in 0..255; float [1, 3, H, W] normalized by
# the toolchain's own input stage (mean 255 * IMAGE_MEAN, std 255 * IMAGE_STD), the Conv left unfolded
LAYOUTS = ("nhwc", "nchw", "nchw-normalized")
# transformers' Qwen2VLImageProcessor defaults (OpenAI CLIP), as the released checkpoints configure it
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE = 1 / 255
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280


INPUT_KEY = "input"            # qvl_surgery.input = "image-<layout>" on an image-in export


def input_metadata(layout: str) -> dict[str, str]:
    """The export's metadata entry (without the ``qvl_surgery.`` prefix) naming its image input."""
    return {INPUT_KEY: f"image-{layout}"}


def layout_of(metadata: dict[str, str]) -> str | None:
    """An image-in export's layout from its metadata; None for a pixel_values model."""
    form = metadata.get("qvl_surgery." + INPUT_KEY, "")
    return form.removeprefix("image-") if form.startswith("image-") else None


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise BadInput("{image_layout}: choose nhwc (uint8 [1, H, W, 3]), nchw (float [1, 3, H, W], 0..255) or "
                       "nchw-normalized (float [1, 3, H, W], normalized by the toolchain)", image_layout=layout)
    return layout


def input_info(layout: str, size: tuple[int, int]):
    h, w = size
    if layout == "nhwc":
        return helper.make_tensor_value_info(IMAGE_NAME, TensorProto.UINT8, [1, h, w, 3])
    return helper.make_tensor_value_info(IMAGE_NAME, TensorProto.FLOAT, [1, 3, h, w])


def windows_tile(cfg: VisionConfig, size: tuple[int, int]) -> bool:
    """Whether the attention windows tile the image's patch grid (no partial window)."""
    unit = cfg.patch_size * cfg.spatial_merge_size * cfg.window_merged
    return size[0] % unit == 0 and size[1] % unit == 0


def folded_patch_embed(weight: np.ndarray, cfg: VisionConfig, mean=IMAGE_MEAN, std=IMAGE_STD, *,
                       normalized: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The patch embedding's Conv3d weight ``[hidden, 3, T, 14, 14]`` (any view of it) as a Conv2d
    weight ``[hidden, 3, 14, 14]`` and bias ``[hidden]`` on the 0..255 image: the T frames summed,
    rescale and normalization folded in (computed in float64). ``normalized``: for an input the
    toolchain has normalized already, the frames summed only (bias zero)."""
    p, t = cfg.patch_size, cfg.temporal_patch_size
    w = np.asarray(weight, np.float64).reshape(-1, 3, t, p, p).sum(axis=2)       # [hidden, 3, p, p]
    if normalized:
        return w.astype(np.float32), np.zeros(len(w), np.float32)
    inv = 1.0 / np.asarray(std, np.float64)
    kernel = w * (RESCALE * inv)[None, :, None, None]
    bias = -(w * (np.asarray(mean, np.float64) * inv)[None, :, None, None]).sum(axis=(1, 2, 3))
    return kernel.astype(np.float32), bias.astype(np.float32)


def image_patch_embed(g, cfg: VisionConfig, weights, size: tuple[int, int], layout: str,
                      patch_order: np.ndarray) -> str:
    """Image -> ``patch_embed.output [S, hidden]`` in window order. ``patch_order``: for each token
    in window order, its patch in the processor's row order (used only where the windows do not
    tile)."""
    hidden, p, m, ws = cfg.hidden_size, cfg.patch_size, cfg.spatial_merge_size, cfg.window_merged
    gh, gw = size[0] // p, size[1] // p
    x = IMAGE_NAME
    if layout == "nhwc":
        x = g.op("Transpose", [x], "/image/Transpose", perm=[0, 3, 1, 2])
        x = g.op("Cast", [x], "/image/Cast", to=TensorProto.FLOAT)

    def folded(which: int):
        return lambda: folded_patch_embed(weights.array("patch_embed.proj.weight"), cfg,
                                          normalized=layout == "nchw-normalized")[which]
    kernel = g.weight("patch_embed.proj.image_kernel", (hidden, 3, p, p), folded(0))
    bias = g.weight("patch_embed.proj.image_bias", (hidden,), folded(1))
    f = g.op("Conv", [x, kernel, bias], "/patch_embed/proj/Conv", kernel_shape=[p, p], strides=[p, p])
    if windows_tile(cfg, size):
        # channels last from the start: rknn-toolkit2 2.5.0 fuses a window reorder that moves the
        # channel axis (its exWindow) and then mixes windows and channels without an error
        side = m * ws                                             # patches per window side
        nwh, nww = gh // side, gw // side
        f = g.op("Transpose", [f], "/patch_embed/Transpose_channels_last", perm=[0, 2, 3, 1])   # [1, gh, gw, C]
        f = g.op("Reshape", [f, g.const("image_window_rows", np.array([nwh, side, nww, side * hidden], np.int64))],
                 "/patch_embed/Reshape_window_rows")
        f = g.op("Transpose", [f], "/patch_embed/Transpose_windows", perm=[0, 2, 1, 3])   # [nwh, nww, s, s*C]
        f = g.op("Reshape", [f, g.const("image_merge_groups", np.array([nwh * nww, ws, m, ws, m, hidden], np.int64))],
                 "/patch_embed/Reshape_groups")
        f = g.op("Transpose", [f], "/patch_embed/Transpose_groups", perm=[0, 1, 3, 2, 4, 5])   # [B, wr, wc, pr, pc, C]
        return g.op("Reshape", [f, g.const("image_tokens", np.array([gh * gw, hidden], np.int64))],
                    "/patch_embed/Reshape_tokens", outputs=["patch_embed.output"])
    # partial windows: the feature map as processor-ordered rows, then the constant window order
    f = g.op("Reshape", [f, g.const("image_rows", np.array([hidden, gh * gw], np.int64))], "/patch_embed/Reshape_rows")
    f = g.op("Transpose", [f], "/patch_embed/Transpose_rows", perm=[1, 0])
    order = g.const("image_window_order", np.asarray(patch_order, np.int64))
    return g.op("Gather", [f, order], "/patch_embed/Gather", axis=0, outputs=["patch_embed.output"])


def merged_to_row_order(g, cfg: VisionConfig, size: tuple[int, int], y: str, output: str) -> str:
    """The merger's output (merged tokens in window order) in row-major order, by Reshape/Transpose
    (only where the windows tile)."""
    ws = cfg.window_merged
    unit = cfg.patch_size * cfg.spatial_merge_size
    lh, lw = size[0] // unit, size[1] // unit
    d = cfg.out_hidden_size
    y = g.op("Reshape", [y, g.const("merged_windows", np.array([lh // ws, lw // ws, ws, ws, d], np.int64))],
             "/merger/Reshape_windows")
    y = g.op("Transpose", [y], "/merger/Transpose_rows", perm=[0, 2, 1, 3, 4])
    return g.op("Reshape", [y, g.const("merged_rows", np.array([lh * lw, d], np.int64))], "/merger/Reshape_rows",
                outputs=[output])


def row_patch_order(cfg: VisionConfig, size: tuple[int, int], processor_order: np.ndarray) -> np.ndarray:
    """For each token in window order, its patch's index in the conv feature map's row-major order.
    ``processor_order``: the same tokens' rows of ``pixel_values`` (the static export's table)."""
    p, m = cfg.patch_size, cfg.spatial_merge_size
    gw = size[1] // p
    # pixel_values row k holds patch (2*bh + i, 2*bw + j) for k = ((bh * gw/2 + bw) * 2 + i) * 2 + j
    k = np.asarray(processor_order, np.int64)
    j, k = k % m, k // m
    i, k = k % m, k // m
    bw, bh = k % (gw // m), k // (gw // m)
    return (bh * m + i) * gw + bw * m + j


# ------------------------------------------------------------------------------ host side

def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The size transformers' Qwen2-VL processor resizes a ``height`` x ``width`` image to: each side
    rounded to a multiple of ``factor``, then scaled (aspect kept) into ``[min_pixels, max_pixels]``."""
    if min(height, width) < factor:
        raise BadInput(f"image {height}x{width}: both sides must be at least {factor} pixels")
    if max(height, width) / min(height, width) > 200:
        raise BadInput(f"image {height}x{width}: aspect ratio above 200, which the processor refuses")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def resize_image(image, size: tuple[int, int]) -> np.ndarray:
    """An image (a path, a PIL image or a uint8 ``[H, W, 3]`` array) resized to ``size`` (height,
    width) with PIL's bicubic filter on uint8, as the processor resizes: ``uint8 [H, W, 3]``."""
    from PIL import Image
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, np.uint8))
    image = image.convert("RGB")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    return np.asarray(image, np.uint8)


def toolchain_mean_std(layout: str) -> tuple[list[float], list[float]]:
    """The mean and std a toolchain's input stage applies to the 0..255 image for this layout (rknn's
    ``mean_values`` / ``std_values``, pulsar2's calibration mean / std)."""
    if layout == "nchw-normalized":
        return [round(255 * m, 6) for m in IMAGE_MEAN], [round(255 * s, 6) for s in IMAGE_STD]
    return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


def image_feed(pixels: np.ndarray, layout: str) -> np.ndarray:
    """A resized ``uint8 [H, W, 3]`` image as an image-in model's input: uint8 ``[1, H, W, 3]``
    (nhwc), float32 ``[1, 3, H, W]`` in 0..255 (nchw), or normalized as the processor does
    (nchw-normalized: what the toolchain's input stage hands the graph)."""
    pixels = np.asarray(pixels, np.uint8)
    if layout == "nhwc":
        return pixels[None]
    if layout == "nchw-normalized":
        x = (pixels.astype(np.float32) * np.float32(RESCALE) - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(
            IMAGE_STD, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None].astype(np.float32))
