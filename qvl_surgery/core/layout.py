"""Window order, its inverse and window ids for one image of a fixed size (the windowed
attention's layout metadata; the tables the export bakes in come from grid.py).

Computed in numpy outside any traced graph; the tests check them against transformers' own
``get_window_index``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qvl_surgery.core.config import VisionConfig


@dataclass(frozen=True)
class WindowLayout:
    grid_t: int
    grid_h: int            # patches
    grid_w: int
    window_index: np.ndarray      # [S/4] merged-token order used inside the blocks
    reverse_index: np.ndarray     # argsort(window_index)
    cu_window_seqlens: np.ndarray  # patch boundaries of the windows (unique, starts at 0)
    window_id: np.ndarray         # [S] window of each patch, in window order

    @property
    def seq_len(self) -> int:
        return self.grid_t * self.grid_h * self.grid_w

    @property
    def num_windows(self) -> int:
        return len(self.cu_window_seqlens) - 1

    @property
    def window_sizes(self) -> list[int]:
        return np.diff(self.cu_window_seqlens).tolist()

    @property
    def uniform(self) -> bool:
        return len(set(self.window_sizes)) == 1

    def to_metadata(self) -> dict:
        sizes = self.window_sizes
        return {"grid": [self.grid_t, self.grid_h, self.grid_w], "num_windows": self.num_windows,
                "window_sizes": sizes, "uniform": self.uniform,
                "cu_window_seqlens": self.cu_window_seqlens.tolist()}


def window_layout(cfg: VisionConfig, image_size: tuple[int, int], grid_t: int = 1) -> WindowLayout:
    h_px, w_px = image_size
    gh, gw = h_px // cfg.patch_size, w_px // cfg.patch_size
    m = cfg.spatial_merge_size
    lh, lw = gh // m, gw // m
    ws = cfg.window_merged
    # Same rule as transformers: pad to whole windows (a full extra window when it divides evenly,
    # which then has length 0 and disappears).
    pad_h, pad_w = ws - lh % ws, ws - lw % ws
    nwh, nww = (lh + pad_h) // ws, (lw + pad_w) // ws
    index = np.full((grid_t, lh + pad_h, lw + pad_w), -1, dtype=np.int64)
    index[:, :lh, :lw] = np.arange(grid_t * lh * lw).reshape(grid_t, lh, lw)
    windows = index.reshape(grid_t, nwh, ws, nww, ws).transpose(0, 1, 3, 2, 4).reshape(grid_t * nwh * nww, ws * ws)
    counts = (windows >= 0).sum(axis=1)
    flat = windows.reshape(-1)
    window_index = flat[flat >= 0]
    counts = counts[counts > 0] * cfg.merge_unit
    cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    window_id = np.repeat(np.arange(len(counts), dtype=np.int64), counts)

    return WindowLayout(grid_t=grid_t, grid_h=gh, grid_w=gw, window_index=window_index,
                        reverse_index=np.argsort(window_index, kind="stable"), cu_window_seqlens=cu,
                        window_id=window_id)
