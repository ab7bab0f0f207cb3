"""The grid tables: everything the encoder needs from ``image_grid_thw``, in numpy and as ONNX nodes.

One computation, :func:`_grid_tables`, written once against a small array vocabulary and run by
two backends, so the two forms cannot drift apart:

- :class:`NumpyArrays` gives numpy arrays: the inputs of the dynamic export's host-inputs kind
  (:func:`qvl_surgery.core.hostinputs.host_inputs`) and the static export's baked constants;
- :class:`GraphArrays` gives ONNX nodes (plain opset-17 integer ops: no Loop, no If, no sort, no
  custom op): the self-contained dynamic export computes the tables in its graph.

Arithmetic is written with Python operators (``+ - * // <`` and ``divmod``: numpy's own, or
one node each); everything else is a backend method named for what it does. Every value is non-negative, so
``//`` (numpy floors) and ONNX ``Div`` (truncates) agree.

The tables (``GRID_TENSORS``; S = num_patches, M = S/4 merged tokens, W windows, F frames =
sum of t, L = the largest frame in patches, 64 = patches per window):

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

Window order is transformers' ``get_window_index``: images in order, then frames, then windows of
4x4 merged tokens row by row (the last window row and column shorter where the side is not a
multiple of 4), tokens row by row inside a window. It keeps every image and every frame at the
offset it has in the input, so both directions of the permutation are closed-form per token.
With a token at row r, col c of its frame (``cols`` merged tokens wide), its window row/col
``wr = r // 4, wc = c // 4``, the height ``hh`` of its window row and the width ``ww`` of its
window (4, or less at the bottom/right edge):

    window-order position = frame_first + wr*4*cols + wc*4*hh + (r % 4)*ww + (c % 4)

and the inverse divides the other way. The image of a token (or window, or frame) is found by
comparing its index with the cumulative ends of the images (:meth:`segment_of`), so nothing is
sorted and nothing is S x S.

Rotary angles are transformers' ``rot_pos_emb``: the patch at (row y, col x) of its frame gets
``[y * inv_freq, x * inv_freq]`` (:func:`rotary_inv_freq`), duplicated to head_dim.

Slots: window i with n tokens starting at window-order token s fills slots ``i*16 .. i*16+15``
with tokens ``s + min(e, n-1)`` (key mask 0 for e < n, float32 min after); frames likewise with
L slots each. Every slot index and mask entry is repeated for the 4 patches of its token; the
unpad indices send every window-order row back from its slot.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from qvl_surgery.core.config import VisionConfig

NEG = float(np.finfo(np.float32).min)
# name -> (dtype, shape with symbolic dims); head_dim and the window's patches filled in by table_shapes()
_TABLES = {
    "patch_order": (TensorProto.INT64, ["num_patches"]),
    "reverse_index": (TensorProto.INT64, ["num_tokens"]),
    "rotary_cos": (TensorProto.FLOAT, ["num_patches", "head_dim"]),
    "rotary_sin": (TensorProto.FLOAT, ["num_patches", "head_dim"]),
    "window_pad_index": (TensorProto.INT64, ["window_slots"]),
    "window_key_mask": (TensorProto.FLOAT, ["num_windows", 1, 1, "window_patches"]),
    "window_unpad_index": (TensorProto.INT64, ["num_patches"]),
    "frame_pad_index": (TensorProto.INT64, ["frame_slots"]),
    "frame_key_mask": (TensorProto.FLOAT, ["num_frames", 1, 1, "frame_len"]),
    "frame_unpad_index": (TensorProto.INT64, ["num_patches"]),
}
GRID_TENSORS = tuple(_TABLES)


def window_slot(cfg: VisionConfig) -> int:
    """Patches per padded window: window_merged^2 merged tokens of merge_unit patches (64)."""
    return cfg.window_merged ** 2 * cfg.merge_unit


def table_shapes(cfg: VisionConfig) -> dict[str, tuple[int, list]]:
    """Dtype and (symbolic) shape of every grid table, as graph inputs of the host-inputs kind."""
    fixed = {"head_dim": cfg.head_dim, "window_patches": window_slot(cfg)}
    return {name: (dtype, [fixed.get(d, d) for d in shape]) for name, (dtype, shape) in _TABLES.items()}


def rotary_inv_freq(cfg: VisionConfig) -> np.ndarray:
    """transformers' ``VisionRotaryEmbedding.inv_freq``: ``1 / 10000^(arange(0, d, 2) / d)``,
    d = head_dim / 2 (float32): rows and columns each take half of the rotary dims."""
    dim = cfg.head_dim // 2
    return (1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)


def _grid_tables(x, grid, cfg: VisionConfig) -> dict:
    """Every grid table of ``grid`` (``[N, 3]`` rows of t, h, w in patches) with backend ``x``."""
    m, ws, mu = cfg.spatial_merge_size, cfg.window_merged, cfg.merge_unit
    window_tokens = ws * ws

    def edge(side, i):
        """Tokens of window ``i`` along a side of ``side`` tokens: ws, less for the last one."""
        return x.minimum(side - i * ws, ws)

    def per_patch(token):
        """Merged-token indices -> the indices of their merge_unit patches, flattened."""
        return x.flat(x.col(token * mu) + x.ints(np.arange(mu)))

    def padded(first, size, slot, width):
        """Pad index and key mask of segments of ``size`` tokens from ``first``, at ``slot`` of ``width``."""
        pad_index = per_patch(first + x.minimum(slot, size - 1))
        mask = x.where(slot < size, 0.0, NEG)
        return pad_index, x.reshape(x.repeat_per_patch(mask), [-1, 1, 1, width * mu])

    def of_image(image):
        """A per-image table -> its entry for each index whose image is ``image`` (taken once a table)."""
        taken = {}

        def its(table):
            if id(table) not in taken:
                taken[id(table)] = x.take(table, image)
            return taken[id(table)]
        return its

    def spans(sizes):
        """First index and end of consecutive segments of ``sizes``."""
        end = x.cumsum(sizes)
        return end - sizes, end

    # --- per image: one entry per row of the grid; images, their windows and their frames each
    # numbered through the whole grid
    frames = x.column(grid, 0)
    rows, cols = x.column(grid, 1) // m, x.column(grid, 2) // m      # merged tokens per side
    frame_tokens = rows * cols
    image_tokens = frames * frame_tokens
    window_rows, window_cols = (rows + (ws - 1)) // ws, (cols + (ws - 1)) // ws
    frame_windows = window_rows * window_cols
    image_windows = frames * frame_windows
    image_start, image_end = spans(image_tokens)
    window_start, window_end = spans(image_windows)
    frame_start, frame_end = spans(frames)
    frame_len = x.largest(frame_tokens)

    # --- per merged token p: its input position and its window-order position alike (window
    # order keeps images and frames where they are); ``its(table)``: the entry of p's image
    p = x.arange(x.total(image_tokens))
    its = of_image(x.segment_of(p, image_end))
    frame, q = divmod(p - its(image_start), its(frame_tokens))       # frame in the image, position in it
    frame_first = p - q

    # input order -> window order: token p at (r, c) of its frame, in window (wr, wc) at (ir, ic)
    r, c = divmod(q, its(cols))
    (wr, ir), (wc, ic) = divmod(r, ws), divmod(c, ws)
    hh, ww = edge(its(rows), wr), edge(its(cols), wc)
    reverse_index = frame_first + wr * ws * its(cols) + wc * ws * hh + ir * ww + ic

    # window order -> input order: position p is in band wr of window rows (ws*cols tokens, the
    # last band fewer), in window wc of the band (hh*ws tokens, the last window fewer), at in_window
    wr, in_band = divmod(q, its(cols) * ws)
    hh = edge(its(rows), wr)
    wc, in_window = divmod(in_band, hh * ws)
    ww = edge(its(cols), wc)
    ir, ic = divmod(in_window, ww)
    token_row, token_col = wr * ws + ir, wc * ws + ic
    window_index = frame_first + token_row * its(cols) + token_col
    window_id = its(window_start) + frame * its(frame_windows) + wr * its(window_cols) + wc
    frame_id = its(frame_start) + frame

    # rotary: patch (a, b) of the merge unit of token (token_row, token_col) is at
    # (token_row*m + a, token_col*m + b); (a, b) in row-major order
    inv_freq = x.floats(rotary_inv_freq(cfg), "rotary_inv_freq")

    def angles(token_pos, offsets):
        position = x.col(token_pos * m) + x.ints(offsets)                              # [M, mu]
        return x.col(x.to_float(position)) * inv_freq                                   # [M, mu, D/4]

    rot = x.concat([angles(token_row, np.repeat(np.arange(m), m)),
                    angles(token_col, np.tile(np.arange(m), m))], axis=-1)               # [M, mu, D/2]
    rot = x.reshape(rot, [-1, cfg.head_dim // 2])
    emb = x.concat([rot, rot], axis=-1)

    # window slots: window_tokens slots for every window of every frame; ``its``: the window's image
    window, slot = divmod(x.arange(x.total(image_windows) * window_tokens), window_tokens)
    its = of_image(x.segment_of(window, window_end))
    frame, in_frame = divmod(window - its(window_start), its(frame_windows))
    wr, wc = divmod(in_frame, its(window_cols))
    hh, ww = edge(its(rows), wr), edge(its(cols), wc)
    first = its(image_start) + frame * its(frame_tokens) + wr * ws * its(cols) + wc * ws * hh
    window_pad_index, window_key_mask = padded(first, hh * ww, slot, window_tokens)

    # frame slots: frame_len slots for every frame of every image; ``its``: the frame's image
    frame, slot = divmod(x.arange(x.total(frames) * frame_len), frame_len)
    its = of_image(x.segment_of(frame, frame_end))
    first = its(image_start) + (frame - its(frame_start)) * its(frame_tokens)
    frame_pad_index, frame_key_mask = padded(first, its(frame_tokens), slot, frame_len)

    return {
        "patch_order": per_patch(window_index),
        "reverse_index": reverse_index,
        "rotary_cos": x.cos(emb),
        "rotary_sin": x.sin(emb),
        "window_pad_index": window_pad_index,
        "window_key_mask": window_key_mask,
        "window_unpad_index": per_patch(window_id * window_tokens + in_window),
        "frame_pad_index": frame_pad_index,
        "frame_key_mask": frame_key_mask,
        "frame_unpad_index": per_patch(frame_id * frame_len + q),
    }


class NumpyArrays:
    """The array vocabulary of :func:`_grid_tables` in numpy (int64 indices, float32 tables)."""

    cumsum = staticmethod(np.cumsum)
    total = staticmethod(np.sum)
    largest = staticmethod(np.max)
    minimum = staticmethod(np.minimum)
    cos = staticmethod(np.cos)
    sin = staticmethod(np.sin)

    def __init__(self, cfg: VisionConfig):
        self.mu = cfg.merge_unit

    def column(self, grid, i):
        return grid[:, i]

    def arange(self, n):
        return np.arange(n, dtype=np.int64)

    def take(self, table, index):
        return table[index]

    def segment_of(self, index, ends):
        """Segment of each index given the segments' cumulative ends (the graph form counts the
        ends at or below each index: the same number)."""
        return np.searchsorted(ends, index, side="right")

    def col(self, a):
        return a[..., None]

    def flat(self, a):
        return a.reshape(-1)

    def reshape(self, a, shape):
        return a.reshape([int(d) for d in shape])

    def ints(self, values):
        return np.asarray(values, np.int64)

    def floats(self, values, name: str):
        return np.asarray(values, np.float32)

    def to_float(self, a):
        return a.astype(np.float32)

    def concat(self, parts, axis: int):
        return np.concatenate(parts, axis=axis)

    def where(self, cond, yes: float, no: float):
        return np.where(cond, np.float32(yes), np.float32(no))

    def repeat_per_patch(self, a):
        return np.repeat(a, self.mu)


def grid_tables_numpy(cfg: VisionConfig, grid: np.ndarray) -> dict[str, np.ndarray]:
    """Every grid table as numpy arrays for ``grid`` (int64 ``[N, 3]``, already checked)."""
    return _grid_tables(NumpyArrays(cfg), np.asarray(grid, np.int64), cfg)


class GraphValue:
    """A tensor of a :class:`GraphArrays` graph: Python's operators add one node each."""

    def __init__(self, x: "GraphArrays", name: str):
        self.x, self.name = x, name

    def _bin(self, op: str, a, b) -> "GraphValue":
        return self.x.node(op, a, b)

    def __add__(self, o): return self._bin("Add", self, o)
    def __radd__(self, o): return self._bin("Add", o, self)
    def __sub__(self, o): return self._bin("Sub", self, o)
    def __rsub__(self, o): return self._bin("Sub", o, self)
    def __mul__(self, o): return self._bin("Mul", self, o)
    def __rmul__(self, o): return self._bin("Mul", o, self)
    def __floordiv__(self, o): return self._bin("Div", self, o)
    def __divmod__(self, o):
        quotient = self // o
        return quotient, self - quotient * o
    def __lt__(self, o): return self._bin("Less", self, o)


