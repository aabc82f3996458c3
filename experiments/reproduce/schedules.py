"""The JR weight's schedules side by side: constant, staircase and adaptive γ on the same model.

    python -m experiments.reproduce.schedules                        # digits, 3 runs, ~10 min
    python -m experiments.reproduce.schedules --size=large           # 2000 steps per run
    python -m experiments.reproduce.schedules --runs=runs/a,runs/b   # any finished run folders

Without ``--runs`` it trains the digits MDEQ (Quickstart config; small: 300 steps of
which 100 pretraining) three times into ``<out>/runs``, all starting from γ0 =
``--gamma0``:

* ``constant``: γ = γ0 throughout;
* ``staircase`` (the official code's "jac_incremental"): γ0 + 0.1 every fifth of the DEQ
  phase, so γ0 + 0.4 by the end;
* ``adaptive`` (ours, :mod:`deq_jax.train.schedules`): γ × 1.05 per step while the moving
  average of the training batches' forward residual is above ``--target_residual``,
  γ × 0.98 per step while it is below. Its step criterion is switched off (target 1000
  steps): at tol 1e-3 every batch spends its whole 12-step budget, so any step target at
  or below the limit would only ever raise γ.

Reports final quality, solver steps, residual at the limit, Jacobian norm, final γ and
train time; figures: ``gamma.png`` (γ over training) and ``residual.png`` (the training
batches' forward residual over training). Writes ``results.md`` and ``results.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import experiments.cpu_flags as cpu_flags

if __name__ == "__main__":
    cpu_flags.apply()  # before jax is imported: the same XLA CPU flags as experiments.train

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from deq_jax.train.metrics import read  # noqa: E402
from experiments.reproduce import figures, runs  # noqa: E402

FLAGS = flags.FLAGS

# A step target no batch reaches: only the residual drives the adaptive schedule. (Broyden
# does not reach tol 1e-3 within the 12-step limit here, so a target at or below the
# limit would count every batch as over it and drive gamma to its cap.)
STEP_CRITERION_OFF = 1000.0


def configs(size: str, gamma0: float, target_residual: float) -> dict[str, dict]:
    train = runs.DIGITS_SIZES[size]
    every = max((train["num_steps"] - train["pretrain_steps"]) // 5, 1)
    base = {"train": train, "eval": {"budgets": "12"}}
    return {
        "constant": runs.merge(base, {"jr": {"gamma": gamma0, "schedule": "constant"}}),
        "staircase": runs.merge(base, {"jr": {"gamma": gamma0, "schedule": "staircase", "staircase_delta": 0.1,
                                              "staircase_every": every}}),
        "adaptive": runs.merge(base, {"jr": {"gamma": gamma0, "schedule": "adaptive",
                                             "target_steps": STEP_CRITERION_OFF, "target_residual": target_residual}}),
    }


def collect(run_dir) -> dict:
    """A finished run's final numbers and its training curves of γ and forward residual."""
    numbers, _, c = runs.final_numbers(run_dir)
    rows = [r for r in read(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"]
    return numbers | {
        "target_residual": c.jr.target_residual if c.jr.schedule == "adaptive" else None,
        "train_steps": [r["step"] for r in rows],
        "gamma": [r["gamma"] for r in rows],
        "train_residual": [r["fwd_residual"] for r in rows],
    }


def plot(results: list[dict], out: Path) -> list[Path]:
    plt = figures.pyplot()
    paths = []
    for key, ylabel, title, log in (
        ("gamma", "JR weight γ", "γ over training", False),
        ("train_residual", "forward relative residual at the step limit",
         "Forward residual of the training batches (means of 10 steps)", True),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.axvspan(0, max(r["pretrain_steps"] for r in results), color="0.9", zorder=0,
                   label="pretraining (no solver, γ held)")
        for r in results:
            y = np.asarray(r[key], float)
            (line,) = (ax.semilogy if log else ax.plot)(r["train_steps"], y, label=r["label"])
            if key == "train_residual" and r["target_residual"] is not None:
                ax.axhline(r["target_residual"], color=line.get_color(), ls=":", lw=1,
                           label=f"{r['label']}: target")
        ax.set(xlabel="training step", ylabel=ylabel, title=title)
        ax.legend(fontsize=8)
        paths.append(figures.save(fig, out / f"{key}.png"))
    return paths


def table(results: list[dict]) -> list[str]:
    r0 = results[0]
    lines = [
        f"| run | {r0['split']} {r0['metric']} | steps at limit {r0['limit']} | steps to tol | reached tol | "
        "residual at limit | ‖J‖²_F/d | final γ | train time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        quality = f"{r['final']:.1%}" if r["metric"] == "accuracy" else f"{r['final']:.3f}"
        lines.append(
            f"| {r['label']} | {quality} | {r['steps_at_limit']:.2f} | {r['steps_to_tol']:.1f} | "
            f"{r['converged_to_tol']:.0%} | {r['residual_at_limit']:.1e} | {r['jacobian']:.3f} | "
            f"{r['gamma'][-1]:.2f} | "
            f"{r['train_time_s']:.0f} s |"
        )
    return lines


def run(out: str, run_dirs=(), size: str = "small", gamma0: float = 0.5,
        target_residual: float = 3e-2) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_dirs = [Path(r) for r in run_dirs] or runs.train_runs(out / "runs", configs(size, gamma0, target_residual))
    results = [collect(r) for r in run_dirs]
    paths = plot(results, out)
    figures.write_results(out, f"γ schedules ({results[0]['data']})", table(results), paths, results)
    return results


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run(FLAGS.out, FLAGS.runs, FLAGS.size, FLAGS.gamma0, FLAGS.target_residual)
    print(f"wrote {FLAGS.out}/results.md, gamma.png, train_residual.png")


def define_flags():
    """The command-line flags (defined on demand: importing this module defines none)."""
    flags.DEFINE_string("out", "results/schedules", "Results folder.")
    flags.DEFINE_list("runs", [], "Finished run folders (default: train digits once per schedule).")
    flags.DEFINE_enum("size", "small", list(runs.DIGITS_SIZES),
                      "Digits runs made here: 300 (small) or 2000 (large) steps.")
    flags.DEFINE_float("gamma0", 0.5, "Starting γ of every schedule.")
    flags.DEFINE_float("target_residual", 3e-2, "The adaptive schedule's target forward residual.")


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
