"""Quality at hard-stopped forward budgets for several JR weights (the paper's Table 3), over seeds.

    python -m experiments.reproduce.budgets                          # digits, γ 0/0.25/1/4, 3 seeds
    python -m experiments.reproduce.budgets --size=large             # 2000 steps per run
    python -m experiments.reproduce.budgets --gammas=0,0.5,2         # other weights
    python -m experiments.reproduce.budgets --runs=runs/a,runs/b     # any finished run folders

Without ``--runs`` it trains (or reuses) the shared digits runs (``runs.digits``: the
Quickstart config, 500 steps of which 150 pretraining; everything but γ and the seed
equal) once per ``--gammas`` value and ``--seeds`` seed, under ``--runs_dir`` (default
``runs/reproduce/digits``, shared with conditioning.py, convergence.py and speedup.py).
The numbers are the runs' own final evaluation (``eval.budgets``): the forward solver is
stopped after exactly k steps (or at tol 1e-3), k = 1..12, and the model is scored on the
whole evaluation split. Run folders given with ``--runs`` are grouped by their config
without the seed.

Writes ``results.md`` (mean ± sample standard deviation over seeds, and whether each
comparison with the first setting exceeds the spread), ``results.json`` (every seed),
``quality.png`` (quality vs budget) and ``residual.png`` (residual vs budget), the mean
with each seed as a thin line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import deq_jax.train.cpu_flags as cpu_flags

if __name__ == "__main__":
    cpu_flags.apply()  # before jax's backend starts: the same XLA CPU flags as deq-jax-train

from absl import app, flags, logging  # noqa: E402

from experiments.reproduce import figures, runs  # noqa: E402

FLAGS = flags.FLAGS

METRIC_NAMES = {"accuracy": "accuracy", "bpc": "bits per character", "perplexity": "perplexity"}
SCALARS = ("final", "steps_to_tol", "converged_to_tol", "residual_at_limit", "jacobian", "train_time_s")


def configs(size: str, gammas, train_steps: int | None = None) -> dict[str, dict]:
    """``{folder name: overrides}`` of the shared digits runs, one per γ."""
    return dict(runs.digits(size, gamma=g, steps=train_steps) for g in gammas)


def collect(run_dir) -> dict:
    """A finished run's final evaluation at every budget, and its solver statistics."""
    numbers, s, _ = runs.final_numbers(run_dir)
    if not s["budgets"]:
        raise ValueError(f"{run_dir} was trained without eval.budgets rows")
    budgets = sorted((int(b), v) for b, v in s["budgets"].items())
    return numbers | {
        "run": str(run_dir),
        "budgets": [b for b, _ in budgets],
        "quality": [v[numbers["metric"]] for _, v in budgets],
        "residual": [v["residual"] for _, v in budgets],
    }


def combine(per_seed: list[dict]) -> dict:
    """One setting over seeds: the budgets all seeds have, per-budget and scalar means
    and sample standard deviations, and every seed's numbers (``per_seed``)."""
    first = per_seed[0]
    budgets = sorted(set.intersection(*(set(r["budgets"]) for r in per_seed)))
    cut = [{"quality": [r["quality"][r["budgets"].index(b)] for b in budgets],
            "residual": [r["residual"][r["budgets"].index(b)] for b in budgets],
            **{k: r[k] for k in SCALARS}} for r in per_seed]
    agg = runs.stats(cut, ("quality", "residual", *SCALARS))
    return {
        "label": first["label"], "data": first["data"], "metric": first["metric"], "split": first["split"],
        "limit": first["limit"], "tol": first["tol"], "seeds": [r["seed"] for r in per_seed],
        "budgets": budgets, "per_seed": cut, "runs": [r["run"] for r in per_seed], **agg,
    }


def _fmt(metric):
    return "%" if metric == "accuracy" else ".3f"


def _values(r, key, budget=None):
    if budget is None:
        return [s[key] for s in r["per_seed"]]
    i = r["budgets"].index(budget)
    return [s[key][i] for s in r["per_seed"]]


