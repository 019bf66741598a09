"""The sections' charts: matplotlib's object API on the Agg canvas (no pyplot state), like charts.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor="white", bbox_inches="tight")
    return path


def grid_heatmap(values: list[list[float | None]], rows: list, cols: list, title: str,
                 path: Path, colour_label: str) -> Path:
    """A layer × column heatmap (e.g. relative change by layer and matrix type)."""
    array = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    fig = figure(max(4.0, 0.7 * len(cols) + 2.5), max(3.0, 0.28 * len(rows) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(array, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel("matrix type")
    ax.set_ylabel("layer")
    ax.set_title(title, loc="left", fontsize=11)
    fig.colorbar(image, ax=ax, label=colour_label)
    return save_png(fig, path)
