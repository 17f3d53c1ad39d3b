"""Training curves and prediction overlays for examples/finetune.py (needs matplotlib)."""

from __future__ import annotations

from typing import Dict, List

import numpy as np


def _smooth(x: List[float], n: int = 25) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if len(x) < n:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    return np.concatenate([c[1:n] / np.arange(1, n), (c[n:] - c[:-n]) / n])


def plot_curves(history: Dict[str, List[float]], path: str) -> None:
    """Loss and IoU against steps (training curves smoothed over 25 steps; held-out as points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_i) = plt.subplots(1, 2, figsize=(11, 4))
    ax_l.plot(history["step"], _smooth(history["loss"]), label="train loss")
    ax_l.set_xlabel("step"), ax_l.set_yscale("log"), ax_l.legend(), ax_l.grid(alpha=0.3)
    ax_i.plot(history["step"], _smooth(history["iou_first"]), label="train IoU, first prompt")
    ax_i.plot(history["step"], _smooth(history["iou_last"]), label="train IoU, last round")
    if history["eval_step"]:
        ax_i.plot(history["eval_step"], history["eval_iou"], "o-", label="held-out IoU, 1 centre point")
    ax_i.set_xlabel("step"), ax_i.set_ylim(0, 1), ax_i.legend(loc="lower right"), ax_i.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_overlays(
    samples,
    owner: np.ndarray,
    gt: np.ndarray,
    points: np.ndarray,
    preds: np.ndarray,
    ious: np.ndarray,
    path: str,
    n: int = 8,
) -> None:
    """Up to n held-out masks: image with the prediction (blue), the ground-truth outline (lime)
    and the prompt point (yellow star)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.ndimage import binary_erosion

    pick = np.linspace(0, len(gt) - 1, min(n, len(gt))).astype(int)
    fig, axes = plt.subplots(1, len(pick), figsize=(2.6 * len(pick), 2.8), squeeze=False)
    for ax, i in zip(axes[0], pick):
        img = samples.images[owner[i]].astype(np.float32) / 255.0
        h, w = samples.sizes[owner[i]]
        over = img.copy()
        over[preds[i]] = 0.35 * over[preds[i]] + 0.65 * np.array([0.1, 0.35, 1.0])
        edge = gt[i] & ~binary_erosion(gt[i], iterations=max(1, gt[i].shape[0] // 256))
        over[edge] = (0.6, 1.0, 0.0)
        ax.imshow(over[:h, :w])
        ax.plot(points[i][0], points[i][1], "y*", markersize=12, markeredgecolor="k")
        ax.set_title(f"IoU {ious[i]:.2f}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
