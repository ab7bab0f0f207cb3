"""Plots the toolkit writes (matplotlib, when installed: it is not needed for anything else)."""
from __future__ import annotations

from pathlib import Path


def plot_sensitivity(results: list[dict], path: Path) -> bool:
    """One line per model: the error (1 - token-centered cosine) that quantizing each group of linears
    alone adds, groups in graph order, log scale; each model's all-quantized error in the legend.
    False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * max(len(r["groups"]) for r in results) + 2), 4.2))
    order: list[str] = []
    for r in results:
        order += [g["group"] for g in r["groups"] if g["group"] not in order]
    for r in results:
        err = {g["group"]: max(g["alone_error"], 1e-9) for g in r["groups"]}
        xs = [i for i, g in enumerate(order) if g in err]
        ax.plot(xs, [err[order[i]] for i in xs], marker="o", ms=3,
                label=f"{r['label']} (all quantized: {1 - r['all_quantized_centered_cosine']:.1e})")
    ax.set_yscale("log")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([g.replace("blocks.", "") for g in order], rotation=90, fontsize=7)
    ax.set_xlabel("block (patch_embed, blocks 0..N, merger)")
    ax.set_ylabel("1 - centered cosine, this group alone quantized")
    ax.set_title(f"quantization sensitivity per block: {results[0]['scheme']} ({results[0]['format']})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
