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

import json
import sys
from pathlib import Path

import experiments.cpu_flags as cpu_flags

if __name__ == "__main__":
    cpu_flags.apply()  # before jax is imported: the same XLA CPU flags as experiments.train

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import deq_jax  # noqa: E402
from deq_jax.train import objective  # noqa: E402
from deq_jax.train.sampling import load_run  # noqa: E402

FLAGS = flags.FLAGS

SHOW = (2, 4, 8, 12, 20, 40)  # steps reported in the table


def make_runs(out: Path, size: str) -> list[Path]:
    """Digits MDEQ runs without and with JR (the Quickstart config) under ``out``."""
    from deq_jax.train import train

    steps = {"small": {}, "large": {"num_steps": 2000, "pretrain_steps": 600, "eval_every": 500}}[size]
    runs = []
    for name, gamma in (("digits_no_jr", 0.0), ("digits_jr", 1.0)):
        run = out / name
        if not (run / "summary.json").exists():
            train({"jr": {"gamma": gamma}, "train": steps}, run, resume=run.exists())
        runs.append(run)
    return runs


def traces(run_dir, steps: int, batches: int) -> dict:
    """Mean forward and backward relative residual after each solver step ``[steps + 1]``."""
    c, task, params, step = load_run(run_dir)
    split = task.eval_split
    f = objective.cell_fn(task.model)
    forward = deq_jax.SolverConfig(c.forward.solver, steps, 1e-12, c.forward.stop_mode)
    backward = deq_jax.SolverConfig(c.backward.solver, steps, 1e-12, c.backward.stop_mode)

    @jax.jit
    def one(params, inputs, targets, weights):
        out = objective.forward(task.model, params, inputs, mode="deq", config=forward)

        def loss(z):
            logits = task.model.apply({"params": params}, z, method="head")
            return jnp.sum(objective.cross_entropy(logits, targets) * weights) / jnp.sum(weights)

        g = jax.grad(loss)(out.z)
        _, adj = deq_jax.adjoint_solve(f, params, out.x, jax.lax.stop_gradient(out.z), g, backward)
        return out.result.rel_trace, adj.rel_trace

    fwd, bwd = [], []
    for i, (inputs, targets, weights) in enumerate(task.eval_sets[split]()):
        if i == batches:
            break
        a, b = jax.device_get(one(params, inputs, targets, weights))
        keep = np.asarray(weights).reshape(len(weights), -1).max(axis=1) > 0
        fwd.append(np.asarray(a)[:, keep])
        bwd.append(np.asarray(b)[:, keep])
    fwd, bwd = np.concatenate(fwd, axis=1), np.concatenate(bwd, axis=1)
    return {
        "name": Path(run_dir).name,
        "checkpoint_step": step,
        "gamma": c.jr.gamma,
        "data": task.name,
        "examples": fwd.shape[1],
        "forward": _carry_forward(fwd).mean(axis=1),
        "backward": _carry_forward(bwd).mean(axis=1),
    }


def _carry_forward(trace: np.ndarray) -> np.ndarray:
    """An example that stopped (NaN after its last step) keeps its last residual."""
    out = trace.copy()
    for t in range(1, len(out)):
        out[t] = np.where(np.isnan(out[t]), out[t - 1], out[t])
    return out


def plot(results: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, what in (("forward", "forward solve z = f(z)"), ("backward", "backward (adjoint) solve u = u J + g")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in results:
            label = f"{r['name']} (γ = {r['gamma']:g})"
            ax.semilogy(np.arange(len(r[key])), r[key], label=label)
        ax.set(xlabel="solver step", ylabel="mean relative residual", title=f"Convergence of the {what}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{key}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def run(out: str, run_dirs=(), size: str = "small", steps: int = 40, batches: int = 1) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_dirs = [Path(r) for r in run_dirs] or make_runs(out / "runs", size)
    results = [traces(r, steps, batches) for r in run_dirs]
    figures = plot(results, out)
    shown = [s for s in SHOW if s <= steps]
    lines = [
        f"# Solver convergence of trained models ({steps} steps recorded, first {batches} evaluation batch(es))",
        "",
        "| run | data | γ | checkpoint | examples | " + " | ".join(f"fwd@{s}" for s in shown) + " | "
        + " | ".join(f"bwd@{s}" for s in shown) + " |",
        "|---|---|---|---|---|" + "---|" * (2 * len(shown)),
    ]
    for r in results:
        cells = [f"{r['forward'][s]:.1e}" for s in shown] + [f"{r['backward'][s]:.1e}" for s in shown]
        lines.append(f"| {r['name']} | {r['data']} | {r['gamma']:g} | {r['checkpoint_step']} | {r['examples']} | "
                     + " | ".join(cells) + " |")
    lines += ["", *[f"![{p.stem}]({p.name})" for p in figures], ""]
    (out / "results.md").write_text("\n".join(lines))
    saved = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in results]
    (out / "results.json").write_text(json.dumps(saved, indent=1) + "\n")
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
