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
