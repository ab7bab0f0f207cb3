"""Host-side grid tensors for the dynamic export's host-inputs kind (numpy).

``host_inputs(cfg, grid_thw)`` returns every input of a ``--dynamic host`` model except
``pixel_values``: the same tensors the self-contained kind computes inside its graph from
``image_grid_thw`` (names, dtypes and shapes in :mod:`qvl_surgery.dynamic`). Per image it reuses
:func:`qvl_surgery.layout.window_layout` (checked against transformers' ``get_window_index`` and
``rot_pos_emb``), offsets it to the image's place in the batch, then lays the windows and frames
out in padded slots.

Recipe for a runtime without Python: for each row (t, h, w) of image_grid_thw, in order, with
lh = h/2, lw = w/2 merged tokens per side, 4x4-token windows (64 patches), and tokens counted
from the image's first token ``base``:

1. window order: frames in order; in each frame the windows row by row (window rows of 4 token
   rows, the last one shorter), inside a window its tokens row by row; ``window_index`` lists
   the input token of each window-order position, ``patch_order = window_index*4 + [0,1,2,3]``,
   ``reverse_index = argsort(window_index)``;
2. rotary: for the patch (row y, col x) of the image (y = 2*token_row + a, x = 2*token_col + b,
   (a, b) in (0,0), (0,1), (1,0), (1,1) order), angles ``[y*inv_freq, x*inv_freq]`` with
   ``inv_freq = 1 / 10000^(arange(0, d, 2)/d)``, d = head_dim/2; duplicated to head_dim, cos and
   sin, rows in window order;
3. window slots: window i with n tokens starting at window-order token s fills slots
   ``i*16 .. i*16+15`` with tokens ``s + min(e, n-1)`` (key mask 0 for e < n, else float32 min);
   frames likewise with L = the largest frame's token count instead of 16; every slot index and
   mask entry is repeated for the 4 patches of its token; the unpad indices invert the slots.
"""
from __future__ import annotations

import numpy as np

from .config import VisionConfig
from .dynamic import GRID_TENSORS, NEG, check_grid
from .layout import window_layout


def _slots(sizes: list[int], starts: list[int], width: int, mu: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded slots for segments (merged tokens): pad index, key mask [n, 1, 1, width*mu], unpad index."""
    n = len(sizes)
    e = np.arange(width)[None, :]
    sz = np.asarray(sizes, np.int64)[:, None]
    st = np.asarray(starts, np.int64)[:, None]
    pad = st + np.minimum(e, sz - 1)                                    # [n, width] merged tokens
    valid = e < sz
    total = int(sz.sum())
    unpad = np.empty(total, np.int64)
    for i, (s, k) in enumerate(zip(starts, sizes)):
        unpad[s:s + k] = i * width + np.arange(k)
    u = np.arange(mu)
    pad_p = (pad[..., None] * mu + u).reshape(-1)
    mask = np.where(np.repeat(valid, mu, axis=1), 0.0, NEG).astype(np.float32).reshape(n, 1, 1, width * mu)
    unpad_p = (unpad[:, None] * mu + u).reshape(-1)
    return pad_p, mask, unpad_p


def host_inputs(cfg: VisionConfig, grid_thw, pixel_values_rows: int | None = None) -> dict[str, np.ndarray]:
    """Every grid tensor of the host-inputs kind for ``grid_thw`` (int [N, 3] rows of t, h, w in patches).

    ``pixel_values_rows``, when given, is checked against the grid (:func:`check_grid`).
    """
    g = np.asarray(grid_thw)
    rows = int(np.prod(g, axis=1).sum()) if pixel_values_rows is None and g.ndim == 2 else pixel_values_rows
    g = check_grid(cfg, rows if rows is not None else -1, g)
    mu, ws2 = cfg.merge_unit, cfg.window_merged ** 2
    order, reverse, cos, sin = [], [], [], []
    win_sizes, win_starts, frm_sizes, frm_starts = [], [], [], []
    base = 0
    for t, gh, gw in g.tolist():
        lay = window_layout(cfg, (gh * cfg.patch_size, gw * cfg.patch_size), grid_t=t)
        order.append(lay.window_index + base)
        reverse.append(lay.reverse_index + base)
        cos.append(lay.cos)
        sin.append(lay.sin)
        cu = lay.cu_window_seqlens // mu
        win_starts += (cu[:-1] + base).tolist()
        win_sizes += np.diff(cu).tolist()
        per_frame = (gh // cfg.spatial_merge_size) * (gw // cfg.spatial_merge_size)
        frm_starts += [base + f * per_frame for f in range(t)]
        frm_sizes += [per_frame] * t
        base += t * per_frame
    window_index = np.concatenate(order)
    out = {
        "patch_order": (window_index[:, None] * mu + np.arange(mu)).reshape(-1),
        "reverse_index": np.concatenate(reverse),
        "rotary_cos": np.concatenate(cos),
        "rotary_sin": np.concatenate(sin),
    }
    out["window_pad_index"], out["window_key_mask"], out["window_unpad_index"] = _slots(win_sizes, win_starts, ws2, mu)
    out["frame_pad_index"], out["frame_key_mask"], out["frame_unpad_index"] = _slots(
        frm_sizes, frm_starts, max(frm_sizes), mu)
    assert tuple(out) == GRID_TENSORS
    return out
