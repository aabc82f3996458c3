"""Training runs made by the reproduction scripts, and how they are named on figures."""

from __future__ import annotations

import copy
import json
from pathlib import Path

# The digits runs of budgets.py and schedules.py, by --size: shorter than the Quickstart's
# 500 steps at "small", so that four runs fit in 15 minutes on 2 CPU cores.
DIGITS_SIZES = {
    "small": {"num_steps": 300, "pretrain_steps": 100, "eval_every": 300},
    "large": {"num_steps": 2000, "pretrain_steps": 600, "eval_every": 500},
}


def merge(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``, nested dicts merged key by key (neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def train_runs(out: Path, configs: dict[str, dict]) -> list[Path]:
    """Trains every ``{name: config overrides}`` into ``out/<name>``.

    A finished run (with ``summary.json``) is reused; an interrupted one is resumed from
    its last checkpoint, so a script killed half-way loses at most a checkpoint interval.
    """
    from deq_jax.train import train

    dirs = []
    for name, config in configs.items():
        run = Path(out) / name
        if not (run / "summary.json").exists():
            train(config, run, resume=run.exists())
        dirs.append(run)
    return dirs


def label(c) -> str:
    """A run's regularization in words, from its resolved config: "no reg.", "weight decay 0.5",
    "JR γ = 1", "JR adaptive (γ0 = 0.5)"."""
    j, wd = c.jr, c.optim.weight_decay
    if j.gamma == 0 and j.schedule == "constant":
        return "no reg." if wd == 0 else f"weight decay {wd:g}"
    text = f"JR γ = {j.gamma:g}" if j.schedule == "constant" else f"JR {j.schedule} (γ0 = {j.gamma:g})"
    return text + (f" + weight decay {wd:g}" if wd else "")


def final_numbers(run_dir) -> tuple[dict, dict, object]:
    """``(numbers, summary, config)`` of a finished run folder: ``numbers`` holds its name,
    label, data, quality metric and split, the final quality at the step limit (``final``),
    the solver statistics, Jacobian norm and train time. Raises ``FileNotFoundError`` if
    the run has not finished (no ``summary.json``)."""
    from deq_jax.train.sampling import open_run

    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{run_dir} has no summary.json (the run has not finished)")
    s = json.loads(summary_path.read_text())
    c, _, _ = open_run(run_dir)
    key, split = s["main_metric"], s["eval_split"]
    numbers = {
        "name": run_dir.name,
        "label": label(c),
        "data": s["data"],
        "metric": key,
        "split": split,
        "final": s[f"{split}_{key}"],
        "limit": c.forward.max_steps,
        "tol": c.forward.tol,
        "steps_at_limit": s["fwd_steps_at_limit"],
        "steps_to_tol": s["fwd_steps_to_tol"],
        "converged_to_tol": s["converged_to_tol"],
        "residual_at_limit": s["residual_at_limit"],
        "jacobian": s["jacobian_frobenius_sq_per_dim"],
        "train_time_s": s["train_time_s"],
        "pretrain_steps": c.train.pretrain_steps,
    }
    return numbers, s, c
