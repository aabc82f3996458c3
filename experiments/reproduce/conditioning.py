"""How well-conditioned the equilibrium stays over training: no regularization, weight
decay, and JR (paper Figure 10a, 10b, 10c), over several seeds.

    python -m experiments.reproduce.conditioning                        # shared digits runs, 3 seeds
    python -m experiments.reproduce.conditioning --size=large           # 2000 steps per run
    python -m experiments.reproduce.conditioning --data=pydoc           # DEQ-Transformer runs
    python -m experiments.reproduce.conditioning --runs=runs/a,runs/b   # any runs with several checkpoints

Without ``--runs`` it trains (or reuses) three settings once per ``--seeds`` seed: no
regularization (``jr.gamma=0``), decoupled weight decay (``optim.weight_decay``,
``--weight_decay``) and JR (``--gamma``, from the DEQ phase on: no JR while pretraining, the
paper's CIFAR-10 protocol); ``--pretrain_gamma`` adds JR that also applies while pretraining
(the official ImageNet protocol). On digits these are the shared runs of
``runs.digits`` (the Quickstart config, a checkpoint every 50 steps, all kept) under
``--runs_dir`` (default ``runs/reproduce/digits``), the same runs budgets.py,
convergence.py and speedup.py use; with ``--data=pydoc`` the ``lm_pydoc``
DEQ-Transformer (checkpoints every 100 steps) under ``runs/reproduce/pydoc``. Then, at
every checkpoint of every run, on the first ``--examples`` evaluation examples
(:mod:`experiments.reproduce.measure`):

* the backward (adjoint) solve's relative residual after ``--budget`` steps (Figure 10a);
* the forward solve's relative residual after ``--budget`` steps, against the Jacobian
  norm (Figure 10b);
* ||J_f(z*)||_F^2 / d (Hutchinson, 8 probes) and the spectral radius rho(J_f(z*)) from
  the power method (Figure 10c), with the parameter norm ||theta||_2 beside them, so
  that one can see what weight decay did to the weights.

Tables give the mean ± the sample standard deviation over seeds (every seed's curves in
``results.json``); figures the mean with each seed as a thin line. Writes ``results.md``,
``results.json``, ``backward.png``, ``residual_vs_jacobian.png``, ``jacobian.png``. Run
folders given with ``--runs`` are grouped by their config without the seed, and their
own checkpoints are used as they are: train them with
``--config.train.keep_checkpoints=1000`` and a ``checkpoint_every`` that gives a curve.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import deq_jax.train.cpu_flags as cpu_flags

if __name__ == "__main__":
    cpu_flags.apply()  # before jax's backend starts: the same XLA CPU flags as deq-jax-train

import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from deq_jax.configs import lm_pydoc  # noqa: E402
from deq_jax.train import checkpoint  # noqa: E402
from deq_jax.train.sampling import open_run  # noqa: E402
from experiments.reproduce import figures, measure, runs  # noqa: E402

FLAGS = flags.FLAGS

PYDOC_LENGTH = {  # size -> training length and checkpoint interval of the pydoc runs made here
    "small": {"num_steps": 1500, "pretrain_steps": 200, "checkpoint_every": 100},
    "large": {"num_steps": 6000, "pretrain_steps": 800, "checkpoint_every": 250},
}


def configs(size: str, weight_decay: float, gamma: float, data: str = "digits",
            train_steps: int | None = None, pretrain_gamma: float = 0.0) -> dict[str, dict]:
    """The three settings ``{folder name: overrides}``: the shared digits runs, or
    ``lm_pydoc`` runs (``train_steps``: a quick check at that length). With
    ``pretrain_gamma`` > 0 (digits), a fourth: JR also during pretraining with that weight."""
    if data == "digits":
        made = [runs.digits(size, gamma=g, weight_decay=wd, steps=train_steps)
                for g, wd in ((0.0, 0.0), (0.0, weight_decay), (gamma, 0.0))]
        if pretrain_gamma:
            made.append(runs.digits(size, gamma=gamma, steps=train_steps, jr={"pretrain_gamma": pretrain_gamma}))
        return dict(made)
    if train_steps is None:
        length = PYDOC_LENGTH[size] | {"keep_checkpoints": 1000, "eval_every": PYDOC_LENGTH[size]["num_steps"]}
    else:
        length = runs.digits_length(size, train_steps)
    base = runs.merge(lm_pydoc.get_config().to_dict(), {"train": length, "eval": {"budgets": "12"}})
    return {
        "no_reg": runs.merge(base, {"jr": {"gamma": 0.0}}),
        "weight_decay": runs.merge(base, {"jr": {"gamma": 0.0}, "optim": {"weight_decay": weight_decay}}),
        "jr": runs.merge(base, {"jr": {"gamma": gamma}}),
    }


def runs_dir_for(data: str, size: str, train_steps: int | None = None) -> str:
    """Default folder of the runs made here."""
    if data == "digits":
        return runs.digits_runs_dir(size, train_steps)
    return "runs/reproduce/pydoc" + ("_large" if size == "large" else "") + (
        f"_steps{train_steps}" if train_steps else "")


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
        "run": str(run_dir),
        "seed": c.seed,
        "label": runs.label(c),
        "data": task.name,
        "pretrain_steps": c.train.pretrain_steps,
        "examples": int(m["forward"].shape[1]),
        "quality": {key: summary[f"{summary['eval_split']}_{key}"]} if key else {},
        "steps": steps,
        **curves,
    }


JAC = r"$\Vert J_f(z^\ast)\Vert_F^2\,/\,d$ (Hutchinson, 8 probes)"


def combine(per_seed: list[dict]) -> dict:
    """One setting over seeds: the checkpoints all its seeds have, each curve's mean and
    sample standard deviation per checkpoint (``sd``), and every seed's curves (``per_seed``)."""
    common = sorted(set.intersection(*(set(r["steps"]) for r in per_seed)))
    cut = [{k: [r[k][r["steps"].index(s)] for s in common] for k in CURVES} for r in per_seed]
    agg = runs.stats(cut, CURVES)
    first = per_seed[0]
    metric = next(iter(first["quality"]), None)
    return {
        "label": first["label"],
        "data": first["data"],
        "pretrain_steps": first["pretrain_steps"],
        "examples": first["examples"],
        "steps": common,
        "metric": metric,
        "quality": [r["quality"][metric] for r in per_seed] if metric else [],
        "seeds": [r["seed"] for r in per_seed],
        "per_seed": cut,
        **{k: agg["mean"][k] for k in CURVES},
        "sd": agg["sd"],
    }


