"""Training figures: the learning curve and prediction overlays (matplotlib, Agg, no display)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from masksam.components._io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curve(history: Sequence[Mapping[str, float]], path: str | os.PathLike) -> None:
    """Plot training loss (and lr) per step and validation mean Dice per validation, as PNG."""
    plt = _pyplot()
    steps = [h["step"] for h in history if h.get("loss") == h.get("loss") and "loss" in h]
    loss = [h["loss"] for h in history if h.get("loss") == h.get("loss") and "loss" in h]
    val = [(h["step"], h["val_mean_dice"]) for h in history if h.get("val_mean_dice") is not None
           and h["val_mean_dice"] == h["val_mean_dice"]]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, color="tab:blue", lw=0.8, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color="tab:red", label="val mean Dice")
        ax2.set_ylabel("validation mean Dice", color="tab:red")
        ax2.set_ylim(0, 1)
    ax.set_title("MaskSAM training")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _label_rgb(label: np.ndarray, num_classes: int) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    colours = np.array([cmap(i % cmap.N)[:3] for i in range(max(num_classes, 1))])
    return colours[np.clip(label, 0, len(colours) - 1)]


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: str | os.PathLike,
            num_classes: int, title: str = "", slices: int = 3) -> None:
    """Side by side, for the ``slices`` slices with most foreground: the image in grey, the
    ground truth and the prediction as coloured label overlays. ``image [Z,Y,X]``, labels ``[Z,Y,X]``."""
    plt = _pyplot()
    fg = (truth > 0).reshape(truth.shape[0], -1).sum(1)
    order = np.argsort(-fg, kind="stable")[:slices] if fg.any() else np.linspace(
        0, truth.shape[0] - 1, min(slices, truth.shape[0])).astype(int)
    zs = sorted(set(int(z) for z in order))
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    fig, axes = plt.subplots(len(zs), 3, figsize=(9, 3 * len(zs)), dpi=90, squeeze=False)
    for row, z in enumerate(zs):
        grey = np.clip((image[z] - lo) / max(hi - lo, 1e-6), 0, 1)
        rgb = np.repeat(grey[..., None], 3, -1)
        for col, (name, lab) in enumerate((("image", None), ("ground truth", truth[z]), ("prediction", pred[z]))):
            shown = rgb
            if lab is not None:
                mask = (lab > 0)[..., None]
                shown = np.where(mask, 0.5 * rgb + 0.5 * _label_rgb(lab, num_classes), rgb)
            ax = axes[row, col]
            ax.imshow(shown, interpolation="nearest")
            if lab is not None:
                ax.contour(lab > 0, levels=[0.5], colors="white", linewidths=0.5)
            ax.set_title(f"{name} z={z}", fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
