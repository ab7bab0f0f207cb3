"""How close two outputs are: the one place each measure is computed (compare, quantize's budget,
sensitivity, bench, compat and toolchains-proof read them from here).

The token-centered cosine (each output row minus the mean row) sits beside the plain one because a
large constant component (massive activations act as biases in trained ViTs) keeps the plain
cosine near 1 while the content is gone.
"""
from __future__ import annotations

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Plain cosine of the flattened arrays in float64; NaN where a norm is 0 or not finite."""
    a, b = np.asarray(a).astype(np.float64).ravel(), np.asarray(b).astype(np.float64).ravel()
    with np.errstate(invalid="ignore", over="ignore"):
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        return float(a @ b / denom) if denom > 0 and np.isfinite(denom) else float("nan")


def centered_cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    """Cosine of the token-centered outputs: each row (token) minus the mean row. 1-D outputs are
    centered as one row (that is, not at all)."""
    def centered(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x).astype(np.float64)
        x = x.reshape(-1, x.shape[-1]) if x.ndim >= 2 else x.reshape(1, -1)
        return x - x.mean(axis=0, keepdims=True) if x.shape[0] > 1 else x
    return cosine(centered(ref), centered(cand))


def max_abs(ref: np.ndarray, cand: np.ndarray) -> float:
    return float(np.abs(np.asarray(cand, np.float64) - np.asarray(ref, np.float64)).max())


def relative_l2(ref: np.ndarray, cand: np.ndarray) -> float:
    """|cand - ref| / |ref| over the flattened arrays."""
    r, c = np.asarray(ref, np.float64).ravel(), np.asarray(cand, np.float64).ravel()
    return float(np.linalg.norm(c - r) / max(np.linalg.norm(r), 1e-300))


def relative_max_abs(ref: np.ndarray, cand: np.ndarray) -> float:
    """max |cand - ref| relative to max |ref| (exactness of a rewrite)."""
    return max_abs(ref, cand) / max(float(np.abs(np.asarray(ref, np.float64)).max()), 1e-30)
