"""Small matplotlib helpers (Agg backend: runs write PNGs, they never open windows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib  # lazy: a slow import, needed only when a run draws a plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(x: Sequence[float], y: Sequence[float], path: str | Path, *, xlabel: str, ylabel: str,
              title: str | None = None) -> str:
    """One curve with a light grid, saved as a PNG; returns the path."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(x, y)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if title:
        axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return str(path)
