"""How well-conditioned the equilibrium stays over training: no regularization, weight
decay, and JR (paper Figure 10a, 10b, 10c).

    python -m experiments.reproduce.conditioning                        # trains digits 3x, ~13 min
    python -m experiments.reproduce.conditioning --size=large           # 2000 steps per run
    python -m experiments.reproduce.conditioning --data=pydoc           # DEQ-Transformer, ~30 min
    python -m experiments.reproduce.conditioning --runs=runs/a,runs/b   # any runs with several checkpoints

Without ``--runs`` it trains the digits MDEQ (Quickstart config, checkpoints every 50
steps, all kept; or with ``--data=pydoc`` the ``lm_pydoc`` DEQ-Transformer, checkpoints
every 100 steps) three times into ``<out>/runs``: no regularization (``jr.gamma=0``),
decoupled weight decay (``optim.weight_decay``, ``--weight_decay``) and JR
(``--gamma``). Then, at every checkpoint of every run, on the first ``--examples``
evaluation examples (:mod:`experiments.reproduce.measure`):

* the backward (adjoint) solve's relative residual after ``--budget`` steps (Figure 10a);
* the forward solve's relative residual after ``--budget`` steps, against the Jacobian
  norm (Figure 10b);
* ||J_f(z*)||_F^2 / d (Hutchinson, 8 probes) and the spectral radius rho(J_f(z*)) from
  the power method (Figure 10c), with the parameter norm ||theta||_2 beside them, so
  that one can see what weight decay did to the weights.

Writes ``results.md``, ``results.json``, ``backward.png``, ``residual_vs_jacobian.png``,
``jacobian.png``. A given run's own checkpoints are used as they are: train it with
``--config.train.keep_checkpoints=1000`` and a ``checkpoint_every`` that gives a curve.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import experiments.cpu_flags as cpu_flags

if __name__ == "__main__":
    cpu_flags.apply()  # before jax is imported: the same XLA CPU flags as experiments.train

import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from deq_jax.train import checkpoint  # noqa: E402
from deq_jax.train.sampling import open_run  # noqa: E402
from experiments.configs import lm_pydoc  # noqa: E402
from experiments.reproduce import figures, measure, runs  # noqa: E402

FLAGS = flags.FLAGS

SIZES = {  # (data, size) -> training length and checkpoint interval of the runs made here
    ("digits", "small"): {"num_steps": 500, "pretrain_steps": 150, "checkpoint_every": 50},
    ("digits", "large"): {"num_steps": 2000, "pretrain_steps": 600, "checkpoint_every": 100},
    ("pydoc", "small"): {"num_steps": 1500, "pretrain_steps": 200, "checkpoint_every": 100},
    ("pydoc", "large"): {"num_steps": 6000, "pretrain_steps": 800, "checkpoint_every": 250},
}


def configs(size: str, weight_decay: float, gamma: float, data: str = "digits") -> dict[str, dict]:
    """The three runs (Quickstart config for digits, ``lm_pydoc`` for pydoc): overrides by name."""
    length = SIZES[data, size]
    base = {} if data == "digits" else lm_pydoc.get_config().to_dict()
    base = runs.merge(base, {"train": length | {"keep_checkpoints": 1000, "eval_every": length["num_steps"]},
                             "eval": {"budgets": "12"}})
    return {
        "no_reg": runs.merge(base, {"jr": {"gamma": 0.0}}),
        "weight_decay": runs.merge(base, {"jr": {"gamma": 0.0}, "optim": {"weight_decay": weight_decay}}),
        "jr": runs.merge(base, {"jr": {"gamma": gamma}}),
    }


CURVES = ("forward", "backward", "frobenius", "spectral_radius", "spectral_radius_max", "param_norm")


def analyse(run_dir, budget: int, examples: int, power_iters: int) -> dict:
    """Per-checkpoint means (curves over training) of one run folder."""
    run_dir = Path(run_dir)
    c, task, template = open_run(run_dir)
    steps = checkpoint.steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    fn = measure.make_measure(task, c, budget, jacobian=True, power_iters=power_iters)
    curves = {k: [] for k in CURVES}
    for step in steps:
        params, _ = checkpoint.restore_params(run_dir, template, step)
        m = measure.measure(fn, params, task, batches=None, max_examples=examples, seed=c.seed)
        curves["forward"].append(float(m["forward"][budget].mean()))
        curves["backward"].append(float(m["backward"][budget].mean()))
        curves["frobenius"].append(float(m["frobenius"].mean()))
        curves["spectral_radius"].append(float(m["spectral_radius"].mean()))
        curves["spectral_radius_max"].append(float(m["spectral_radius"].max()))
        curves["param_norm"].append(float(optax.tree.norm(params)))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    key = summary.get("main_metric")
    return {
        "name": run_dir.name,
        "label": runs.label(c),
        "data": task.name,
        "pretrain_steps": c.train.pretrain_steps,
        "examples": int(m["forward"].shape[1]),
        "quality": {key: summary[f"{summary['eval_split']}_{key}"]} if key else {},
        "steps": steps,
        **curves,
    }


JAC = r"$\Vert J_f(z^\ast)\Vert_F^2\,/\,d$ (Hutchinson, 8 probes)"


def _pretraining(ax, results):
    end = max(r["pretrain_steps"] for r in results)
    if end > 0:
        ax.axvspan(0, end, color="0.9", zorder=0, label="pretraining (unrolled)")


def plot(results: list[dict], budget: int, out: Path) -> list[Path]:
    plt = figures.pyplot()
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _pretraining(ax, results)
    for r in results:
        ax.semilogy(r["steps"], r["backward"], marker="o", ms=3, label=r["label"])
    ax.set(xlabel="training step", ylabel=f"backward relative residual after {budget} steps",
           title="Backward (adjoint) solve at a fixed budget over training (Fig. 10a)")
    ax.legend(fontsize=8)
    paths.append(figures.save(fig, out / "backward.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        deq = [i for i, s in enumerate(r["steps"]) if s > r["pretrain_steps"]] or list(range(len(r["steps"])))
        x, y = np.array(r["frobenius"])[deq], np.array(r["forward"])[deq]
        (line,) = ax.semilogy(x, y, marker="o", ms=3, lw=0.8, label=r["label"])
        ax.semilogy(x[-1:], y[-1:], marker="*", ms=12, color=line.get_color(), ls="none")
    ax.plot([], [], marker="*", ms=10, color="0.3", ls="none", label="last checkpoint")
    ax.set(xlabel=JAC, ylabel=f"forward relative residual after {budget} steps",
           title="Forward residual vs Jacobian norm over training (Fig. 10b)")
    ax.legend(fontsize=8)
    paths.append(figures.save(fig, out / "residual_vs_jacobian.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    _pretraining(left, results)
    _pretraining(right, results)
    for r in results:
        left.semilogy(r["steps"], r["frobenius"], marker="o", ms=3, label=r["label"])
        (line,) = right.plot(r["steps"], r["spectral_radius"], marker="o", ms=3, label=f"{r['label']}: mean")
        right.plot(r["steps"], r["spectral_radius_max"], ls="--", lw=0.8, color=line.get_color(),
                   label=f"{r['label']}: max over examples")
    right.axhline(1.0, color="k", lw=0.8, ls=":", label="ρ = 1 (critical stability)")
    left.set(xlabel="training step", ylabel=JAC,
             title="Frobenius norm of the Jacobian over training (Fig. 10c)")
    right.set(xlabel="training step", ylabel=r"spectral radius $\rho(J_f(z^\ast))$ (power method)",
              title="Spectral radius of the Jacobian over training")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    paths.append(figures.save(fig, out / "jacobian.png"))
    return paths


def _first_deq(r):
    return next((i for i, s in enumerate(r["steps"]) if s > r["pretrain_steps"]), 0)


def table(results: list[dict], budget: int) -> list[str]:
    cols = [("frobenius", "‖J‖²_F/d", "{:.3f}"), ("spectral_radius", "ρ mean", "{:.3f}"),
            ("spectral_radius_max", "ρ max", "{:.3f}"), ("forward", f"fwd res.@{budget}", "{:.1e}"),
            ("backward", f"bwd res.@{budget}", "{:.1e}"), ("param_norm", "‖θ‖₂", "{:.1f}")]
    lines = [
        "First DEQ-mode checkpoint → last checkpoint:",
        "",
        "| run | quality | " + " | ".join(name for _, name, _ in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in results:
        i = _first_deq(r)
        quality = ", ".join(f"{k} {v:.4g}" for k, v in r["quality"].items()) or "–"
        cells = [f"{fmt.format(r[k][i])} → {fmt.format(r[k][-1])}" for k, _, fmt in cols]
        lines.append(f"| {r['label']} | {quality} | " + " | ".join(cells) + " |")
    lines += ["", "Every checkpoint:", "", "| run | step | " + " | ".join(name for _, name, _ in cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for r in results:
        for i, step in enumerate(r["steps"]):
            lines.append(f"| {r['label']} | {step} | " + " | ".join(fmt.format(r[k][i]) for k, _, fmt in cols) + " |")
    return lines


def run(out: str, run_dirs=(), size: str = "small", weight_decay: float = 0.5, gamma: float = 1.0,
        budget: int = 12, examples: int = 64, power_iters: int = 50, data: str = "digits") -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    given = bool(run_dirs)
    run_dirs = [Path(r) for r in run_dirs] or runs.train_runs(out / "runs", configs(size, weight_decay, gamma, data))
    t1 = time.perf_counter()
    results = [analyse(r, budget, examples, power_iters) for r in run_dirs]
    t2 = time.perf_counter()
    paths = plot(results, budget, out)
    heading = (f"Conditioning of the equilibrium over training ({results[0]['data']}, first {results[0]['examples']} "
               f"evaluation examples, budget {budget} steps, power method {power_iters} iterations)")
    timing = [] if given else [f"training (of the runs not already finished in {out / 'runs'}) {t1 - t0:.0f} s"]
    body = [*table(results, budget), "", "Time: " + ", ".join([*timing, f"analysis {t2 - t1:.0f} s"]) + "."]
    figures.write_results(out, heading, body, paths, results)
    return results


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run(FLAGS.out, FLAGS.runs, FLAGS.size, FLAGS.weight_decay, FLAGS.gamma, FLAGS.budget, FLAGS.examples,
        FLAGS.power_iters, FLAGS.data)
    print(f"wrote {FLAGS.out}/results.md, backward.png, residual_vs_jacobian.png, jacobian.png")


def define_flags():
    """The command-line flags (defined on demand: importing this module defines none)."""
    flags.DEFINE_string("out", "results/conditioning", "Results folder.")
    flags.DEFINE_list("runs", [], "Run folders to analyse (default: train three runs: no reg., weight decay, JR).")
    flags.DEFINE_enum("data", "digits", ["digits", "pydoc"], "Runs made here: digits MDEQ or pydoc DEQ-Transformer.")
    flags.DEFINE_enum("size", "small", ["small", "large"],
                      "Steps per run made here: digits 500 / 2000, pydoc 1500 / 6000.")
    flags.DEFINE_float("weight_decay", 0.5, "Decoupled weight decay of the weight-decay run (AdamW).")
    flags.DEFINE_float("gamma", 1.0, "JR weight of the JR run.")
    flags.DEFINE_integer("budget", 12, "Solver steps at which residuals are read (the trained limit).")
    flags.DEFINE_integer("examples", 64, "Evaluation examples measured per checkpoint.")
    flags.DEFINE_integer("power_iters", 50, "Power-method iterations for the spectral radius "
                         "(on digits, 50 agree with 200 to 0.5%).")


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
