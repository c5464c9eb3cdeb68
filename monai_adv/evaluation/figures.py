"""Figures of the robustness evaluation: IoU against epsilon, and a grid of adversarial examples."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = ["agg_pyplot", "plot_robustness_curve", "save_example_grid"]


def agg_pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_robustness_curve(rows: Sequence[Mapping], path: str | os.PathLike, title: str = "") -> str:
    """Plot mean IoU against epsilon, one line per attack, and save it as PNG.

    Args:
        rows: result rows with ``attack``, ``epsilon`` and ``mean_iou``.
        path: the PNG to write.
        title: figure title.

    Returns:
        ``path`` as a string.
    """
    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for attack in dict.fromkeys(r["attack"] for r in rows):
        points = sorted((r["epsilon"], r["mean_iou"]) for r in rows if r["attack"] == attack)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=attack)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("epsilon (images scaled to [0, 1])")
    ax.set_ylabel("mean foreground IoU")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _displayable(image: torch.Tensor) -> np.ndarray:
    """``(C, *spatial)`` -> 2D grey or RGB array in [0, 1] (middle slice of 3D images)."""
    array = image.detach().float().cpu()
    while array.ndim > 3:  # 3D: the middle slice of the last axis
        array = array[..., array.shape[-1] // 2]
    array = array.numpy()
    if array.shape[0] == 3:
        return np.clip(np.moveaxis(array, 0, -1), 0, 1)
    return array[0]


def save_example_grid(columns: Mapping[str, Sequence[torch.Tensor]], path: str | os.PathLike, title: str = "") -> str:
    """One row per image, one column per named panel (like the paper's Figs. 2-4), saved as PNG.

    Args:
        columns: ``{"input": [img, ...], "FGSM": [...], ...}``: ``(C, *spatial)`` tensors, one list entry per row.
            Images are shown in [0, 1]; masks in {0, 1}.
        path: the PNG to write.
        title: figure title.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: when the columns are empty or hold different numbers of rows.
    """
    counts = {len(v) for v in columns.values()}
    if not columns or len(counts) != 1 or 0 in counts:
        raise ValueError(
            f"every column needs the same, non-zero number of images, got { {k: len(v) for k, v in columns.items()} }."
        )
    num_rows, names = counts.pop(), list(columns)
    plt = agg_pyplot()
    fig, axes = plt.subplots(num_rows, len(names), figsize=(1.8 * len(names), 1.8 * num_rows), squeeze=False)
    for col, name in enumerate(names):
        for row, image in enumerate(columns[name]):
            ax = axes[row][col]
            ax.imshow(_displayable(image), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
