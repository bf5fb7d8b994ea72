"""What every family's figures share: a file-only matplotlib, a grid of one panel per layer, saving."""

from __future__ import annotations

import math
from pathlib import Path


def pyplot():
    """matplotlib.pyplot drawing to files only: training machines have no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def panel_grid(n: int, panel_size: tuple[float, float] = (2.6, 2.2), max_cols: int = 7):
    """(figure, n axes): one panel per item (a layer), as close to a 3:2 grid as max_cols allows; no spare panels,
    so a 28-layer model gets 28 panels, laid out by its depth rather than a fixed grid."""
    cols = max(1, min(n, max_cols, math.ceil(math.sqrt(1.5 * n))))
    rows = math.ceil(n / cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows + 0.8),
                                  squeeze=False, constrained_layout=True)
    flat = list(axes.flat)
    for spare in flat[n:]:
        spare.remove()
    return fig, flat[:n]


def save(fig, path: Path, dpi: int = 120) -> Path:
    """Write the figure (parent folders made) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
