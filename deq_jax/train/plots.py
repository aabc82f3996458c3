"""PNG plots of one or more run folders, overlaid (e.g. with and without JR)."""

from __future__ import annotations

import os
from pathlib import Path

from deq_jax.train.metrics import read

MAIN = "main"  # the run's quality metric: bpc, perplexity or accuracy (the first its eval rows hold)
PANELS = [
    ("train", "loss", "training loss", "log"),
    ("eval", MAIN, "{metric} ({split})", "linear"),
    ("train", "fwd_steps", "forward steps (train)", "linear"),
    ("train", "bwd_steps", "backward steps (train)", "linear"),
    ("train", "fwd_residual", "forward rel. residual (train)", "log"),
    ("eval", "jac", "||J_f(z*)||_F^2 / d ({split})", "log"),
    ("train", "gamma", "JR weight gamma", "linear"),
    ("eval", "steps_to_tol", "forward steps to tol ({split})", "linear"),
]


def _main_metric(rows) -> str:
    evals = [r for r in rows if r.get("kind") == "eval"]
    return next((k for k in ("bpc", "perplexity", "accuracy") if evals and k in evals[0]), "accuracy")


def _split(rows) -> str:
    return next((r["split"] for r in rows if r.get("kind") == "eval" and "split" in r), "test")


def _series(rows, kind, key):
    key = _main_metric(rows) if key == MAIN else key
    pts = [(r["step"], r[key]) for r in rows if r.get("kind") == kind and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Writes ``training.png`` (curves over steps) and ``budgets.png`` (the quality metric
    and the residual against the forward step budget) into ``out_dir``; returns their paths."""
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

    metric, split = _main_metric(runs[0][1]), _split(runs[0][1])
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (kind, key, title, scale) in zip(axes.flat, PANELS, strict=True):
        for name, rows in runs:
            xs, ys = _series(rows, kind, key)
            if xs:
                ax.plot(xs, ys, marker="o" if kind == "eval" else None, ms=3, label=name)
        ax.set_title(title.format(metric=metric, split=split))
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
            key = _main_metric(rows)
            axes[0].plot([r["budget"] for r in final], [r[key] for r in final], marker="o", label=name)
            axes[1].plot([r["budget"] for r in final], [r["residual"] for r in final], marker="o", label=name)
    axes[0].set(title=f"{split} {metric} vs forward step budget", xlabel="forward steps", ylabel=metric)
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
