"""The JR weight's schedules side by side: constant, staircase and adaptive γ on the same model.

    python -m experiments.reproduce.schedules                        # digits, 3 settings x 3 seeds
    python -m experiments.reproduce.schedules --size=large           # 2000 steps per run
    python -m experiments.reproduce.schedules --runs=runs/a,runs/b   # any finished run folders

Without ``--runs`` it trains (or reuses) three settings of the shared digits runs
(``runs.digits``: the Quickstart config, 500 steps of which 150 pretraining) once per
``--seeds`` seed, under ``--runs_dir`` (default ``runs/reproduce/digits``), all starting
from γ0 = ``--gamma0``:

* ``constant``: γ = γ0 throughout;
* ``staircase`` (the official code's "jac_incremental"): γ0 + 0.1 every fifth of the DEQ
  phase, so γ0 + 0.4 by the end;
* ``adaptive`` (ours, :mod:`deq_jax.train.schedules`): γ × 1.05 per step while the moving
  average of the training batches' forward residual is above ``--target_residual``,
  γ × 0.98 per step while it is below. Its step criterion is switched off (target 1000
  steps): at tol 1e-3 every batch spends its whole 12-step budget, so any step target at
  or below the limit would only ever raise γ.

Reports final quality, solver steps, residual at the limit, Jacobian norm, final γ and
train time as mean ± sample standard deviation over seeds, and whether the staircase and
adaptive schedules differ from the constant one by more than the spread; figures:
``gamma.png`` (γ over training) and ``train_residual.png`` (the training batches' forward
residual over training), the mean with each seed as a thin line. Writes ``results.md``
and ``results.json`` (every seed). Run folders given with ``--runs`` are grouped by their
config without the seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import deq_jax.train.cpu_flags as cpu_flags

if __name__ == "__main__":
    cpu_flags.apply()  # before jax's backend starts: the same XLA CPU flags as deq-jax-train

from absl import app, flags, logging  # noqa: E402

from deq_jax.train.metrics import read  # noqa: E402
from experiments.reproduce import figures, runs  # noqa: E402

FLAGS = flags.FLAGS

# A step target no batch reaches: only the residual drives the adaptive schedule. (Broyden
# does not reach tol 1e-3 within the 12-step limit here, so a target at or below the
# limit would count every batch as over it and drive gamma to its cap.)
STEP_CRITERION_OFF = 1000.0


def configs(size: str, gamma0: float, target_residual: float, train_steps: int | None = None) -> dict[str, dict]:
    """``{folder name: overrides}`` of the three schedules (shared digits registry)."""
    length = runs.digits_length(size, train_steps)
    every = max((length["num_steps"] - length["pretrain_steps"]) // 5, 1)
    return dict([
        runs.digits(size, gamma=gamma0, steps=train_steps),
        runs.digits(size, gamma=gamma0, steps=train_steps,
                    jr={"schedule": "staircase", "staircase_delta": 0.1, "staircase_every": every}),
        runs.digits(size, gamma=gamma0, steps=train_steps,
                    jr={"schedule": "adaptive", "target_steps": STEP_CRITERION_OFF,
                        "target_residual": target_residual}),
    ])


SCALARS = ("final", "steps_at_limit", "steps_to_tol", "converged_to_tol", "residual_at_limit", "jacobian",
           "final_gamma", "train_time_s")


def collect(run_dir) -> dict:
    """A finished run's final numbers and its training curves of γ and forward residual."""
    numbers, _, c = runs.final_numbers(run_dir)
    rows = [r for r in read(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"]
    return numbers | {
        "run": str(run_dir),
        "target_residual": c.jr.target_residual if c.jr.schedule == "adaptive" else None,
        "train_steps": [r["step"] for r in rows],
        "gamma": [r["gamma"] for r in rows],
        "train_residual": [r["fwd_residual"] for r in rows],
        "final_gamma": rows[-1]["gamma"],
    }


def combine(per_seed: list[dict]) -> dict:
    """One setting over seeds: scalar means and sample standard deviations, and every
    seed's numbers and curves (``per_seed``)."""
    first = per_seed[0]
    return {
        **{k: first[k] for k in ("label", "data", "metric", "split", "limit", "pretrain_steps", "target_residual",
                                 "train_steps")},
        "seeds": [r["seed"] for r in per_seed],
        "per_seed": [{k: r[k] for k in (*SCALARS, "gamma", "train_residual", "train_steps", "run")} for r in per_seed],
        **runs.stats(per_seed, SCALARS),
    }


def _values(r, key):
    return [s[key] for s in r["per_seed"]]


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
            color = figures.seed_lines(ax, r["train_steps"], [s[key] for s in r["per_seed"]],
                                       f"{r['label']} ({len(r['seeds'])} seeds)", log=log)
            if key == "train_residual" and r["target_residual"] is not None:
                ax.axhline(r["target_residual"], color=color, ls=":", lw=1, label=f"{r['label']}: target")
        ax.set(xlabel="training step", ylabel=ylabel, title=f"{title}\n(mean over seeds; thin: each seed)")
        ax.legend(fontsize=8)
        paths.append(figures.save(fig, out / f"{key}.png"))
    return paths


def table(results: list[dict]) -> list[str]:
    r0 = results[0]
    quality = "%" if r0["metric"] == "accuracy" else ".3f"
    cols = (("final", f"{r0['split']} {r0['metric']}", quality), ("steps_at_limit", f"steps at limit {r0['limit']}",
            ".2f"), ("steps_to_tol", "steps to tol", ".1f"), ("converged_to_tol", "reached tol", "%"),
            ("residual_at_limit", "residual at limit", ".1e"), ("jacobian", "‖J‖²_F/d", ".3f"),
            ("final_gamma", "final γ", ".2f"), ("train_time_s", "train time (s)", ".0f"))
    lines = [
        "Mean ± sample standard deviation over seeds:",
        "",
        "| run | seeds | " + " | ".join(name for _, name, _ in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in results:
        lines.append(f"| {r['label']} | {len(r['seeds'])} | "
                     + " | ".join(runs.pm(_values(r, k), fmt) for k, _, fmt in cols) + " |")
    lines += ["", runs.RULE, ""]
    ref = r0
    for r in results[1:]:
        for key, what, fmt in (("final", f"final {r0['metric']}", quality),
                               ("residual_at_limit", "residual at the limit", ".1e"),
                               ("steps_to_tol", "steps to reach tol", ".1f"), ("jacobian", "‖J‖²_F/d", ".3f")):
            lines.append(runs.compare_line(what, r["label"], _values(r, key), ref["label"], _values(ref, key), fmt))
    return lines


def run(out: str, run_dirs=(), size: str = "small", gamma0: float = 0.5, target_residual: float = 3e-2, *,
        seeds=runs.DEFAULT_SEEDS, runs_dir: str | None = None, train_steps: int | None = None) -> list[dict]:
    """Returns one combined result per setting (see :func:`combine`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not run_dirs:
        runs_dir = runs_dir or runs.digits_runs_dir(size, train_steps)
        run_dirs = runs.train_runs(runs_dir, runs.seeded(configs(size, gamma0, target_residual, train_steps), seeds))
    results = [combine([collect(r) for r in members]) for members in runs.group_runs(run_dirs).values()]
    paths = plot(results, out)
    body = ["Seeds: " + "; ".join(f"{r['label']} {r['seeds']}" for r in results) + ".", "", *table(results)]
    figures.write_results(out, f"γ schedules ({results[0]['data']})", body, paths, results)
    return results


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run(FLAGS.out, FLAGS.runs, FLAGS.size, FLAGS.gamma0, FLAGS.target_residual,
        seeds=runs.parse_seeds(FLAGS.seeds), runs_dir=FLAGS.runs_dir, train_steps=FLAGS.train_steps)
    print(f"wrote {FLAGS.out}/results.md, gamma.png, train_residual.png")


def define_flags():
    """The command-line flags (defined on demand: importing this module defines none)."""
    flags.DEFINE_string("out", "results/schedules", "Results folder.")
    flags.DEFINE_list("runs", [], "Finished run folders, grouped by config without the seed (default: the "
                      "shared digits runs, one setting per schedule; the first is the reference).")
    flags.DEFINE_string("runs_dir", None, "Folder of the shared digits runs (default runs/reproduce/digits, "
                        "_large for --size=large).")
    flags.DEFINE_enum("size", "small", list(runs.DIGITS_LENGTH),
                      "Digits runs made here: 500 (small, the Quickstart) or 2000 (large) steps.")
    flags.DEFINE_string("seeds", "0,1,2", "Seeds, comma-separated: each setting is trained once per seed.")
    flags.DEFINE_integer("train_steps", None, "Train the runs for this many steps instead (a quick check; own "
                         "runs folder).")
    flags.DEFINE_float("gamma0", 0.5, "Starting γ of every schedule.")
    flags.DEFINE_float("target_residual", 3e-2, "The adaptive schedule's target forward residual.")


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
