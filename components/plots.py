"""Matplotlib figures shared by the steps: per-class bar charts with error bars, box plots.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas directly (never pyplot),
so plotting needs no display, sets no global backend and is safe in worker processes. Each PNG
is written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from masksam.components._io import atomic_path


def _figure(n_items: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 0.45 * n_items + 2.0), 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def bar_chart(
    names: Sequence[str],
    means: Sequence[float],
    stds: Sequence[float],
    path: str | os.PathLike,
    ylabel: str,
    title: str = "",
    ylim: tuple[float, float] | None = None,
) -> Path:
    """One bar per class with a +/- one standard deviation error bar; NaN bars are left empty."""
    fig = _figure(len(names))
    ax = fig.add_subplot()
    x = np.arange(len(names))
    means_a = np.asarray(means, dtype=float)
    stds_a = np.nan_to_num(np.asarray(stds, dtype=float), nan=0.0)
    ax.bar(x, np.nan_to_num(means_a, nan=0.0), yerr=stds_a, capsize=3, color="tab:blue", alpha=0.85)
    for xi, m in zip(x, means_a):
        ax.annotate("n/a" if math.isnan(m) else f"{m:.3f}", (xi, 0), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(x, list(names), rotation=45, ha="right")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def box_plot(
    values: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    ylabel: str,
    title: str = "",
) -> Path:
    """One box per class over its per-case values (NaN dropped; a class with none is left empty)."""
    names = list(values)
    fig = _figure(len(names))
    ax = fig.add_subplot()
    data = [np.asarray([v for v in values[n] if v is not None and not math.isnan(v)], dtype=float) for n in names]
    positions = [i for i, d in enumerate(data) if d.size]
    if positions:
        ax.boxplot([data[i] for i in positions], positions=positions, widths=0.6, showmeans=True)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
