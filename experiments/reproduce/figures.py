"""Figures and results files shared by the reproduction scripts (headless matplotlib, PNG)."""

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


def write_results(out: Path, heading: str, body: list[str], paths: list[Path], results) -> None:
    """``out/results.md`` (the heading, the body lines, then every figure as an image link)
    and ``out/results.json`` (``results``, JSON-serializable)."""
    import json

    lines = [f"# {heading}", "", *body, "", *[f"![{p.stem}]({p.name})" for p in paths], ""]
    (Path(out) / "results.md").write_text("\n".join(lines))
    (Path(out) / "results.json").write_text(json.dumps(results, indent=1) + "\n")



def seed_lines(ax, x, ys, label: str, *, log: bool = False, color=None, ls: str = "-", marker: str | None = None,
               band: bool = False):
    """The mean over seeds of the curves ``ys`` (one per seed, each over the shared axis
    ``x``) as a line labelled ``label``, and each seed as a thin line of the same colour
    (or, with ``band``, the mean ± one sample standard deviation as a shaded band).
    Returns the colour."""
    import warnings

    import numpy as np

    ys = np.stack([np.asarray(y, np.float64) for y in ys])
    x = np.asarray(x, np.float64)
    plot = ax.semilogy if log else ax.plot
    with warnings.catch_warnings():  # a step where every seed is NaN (e.g. no solver while pretraining)
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(ys, axis=0)
    (line,) = plot(x, mean, color=color, ls=ls, marker=marker, ms=3, lw=1.8, label=label)
    color = line.get_color()
    if len(ys) > 1 and band:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sd = np.nanstd(ys, axis=0, ddof=1)
        low = mean - sd
        if log:
            low = np.where(low > 0, low, mean / 10)
        ax.fill_between(x, low, mean + sd, color=color, alpha=0.2, lw=0)
    elif len(ys) > 1:
        for y in ys:
            plot(x, y, color=color, ls=ls, lw=0.6, alpha=0.45)
    return color
