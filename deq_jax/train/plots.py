"""PNG plots of one or more run folders, overlaid (e.g. with and without JR)."""

from __future__ import annotations

import os
from pathlib import Path

from deq_jax.train.metrics import read

PANELS = [
    ("train", "loss", "training loss", "log"),
    ("eval", "accuracy", "test accuracy", "linear"),
    ("train", "fwd_steps", "forward steps (train)", "linear"),
    ("train", "bwd_steps", "backward steps (train)", "linear"),
    ("train", "fwd_residual", "forward rel. residual (train)", "log"),
    ("eval", "jac", "||J_f(z*)||_F^2 / d (test)", "log"),
    ("train", "gamma", "JR weight gamma", "linear"),
    ("eval", "steps_to_tol", "forward steps to tol (test)", "linear"),
]


def _series(rows, kind, key):
    pts = [(r["step"], r[key]) for r in rows if r.get("kind") == kind and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Writes ``training.png`` (curves over steps) and ``budgets.png`` (accuracy and
    residual against the forward step budget) into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for d in run_dirs:
        path = Path(d) / "metrics.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{d} is not a run folder (no metrics.jsonl)")
        runs.append((Path(d).name, read(path)))

    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (kind, key, title, scale) in zip(axes.flat, PANELS, strict=True):
        for name, rows in runs:
            xs, ys = _series(rows, kind, key)
            if xs:
                ax.plot(xs, ys, marker="o" if kind == "eval" else None, ms=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        if scale == "log" and ax.has_data():
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    training = out_dir / "training.png"
    fig.savefig(training, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs:
        last = max((r["step"] for r in rows if r.get("kind") == "budget"), default=None)
        final = sorted((r for r in rows if r.get("kind") == "budget" and r["step"] == last), key=lambda r: r["budget"])
        if final:
            axes[0].plot([r["budget"] for r in final], [r["accuracy"] for r in final], marker="o", label=name)
            axes[1].plot([r["budget"] for r in final], [r["residual"] for r in final], marker="o", label=name)
    axes[0].set(title="test accuracy vs forward step budget", xlabel="forward steps", ylabel="accuracy")
    axes[1].set(title="relative residual vs budget", xlabel="forward steps", ylabel="mean ||f(z)-z||/||f(z)||")
    if axes[1].has_data():
        axes[1].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    budgets = out_dir / "budgets.png"
    fig.savefig(budgets, dpi=110)
    plt.close(fig)
    return [training, budgets]
