"""Training runs made by the reproduction scripts, and how they are named on figures."""

from __future__ import annotations

import copy
from pathlib import Path


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
