"""Matplotlib set-up shared by the reproduction scripts (headless, one style, PNG)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Grid on every axis, tight layout, PNG at 120 dpi; closes the figure."""
    for ax in fig.axes:
        if ax.get_label() != "<colorbar>":
            ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.clf()
    pyplot().close(fig)
    return Path(path)