def _pretraining(ax, results):
    end = max(r["pretrain_steps"] for r in results)
    if end > 0:
        ax.axvspan(0, end, color="0.9", zorder=0, label="pretraining (unrolled)")


def plot(results: list[dict], budget: int, out: Path) -> list[Path]:
    plt = figures.pyplot()
    paths = []
    note = "(mean over seeds; thin: each seed)"

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _pretraining(ax, results)
    for r in results:
        figures.seed_lines(ax, r["steps"], [s["backward"] for s in r["per_seed"]], r["label"], log=True, marker="o")
    ax.set(xlabel="training step", ylabel=f"backward relative residual after {budget} steps",
           title=f"Backward (adjoint) solve at a fixed budget over training (Fig. 10a)\n{note}")
    ax.legend(fontsize=8)
    paths.append(figures.save(fig, out / "backward.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        deq = [i for i, s in enumerate(r["steps"]) if s > r["pretrain_steps"]] or list(range(len(r["steps"])))
        x, y = np.array(r["frobenius"])[deq], np.array(r["forward"])[deq]
        (line,) = ax.semilogy(x, y, marker="o", ms=3, lw=1.2, label=r["label"])
        for s in r["per_seed"]:
            ax.semilogy(np.array(s["frobenius"])[deq], np.array(s["forward"])[deq], lw=0.5, alpha=0.45,
                        color=line.get_color())
        ax.semilogy(x[-1:], y[-1:], marker="*", ms=12, color=line.get_color(), ls="none")
    ax.plot([], [], marker="*", ms=10, color="0.3", ls="none", label="last checkpoint")
    ax.set(xlabel=JAC, ylabel=f"forward relative residual after {budget} steps",
           title=f"Forward residual vs Jacobian norm over training (Fig. 10b)\n{note}")
    ax.legend(fontsize=8)
    paths.append(figures.save(fig, out / "residual_vs_jacobian.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    _pretraining(left, results)
    _pretraining(right, results)
    for r in results:
        figures.seed_lines(left, r["steps"], [s["frobenius"] for s in r["per_seed"]], r["label"], log=True,
                           marker="o")
        color = figures.seed_lines(right, r["steps"], [s["spectral_radius"] for s in r["per_seed"]],
                                   f"{r['label']}: mean", marker="o")
        right.plot(r["steps"], r["spectral_radius_max"], ls="--", lw=0.8, color=color,
                   label=f"{r['label']}: max over examples")
    right.axhline(1.0, color="k", lw=0.8, ls=":", label="ρ = 1 (critical stability)")
    left.set(xlabel="training step", ylabel=JAC,
             title=f"Frobenius norm of the Jacobian over training (Fig. 10c)\n{note}")
    right.set(xlabel="training step", ylabel=r"spectral radius $\rho(J_f(z^\ast))$ (power method)",
              title=f"Spectral radius of the Jacobian over training\n{note}")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    paths.append(figures.save(fig, out / "jacobian.png"))
    return paths


def _first_deq(r):
    return next((i for i, s in enumerate(r["steps"]) if s > r["pretrain_steps"]), 0)


COLUMNS = (("frobenius", "‖J‖²_F/d", ".3f"), ("spectral_radius", "ρ mean", ".3f"),
           ("spectral_radius_max", "ρ max", ".3f"), ("forward", "fwd res.@{budget}", ".1e"),
           ("backward", "bwd res.@{budget}", ".1e"), ("param_norm", "‖θ‖₂", ".1f"))


def _column(r, key, i):
    return [s[key][i] for s in r["per_seed"]]


def _quality(r):
    if not r["metric"]:
        return "–"
    return f"{r['metric']} " + runs.pm(r["quality"], "%" if r["metric"] == "accuracy" else ".3f")


def table(results: list[dict], budget: int) -> list[str]:
    cols = [(k, name.format(budget=budget), fmt) for k, name, fmt in COLUMNS]
    lines = [
        "First DEQ-mode checkpoint → last checkpoint, mean ± sample standard deviation over seeds:",
        "",
        "| run | seeds | quality | " + " | ".join(name for _, name, _ in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for r in results:
        i = _first_deq(r)
        cells = [f"{runs.pm(_column(r, k, i), fmt)} → {runs.pm(_column(r, k, -1), fmt)}" for k, _, fmt in cols]
        lines.append(f"| {r['label']} | {len(r['seeds'])} | {_quality(r)} | " + " | ".join(cells) + " |")
    lines += ["", "Every checkpoint (mean ± sd over seeds):", "",
              "| run | step | " + " | ".join(name for _, name, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in results:
        for i, step in enumerate(r["steps"]):
            lines.append(f"| {r['label']} | {step} | " + " | ".join(runs.pm(_column(r, k, i), fmt)
                                                                     for k, _, fmt in cols) + " |")
    return lines


def verdicts(results: list[dict], budget: int) -> list[str]:
    """Lines comparing settings at the last checkpoint, and each setting's first DEQ-mode
    checkpoint with its last (growth over training), each with the spread rule."""
    plain = next((r for r in results if r["label"] == "no reg."), None)
    decay = next((r for r in results if r["label"].startswith("weight decay")), None)
    pairs = [(a, b) for a in results for b in (plain, decay) if b is not None and a is not b
             and not (a is plain and b is decay)]
    lines = ["", runs.RULE, "", "At the last checkpoint:", ""]
    for a, b in pairs:
        for key, what, fmt in (("backward", f"backward residual at {budget} steps (10a)", ".1e"),
                               ("forward", f"forward residual at {budget} steps (10b)", ".1e"),
                               ("frobenius", "‖J‖²_F/d (10c)", ".3f"),
                               ("spectral_radius", "mean spectral radius", ".3f")):
            lines.append(runs.compare_line(what, a["label"], _column(a, key, -1), b["label"], _column(b, key, -1),
                                           fmt))
        if a["metric"]:
            lines.append(runs.compare_line(f"final {a['metric']}", a["label"], a["quality"], b["label"],
                                           b["quality"], "%" if a["metric"] == "accuracy" else ".3f"))
    lines += ["", "Over the DEQ phase (first DEQ-mode checkpoint vs last):", ""]
    for r in results:
        i = _first_deq(r)
        for key, what, fmt in (("frobenius", "‖J‖²_F/d", ".3f"),
                               ("spectral_radius", "mean spectral radius", ".3f")):
            lines.append(runs.compare_line(f"{what} of {r['label']}", f"step {r['steps'][-1]}", _column(r, key, -1),
                                           f"step {r['steps'][i]}", _column(r, key, i), fmt))
    return lines


def run(out: str, run_dirs=(), size: str = "small", weight_decay: float = 0.5, gamma: float = 1.0,
        budget: int = 12, examples: int = 64, power_iters: int = 50, data: str = "digits", *,
        seeds=runs.DEFAULT_SEEDS, runs_dir: str | None = None, train_steps: int | None = None,
        pretrain_gamma: float = 0.0) -> list[dict]:
    """Returns one combined result per setting (see :func:`combine`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    given = bool(run_dirs)
    if not given:
        runs_dir = runs_dir or runs_dir_for(data, size, train_steps)
        settings = configs(size, weight_decay, gamma, data, train_steps, pretrain_gamma)
        run_dirs = runs.train_runs(runs_dir, runs.seeded(settings, seeds))
    t1 = time.perf_counter()
    results = [combine([analyse(r, budget, examples, power_iters) for r in members])
               for members in runs.group_runs(run_dirs).values()]
    t2 = time.perf_counter()
    paths = plot(results, budget, out)
    heading = (f"Conditioning of the equilibrium over training ({results[0]['data']}, first {results[0]['examples']} "
               f"evaluation examples, budget {budget} steps, power method {power_iters} iterations)")
    timing = [] if given else [f"training (of the runs not already finished in {runs_dir}) {t1 - t0:.0f} s"]
    seeds_line = "Seeds: " + "; ".join(f"{r['label']} {r['seeds']}" for r in results) + "."
    body = [seeds_line, "", *table(results, budget), *verdicts(results, budget), "",
            "Time: " + ", ".join([*timing, f"analysis {t2 - t1:.0f} s"]) + "."]
    figures.write_results(out, heading, body, paths, results)
    return results


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run(FLAGS.out, FLAGS.runs, FLAGS.size, FLAGS.weight_decay, FLAGS.gamma, FLAGS.budget, FLAGS.examples,
        FLAGS.power_iters, FLAGS.data, seeds=runs.parse_seeds(FLAGS.seeds), runs_dir=FLAGS.runs_dir,
        train_steps=FLAGS.train_steps, pretrain_gamma=FLAGS.pretrain_gamma)
    print(f"wrote {FLAGS.out}/results.md, backward.png, residual_vs_jacobian.png, jacobian.png")


def define_flags():
    """The command-line flags (defined on demand: importing this module defines none)."""
    flags.DEFINE_string("out", "results/conditioning", "Results folder.")
    flags.DEFINE_list("runs", [], "Run folders to analyse, grouped by config without the seed "
                      "(default: three settings, once per seed: no reg., weight decay, JR).")
    flags.DEFINE_string("runs_dir", None, "Folder of the runs made here (default runs/reproduce/digits, or "
                        "runs/reproduce/pydoc; _large for --size=large).")
    flags.DEFINE_string("seeds", "0,1,2", "Seeds, comma-separated: each setting is trained once per seed.")
    flags.DEFINE_integer("train_steps", None, "Train the runs for this many steps instead (a quick check; own "
                         "runs folder).")
    flags.DEFINE_enum("data", "digits", ["digits", "pydoc"], "Runs made here: digits MDEQ or pydoc DEQ-Transformer.")
    flags.DEFINE_enum("size", "small", ["small", "large"],
                      "Steps per run made here: digits 500 / 2000, pydoc 1500 / 6000.")
    flags.DEFINE_float("weight_decay", 0.5, "Decoupled weight decay of the weight-decay run (AdamW).")
    flags.DEFINE_float("gamma", 1.0, "JR weight of the JR run.")
    flags.DEFINE_float("pretrain_gamma", 0.0, "If > 0 (digits): a fourth setting, JR also during pretraining "
                       "with this weight (the official ImageNet protocol; the others have none, as the paper's "
                       "CIFAR-10 protocol).")
    flags.DEFINE_integer("budget", 12, "Solver steps at which residuals are read (the trained limit).")
    flags.DEFINE_integer("examples", 64, "Evaluation examples measured per checkpoint.")
    flags.DEFINE_integer("power_iters", 50, "Power-method iterations for the spectral radius "
                         "(on digits, 50 agree with 200 to 0.5%).")


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
