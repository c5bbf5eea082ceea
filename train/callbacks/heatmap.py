"""Expert-load heatmap (MoE layers x experts) as a PNG."""

from __future__ import annotations

from pathlib import Path

import torch


def write_heatmap(fraction_LE: torch.Tensor, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, experts = fraction_LE.shape
    fig, ax = plt.subplots(figsize=(max(4, experts * 0.15 + 2), max(2, layers * 0.25 + 1.5)))
    im = ax.imshow(fraction_LE.numpy() * experts, aspect="auto", cmap="viridis")  # 1.0 = perfectly balanced
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="load / balanced load")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
