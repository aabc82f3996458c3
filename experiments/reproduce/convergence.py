"""Forward and backward convergence of trained DEQs, with and without JR (paper Figures 1, 3).

    python -m experiments.reproduce.convergence                       # trains digits, ~8 min
    python -m experiments.reproduce.convergence --runs=runs/a,runs/b  # any run folders
    python -m experiments.reproduce.convergence --size=large          # digits at 4x the steps

For every run folder: loads its newest checkpoint, takes the first ``--batches``
evaluation batches, and runs

* the forward solver (the run's own, Broyden by default) for ``--steps`` steps with a
  tolerance too small to stop early, recording the mean relative residual
  ||f(z)-z|| / ||f(z)|| after each step;
* the implicit backward solve u = u J_f(z*) + g at the solution, with
  g = d loss / d z* (the cotangent training would use), from u = g, recording its
  relative residual per step.

Without ``--runs`` it first trains the digits MDEQ twice (Quickstart config, no JR and
JR gamma = 1) into ``<out>/runs``. Writes ``results.md``, ``forward.png``, ``backward.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import experiments.cpu_flags as cpu_flags

if __name__ == "__main__":
    cpu_flags.apply()  # before jax is imported: the same XLA CPU flags as experiments.train

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from deq_jax.train.sampling import load_run  # noqa: E402
from experiments.reproduce import figures, measure, runs  # noqa: E402

FLAGS = flags.FLAGS

SHOW = (2, 4, 8, 12, 20, 40)  # steps reported in the table


def make_runs(out: Path, size: str) -> list[Path]:
    """Digits MDEQ runs without and with JR (the Quickstart config) under ``out``."""
    steps = {"small": {}, "large": {"num_steps": 2000, "pretrain_steps": 600, "eval_every": 500}}[size]
    return runs.train_runs(out, {name: {"jr": {"gamma": gamma}, "train": steps}
                                 for name, gamma in (("digits_no_jr", 0.0), ("digits_jr", 1.0))})


def traces(run_dir, steps: int, batches: int) -> dict:
    """Mean forward and backward relative residual after each solver step ``[steps + 1]``."""
    c, task, params, step = load_run(run_dir)
    m = measure.measure(measure.make_measure(task, c, steps), params, task, batches)
    return {
        "name": Path(run_dir).name,
        "checkpoint_step": step,
        "gamma": c.jr.gamma,
        "data": task.name,
        "examples": m["forward"].shape[1],
        "forward": m["forward"].mean(axis=1),
        "backward": m["backward"].mean(axis=1),
    }


def plot(results: list[dict], out: Path) -> list[Path]:
    plt = figures.pyplot()
    paths = []
    for key, what in (("forward", "forward solve z = f(z)"), ("backward", "backward (adjoint) solve u = u J + g")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in results:
            label = f"{r['name']} (γ = {r['gamma']:g})"
            ax.semilogy(np.arange(len(r[key])), r[key], label=label)
        ax.set(xlabel="solver step", ylabel="mean relative residual", title=f"Convergence of the {what}")
        ax.legend(fontsize=8)
        paths.append(figures.save(fig, out / f"{key}.png"))
    return paths


def run(out: str, run_dirs=(), size: str = "small", steps: int = 40, batches: int = 1) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_dirs = [Path(r) for r in run_dirs] or make_runs(out / "runs", size)
    results = [traces(r, steps, batches) for r in run_dirs]
    paths = plot(results, out)
    shown = [s for s in SHOW if s <= steps]
    lines = [
        "| run | data | γ | checkpoint | examples | " + " | ".join(f"fwd@{s}" for s in shown) + " | "
        + " | ".join(f"bwd@{s}" for s in shown) + " |",
        "|---|---|---|---|---|" + "---|" * (2 * len(shown)),
    ]
    for r in results:
        cells = [f"{r['forward'][s]:.1e}" for s in shown] + [f"{r['backward'][s]:.1e}" for s in shown]
        lines.append(f"| {r['name']} | {r['data']} | {r['gamma']:g} | {r['checkpoint_step']} | {r['examples']} | "
                     + " | ".join(cells) + " |")
    heading = f"Solver convergence of trained models ({steps} steps recorded, first {batches} evaluation batch(es))"
    saved = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in results]
    figures.write_results(out, heading, lines, paths, saved)
    return results


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run(FLAGS.out, FLAGS.runs, FLAGS.size, FLAGS.steps, FLAGS.batches)
    print(f"wrote {FLAGS.out}/results.md, forward.png, backward.png")


def define_flags():
    """The command-line flags (defined on demand: importing this module defines none, so
    several scripts can be imported into one process)."""
    flags.DEFINE_string("out", "results/convergence", "Results folder.")
    flags.DEFINE_list("runs", [], "Run folders to analyse (default: train digits with and without JR).")
    flags.DEFINE_enum("size", "small", ["small", "large"], "Digits runs made here: 500 (small) or 2000 steps.")
    flags.DEFINE_integer("steps", 40, "Solver steps to record.")
    flags.DEFINE_integer("batches", 1, "Evaluation batches per run.")


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