class GraphArrays:
    """The array vocabulary of :func:`_grid_tables` as ONNX nodes named ``{prefix}/{Op}_{n}`` in a
    :class:`qvl_surgery.core.export.GraphBuilder`; Python ints and int lists become int64 constants."""

    def __init__(self, g, cfg: VisionConfig, prefix: str = "/grid"):
        self.g, self.mu, self.prefix, self.n = g, cfg.merge_unit, prefix, 0
        self.first_node = len(g.nodes)

    def tensor(self, name: str) -> GraphValue:
        """An existing tensor of the graph, by name."""
        return GraphValue(self, name)

    def name_of(self, v) -> str:
        if isinstance(v, GraphValue):
            return v.name
        if isinstance(v, (int, np.integer, list, tuple, np.ndarray)):
            return self.ints(v).name
        raise TypeError(f"not a grid-table operand: {v!r}")

    def node(self, op: str, *inputs, **attrs) -> GraphValue:
        self.n += 1
        return GraphValue(self, self.g.op(op, [self.name_of(i) for i in inputs], f"{self.prefix}/{op}_{self.n}", **attrs))

    def ints(self, values) -> GraphValue:
        a = np.asarray(values, np.int64)
        text = "_".join(str(int(v)).replace("-", "m") for v in a.reshape(-1))
        return GraphValue(self, self.g.const(f"i64{'' if a.ndim == 0 else 'v'}_{text}", a))

    def floats(self, values, name: str) -> GraphValue:
        return GraphValue(self, self.g.const(name, np.asarray(values, np.float32)))

    def column(self, grid, i):
        return self.node("Gather", grid, i, axis=1)

    def cumsum(self, a):
        return self.node("CumSum", a, 0)

    def total(self, a):
        return self.node("ReduceSum", a, keepdims=0)

    def largest(self, a):
        return self.node("ReduceMax", a, keepdims=0)

    def minimum(self, a, b):
        return self.node("Min", a, b)

    def arange(self, n):
        return self.node("Range", 0, n, 1)

    def take(self, table, index):
        return self.node("Gather", table, index, axis=0)

    def segment_of(self, index, ends):
        """Count of segment ends at or below each index (``[n, N]`` booleans, summed)."""
        at_or_past = self.node("GreaterOrEqual", self.col(index), self.node("Unsqueeze", ends, [0]))
        return self.node("ReduceSum", self.node("Cast", at_or_past, to=TensorProto.INT64), [1], keepdims=0)

    def col(self, a):
        return self.node("Unsqueeze", a, [-1])

    def flat(self, a):
        return self.node("Reshape", a, [-1])

    def reshape(self, a, shape):
        if all(isinstance(d, int) for d in shape):
            return self.node("Reshape", a, list(shape))
        dims = [self.node("Unsqueeze", d, [0]) if isinstance(d, GraphValue) else [d] for d in shape]
        return self.node("Reshape", a, self.node("Concat", *dims, axis=0))

    def to_float(self, a):
        return self.node("Cast", a, to=TensorProto.FLOAT)

    def concat(self, parts, axis):
        return self.node("Concat", *parts, axis=axis)

    def where(self, cond, yes: float, no: float):
        return self.node("Where", cond, self.floats(yes, "mask_zero"), self.floats(no, "mask_min"))

    def repeat_per_patch(self, a):
        return self.flat(self.node("Expand", self.col(a), [1, self.mu]))

    def cos(self, a):
        return self.node("Cos", a)

    def sin(self, a):
        return self.node("Sin", a)

    def rename(self, tables: dict[str, GraphValue]) -> dict[str, str]:
        """Give each table's tensor the table's name (in the nodes made here); returns the names."""
        renamed = {v.name: name for name, v in tables.items()}
        for n in self.g.nodes[self.first_node:]:
            n.output[:] = [renamed.get(o, o) for o in n.output]
            n.input[:] = [renamed.get(i, i) for i in n.input]
        return {name: name for name in tables}


def grid_tables_graph(g, cfg: VisionConfig, grid: str) -> dict[str, str]:
    """Nodes in ``g`` computing every grid table from the int64 ``[N, 3]`` tensor ``grid``;
    returns table name -> tensor name (the table's own name)."""
    x = GraphArrays(g, cfg)
    return x.rename(_grid_tables(x, x.tensor(grid), cfg))
