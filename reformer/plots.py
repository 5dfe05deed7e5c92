"""The finishing steps every plot of the package shares: labelled axes with a grid and a legend,
and a PNG written atomically (a reader never sees half an image) with the figure closed after."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed; imported on first
    use: plotting is optional and slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_axes(ax, xlabel: str, ylabel: str, title: str | None = None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def save_png(fig, path: Path, dpi: int = 100) -> None:
    """Lay out ``fig``, write it to ``path`` as PNG (a failed write, e.g. a full disk, names the
    file and leaves no partial one) and close it."""
    from .atomic import atomic_write

    try:
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        pyplot().close(fig)
