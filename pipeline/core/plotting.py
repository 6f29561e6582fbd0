"""The two things every report plot needs: pyplot on a file-only backend (no display on
servers and CI), and an atomic PNG write that also frees the figure."""
from __future__ import annotations

from pathlib import Path

from pipeline.core.io import atomic_path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` under a temp name, rename it into place, close the figure."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
