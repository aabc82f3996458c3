"""Quality at hard-stopped forward budgets for several JR weights (the paper's Table 3).

    python -m experiments.reproduce.budgets                          # digits, γ 0/0.25/1/4, ~12 min
    python -m experiments.reproduce.budgets --size=large             # 2000 steps per run
    python -m experiments.reproduce.budgets --gammas=0,0.5,2         # other weights
    python -m experiments.reproduce.budgets --runs=runs/a,runs/b     # any finished run folders

Without ``--runs`` it trains the digits MDEQ once per ``--gammas`` value (Quickstart
config, everything else equal; small: 300 steps of which 100 pretraining) into
``<out>/runs``. The numbers are the runs' own final evaluation (``eval.budgets``): the
forward solver is stopped after exactly k steps (or at tol 1e-3), k = 1..12, and the
model is scored on the whole evaluation split. Writes ``results.md``, ``results.json``,
``quality.png`` (quality vs budget) and ``residual.png`` (residual vs budget).
"""

from __future__ import annotations

import sys
from pathlib import Path

import experiments.cpu_flags as cpu_flags

if __name__ == "__main__":
    cpu_flags.apply()  # before jax is imported: the same XLA CPU flags as experiments.train

from absl import app, flags, logging  # noqa: E402

from experiments.reproduce import figures, runs  # noqa: E402

FLAGS = flags.FLAGS

METRIC_NAMES = {"accuracy": "accuracy", "bpc": "bits per character", "perplexity": "perplexity"}


def configs(size: str, gammas) -> dict[str, dict]:
    train = runs.DIGITS_SIZES[size]
    return {f"gamma_{g:g}": {"jr": {"gamma": g}, "train": train, "eval": {"budgets": "all"}} for g in gammas}


def collect(run_dir) -> dict:
    """A finished run's final evaluation at every budget, and its solver statistics."""
    numbers, s, _ = runs.final_numbers(run_dir)
    if not s["budgets"]:
        raise ValueError(f"{run_dir} was trained without eval.budgets rows")
    budgets = sorted((int(b), v) for b, v in s["budgets"].items())
    return numbers | {
        "budgets": [b for b, _ in budgets],
        "quality": [v[numbers["metric"]] for _, v in budgets],
        "residual": [v["residual"] for _, v in budgets],
    }


def _fmt(metric, value):
    return f"{value:.1%}" if metric == "accuracy" else f"{value:.3f}"


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
        for r in results:
            values = [100 * v for v in r[key]] if (key == "quality" and r["metric"] == "accuracy") else r[key]
            (ax.semilogy if log else ax.plot)(r["budgets"], values, marker="o", ms=4, label=r["label"])
        if key == "quality" and first["metric"] == "accuracy":
            ylabel += " (%)"
        ax.set(xlabel="forward solver steps allowed (budget)", ylabel=ylabel, title=title)
        ax.legend(fontsize=8)
        paths.append(figures.save(fig, out / f"{key}.png"))
    return paths


def table(results: list[dict]) -> list[str]:
    budgets = sorted({b for r in results for b in r["budgets"]})
    metric, tol = results[0]["metric"], results[0]["tol"]
    lines = [
        f"{METRIC_NAMES.get(metric, metric).capitalize()} on the {results[0]['split']} split at each forward budget "
        "(mean relative residual at the stop below it):",
        "",
        "| run | " + " | ".join(f"{b} steps" for b in budgets) + f" | steps to tol {tol:g} | reached tol | "
        "‖J‖²_F/d | train time |",
        "|---|" + "---|" * (len(budgets) + 4),
    ]
    for r in results:
        by_budget = dict(zip(r["budgets"], zip(r["quality"], r["residual"], strict=True), strict=True))
        cells = [
            f"{_fmt(metric, by_budget[b][0])}<br>{by_budget[b][1]:.1e}" if b in by_budget else "–" for b in budgets
        ]
        lines.append(
            f"| {r['label']} | " + " | ".join(cells) + f" | {r['steps_to_tol']:.1f} | {r['converged_to_tol']:.0%} | "
            f"{r['jacobian']:.3f} | {r['train_time_s']:.0f} s |"
        )
    return lines


def run(out: str, run_dirs=(), size: str = "small", gammas=(0.0, 0.25, 1.0, 4.0)) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_dirs = [Path(r) for r in run_dirs] or runs.train_runs(out / "runs", configs(size, gammas))
    results = [collect(r) for r in run_dirs]
    paths = plot(results, out)
    figures.write_results(out, f"Hard-stopped forward budgets ({results[0]['data']})", table(results), paths, results)
    return results


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    gammas = tuple(float(g) for g in FLAGS.gammas)
    run(FLAGS.out, FLAGS.runs, FLAGS.size, gammas)
    print(f"wrote {FLAGS.out}/results.md, quality.png, residual.png")


def define_flags():
    """The command-line flags (defined on demand: importing this module defines none)."""
    flags.DEFINE_string("out", "results/budgets", "Results folder.")
    flags.DEFINE_list("runs", [], "Finished run folders (default: train digits once per gamma).")
    flags.DEFINE_enum("size", "small", list(runs.DIGITS_SIZES),
                      "Digits runs made here: 300 (small) or 2000 (large) steps.")
    flags.DEFINE_list("gammas", ["0", "0.25", "1", "4"], "JR weights, one digits run each.")


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
