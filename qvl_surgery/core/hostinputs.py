"""Host-side grid tables for the dynamic export's host-inputs kind (numpy).

``host_inputs(cfg, grid_thw)`` returns every input of a ``--dynamic host`` model except
``pixel_values``: the same tables the self-contained kind computes inside its graph from
``image_grid_thw``, by the same code (:mod:`qvl_surgery.core.grid`: one computation, a numpy and a
graph backend; the module docstring lists each table's name, dtype, shape and meaning).

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

from qvl_surgery.core.config import VisionConfig
from qvl_surgery.core.dynamic import check_grid
from qvl_surgery.core.grid import grid_tables_numpy


def host_inputs(cfg: VisionConfig, grid_thw, pixel_values_rows: int | None = None) -> dict[str, np.ndarray]:
    """Every grid table of the host-inputs kind for ``grid_thw`` (int [N, 3] rows of t, h, w in patches).

    ``pixel_values_rows``, when given, is checked against the grid (:func:`check_grid`).
    """
    g = np.asarray(grid_thw)
    rows = int(np.prod(g, axis=1).sum()) if pixel_values_rows is None and g.ndim == 2 else pixel_values_rows
    return grid_tables_numpy(cfg, check_grid(cfg, rows if rows is not None else -1, g))