def plot(results: list[dict], out: Path) -> list[Path]:
    plt = figures.pyplot()
    first = results[0]
    name = f"{first['split']} {METRIC_NAMES.get(first['metric'], first['metric'])}"
    paths = []
    for key, ylabel, title, log in (
        ("quality", name, "Quality when the forward solver is hard-stopped (Table 3)", False),
        ("residual", "mean relative residual ‖f(z)−z‖/‖f(z)‖ at the stop",
         "Forward residual when the solver is hard-stopped", True),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        scale = 100 if (key == "quality" and first["metric"] == "accuracy") else 1
        for r in results:
            figures.seed_lines(ax, r["budgets"], [[scale * v for v in s[key]] for s in r["per_seed"]],
                               f"{r['label']} ({len(r['seeds'])} seeds)", log=log, marker="o")
        if scale == 100:
            ylabel += " (%)"
        ax.set(xlabel="forward solver steps allowed (budget)", ylabel=ylabel,
               title=f"{title}\n(mean over seeds; thin: each seed)")
        ax.legend(fontsize=8)
        paths.append(figures.save(fig, out / f"{key}.png"))
    return paths


def table(results: list[dict]) -> list[str]:
    budgets = sorted({b for r in results for b in r["budgets"]})
    metric, tol = results[0]["metric"], results[0]["tol"]
    lines = [
        f"{METRIC_NAMES.get(metric, metric).capitalize()} on the {results[0]['split']} split at each forward budget "
        "(mean relative residual at the stop below it); mean ± sample standard deviation over seeds:",
        "",
        "| run | seeds | " + " | ".join(f"{b} steps" for b in budgets) + f" | steps to tol {tol:g} | reached tol | "
        "‖J‖²_F/d | train time (s) |",
        "|---|---|" + "---|" * (len(budgets) + 4),
    ]
    for r in results:
        cells = [f"{runs.pm(_values(r, 'quality', b), _fmt(metric))}<br>{runs.pm(_values(r, 'residual', b), '.1e')}"
                 if b in r["budgets"] else "–" for b in budgets]
        lines.append(
            f"| {r['label']} | {len(r['seeds'])} | " + " | ".join(cells)
            + f" | {runs.pm(_values(r, 'steps_to_tol'), '.1f')} | {runs.pm(_values(r, 'converged_to_tol'), '%')} | "
            f"{runs.pm(_values(r, 'jacobian'), '.3f')} | {runs.pm(_values(r, 'train_time_s'), '.0f')} |"
        )
    return lines


def verdicts(results: list[dict], small: int = 6) -> list[str]:
    """Every setting against the first (the unregularized one when γ = 0 comes first): quality
    and residual at ``small`` steps and at the limit, steps to tol; and the paper's Table 3
    point, the setting at ``small`` steps against the first at its full limit."""
    ref = results[0]
    metric = ref["metric"]
    lines = ["", runs.RULE, ""]
    for r in results[1:]:
        a, b = r["label"], ref["label"]
        for budget in sorted({small, r["limit"]}):
            if budget in r["budgets"] and budget in ref["budgets"]:
                lines.append(runs.compare_line(f"{metric} at {budget} steps", a, _values(r, "quality", budget), b,
                                               _values(ref, "quality", budget), _fmt(metric)))
                lines.append(runs.compare_line(f"residual at {budget} steps", a, _values(r, "residual", budget), b,
                                               _values(ref, "residual", budget), ".1e"))
        lines.append(runs.compare_line("steps to reach tol", a, _values(r, "steps_to_tol"), b,
                                       _values(ref, "steps_to_tol"), ".1f"))
        if small in r["budgets"] and ref["limit"] in ref["budgets"]:
            lines.append(runs.compare_line(f"{metric} (Table 3's point)", f"{a} at {small} steps",
                                           _values(r, "quality", small), f"{b} at its limit {ref['limit']}",
                                           _values(ref, "quality", ref["limit"]), _fmt(metric)))
    return lines


def run(out: str, run_dirs=(), size: str = "small", gammas=(0.0, 0.25, 1.0, 4.0), *, seeds=runs.DEFAULT_SEEDS,
        runs_dir: str | None = None, train_steps: int | None = None) -> list[dict]:
    """Returns one combined result per setting (see :func:`combine`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not run_dirs:
        runs_dir = runs_dir or runs.digits_runs_dir(size, train_steps)
        run_dirs = runs.train_runs(runs_dir, runs.seeded(configs(size, gammas, train_steps), seeds))
    results = [combine([collect(r) for r in members]) for members in runs.group_runs(run_dirs).values()]
    paths = plot(results, out)
    body = ["Seeds: " + "; ".join(f"{r['label']} {r['seeds']}" for r in results) + ".", "", *table(results),
            *verdicts(results)]
    figures.write_results(out, f"Hard-stopped forward budgets ({results[0]['data']})", body, paths, results)
    return results


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    gammas = tuple(float(g) for g in FLAGS.gammas)
    run(FLAGS.out, FLAGS.runs, FLAGS.size, gammas, seeds=runs.parse_seeds(FLAGS.seeds), runs_dir=FLAGS.runs_dir,
        train_steps=FLAGS.train_steps)
    print(f"wrote {FLAGS.out}/results.md, quality.png, residual.png")


def define_flags():
    """The command-line flags (defined on demand: importing this module defines none)."""
    flags.DEFINE_string("out", "results/budgets", "Results folder.")
    flags.DEFINE_list("runs", [], "Finished run folders, grouped by config without the seed (default: the "
                      "shared digits runs, one setting per gamma).")
    flags.DEFINE_string("runs_dir", None, "Folder of the shared digits runs (default runs/reproduce/digits, "
                        "_large for --size=large).")
    flags.DEFINE_enum("size", "small", list(runs.DIGITS_LENGTH),
                      "Digits runs made here: 500 (small, the Quickstart) or 2000 (large) steps.")
    flags.DEFINE_list("gammas", ["0", "0.25", "1", "4"], "JR weights, one digits setting each (the first is the "
                      "reference of the comparisons).")
    flags.DEFINE_string("seeds", "0,1,2", "Seeds, comma-separated: each setting is trained once per seed.")
    flags.DEFINE_integer("train_steps", None, "Train the runs for this many steps instead (a quick check; own "
                         "runs folder).")


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
