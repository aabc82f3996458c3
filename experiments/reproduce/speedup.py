"""Training speed-up of JR at matched quality, measured as the paper measures it.

    python -m experiments.reproduce.speedup                        # digits, 3 settings x 3 seeds
    python -m experiments.reproduce.speedup --limits=12,18,24      # other no-JR limits
    python -m experiments.reproduce.speedup --runs=runs/a,...      # any finished run folders

The paper's speed-up (CIFAR-10: 93.1% with JR at 6 forward steps against 93.6% without JR
at 17; ImageNet: 14 against 27 steps, "roughly 2x") compares each model at the forward
step limit *it needs* for its quality, not both at the same limit. Here:

* a JR model (``--gamma``, default 1) trained at the lower limit ``--jr_limit`` (6);
* the unregularized model trained at each of ``--limits`` (12, the Quickstart limit, and
  18);

all on the shared digits runs (``runs.digits``: the Quickstart config, 500 steps of which
150 unrolled pretraining; forward tol 1e-3, backward limit 12 / tol 1e-4, budgets
evaluated 1..limit; only γ, the forward limit and the seed differ), once per ``--seeds``
seed, under ``--runs_dir`` (default ``runs/reproduce/digits``: the no-JR run at limit 12
is the one conditioning.py, budgets.py and convergence.py use).

**Matched quality**: the unregularized limit used for the verdict is the smallest of
``--limits`` whose final test accuracy is not worse than the JR model's by more than the
spread (``runs.separated``: |mean_a − mean_b| > sd_a + sd_b); every limit is reported.

**Time**: the runs' own ``summary.json`` (``train_time_s_by_mode``), which excludes
compilation and evaluation: the pretraining phase (unrolled, identical in all settings
since JR is off while pretraining and no solver runs, so its ratio shows the timing
noise), the DEQ phase, and their total. **Speed-up** = no-JR DEQ-phase time / JR DEQ-phase
time, one ratio per seed (seed k of one setting against seed k of the other: same data
split, initialization and batches), reported as mean ± sample standard deviation. In
this code the forward solver runs until every example of the batch reaches tol or the
limit, so a JR model at limit 6 against an unregularized one at 18 differs in the solver
work per step: that is the paper's mechanism. Times are only comparable when the runs
were trained one at a time on an otherwise idle machine.

Writes ``results.md``, ``results.json`` (every seed) and ``time.png`` (DEQ-phase time
against test accuracy, each seed a dot).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import deq_jax.train.cpu_flags as cpu_flags

if __name__ == "__main__":
    cpu_flags.apply()  # before jax's backend starts: the same XLA CPU flags as deq-jax-train

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from deq_jax.train.metrics import read  # noqa: E402
from experiments.reproduce import figures, runs  # noqa: E402

FLAGS = flags.FLAGS

SCALARS = ("final", "pretrain_s", "deq_s", "total_s", "deq_ms_per_step", "compile_s", "train_fwd_nfe",
           "train_bwd_nfe", "train_fwd_steps", "steps_at_limit", "steps_to_tol", "residual_at_limit", "jacobian",
           "deq_memory_mb")


def configs(size: str = "small", gamma: float = 1.0, jr_limit: int = 6, limits=(12, 18),
            train_steps: int | None = None) -> dict[str, dict]:
    """``{folder name: overrides}``: JR at ``jr_limit``, then no JR at each of ``limits``."""
    made = [runs.digits(size, gamma=gamma, limit=jr_limit, steps=train_steps)]
    made += [runs.digits(size, gamma=0.0, limit=limit, steps=train_steps) for limit in limits]
    return dict(made)


def collect(run_dir) -> dict:
    """A finished run's quality, training time per phase (compilation excluded) and the
    solver work of its DEQ-phase training steps."""
    numbers, s, c = runs.final_numbers(run_dir)
    by_mode = numbers["train_time_s_by_mode"]
    rows = [r for r in read(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train" and r["mode"] == "deq"]
    deq_steps = c.train.num_steps - c.train.pretrain_steps

    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        return float(np.mean(values)) if values else math.nan

    return numbers | {
        "run": str(run_dir),
        "gamma": c.jr.gamma,
        "regularized": numbers["label"] != "no reg.",
        "pretrain_s": by_mode.get("unrolled", 0.0),
        "deq_s": by_mode.get("deq", 0.0),
        "total_s": sum(by_mode.values()),
        "deq_ms_per_step": 1000 * by_mode.get("deq", 0.0) / max(deq_steps, 1),
        "compile_s": sum(numbers["compile_s"].values()),
        "train_fwd_nfe": mean("fwd_nfe"),
        "train_bwd_nfe": mean("bwd_nfe"),
        "train_fwd_steps": mean("fwd_steps"),
        "deq_memory_mb": numbers["step_memory_mb"].get("deq", math.nan),
    }


def combine(per_seed: list[dict]) -> dict:
    first = per_seed[0]
    return {
        **{k: first[k] for k in ("label", "data", "metric", "split", "limit", "tol", "gamma", "regularized")},
        "name": f"{first['label']}, limit {first['limit']}",
        "seeds": [r["seed"] for r in per_seed],
        "per_seed": [{k: r[k] for k in (*SCALARS, "seed", "run")} for r in per_seed],
        **runs.stats(per_seed, SCALARS),
    }


def _values(r, key):
    return [s[key] for s in r["per_seed"]]


def ratios(num: dict, den: dict, key: str) -> list[float]:
    """Per-seed ratios num[key] / den[key], seed k against seed k (common seeds only)."""
    den_by_seed = {s["seed"]: s[key] for s in den["per_seed"]}
    return [s[key] / den_by_seed[s["seed"]] for s in num["per_seed"] if s["seed"] in den_by_seed]


def reaches(candidate: dict, target: dict) -> bool:
    """True when ``candidate``'s final quality is not worse than ``target``'s by more than
    the spread (higher is better for accuracy, lower for bpc / perplexity / loss)."""
    a, b = _values(candidate, "final"), _values(target, "final")
    higher = candidate["metric"] == "accuracy"
    worse = (np.mean(a) < np.mean(b)) if higher else (np.mean(a) > np.mean(b))
    return not (worse and runs.separated(a, b))


def matched(jr: dict, plain: list[dict]) -> dict | None:
    """The unregularized setting with the smallest limit that reaches the JR model's
    quality within the spread, or None."""
    return next((p for p in sorted(plain, key=lambda p: p["limit"]) if reaches(p, jr)), None)


def plot(results: list[dict], out: Path) -> list[Path]:
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    scale = 100 if results[0]["metric"] == "accuracy" else 1
    for r in results:
        x, y = _values(r, "deq_s"), [scale * v for v in _values(r, "final")]
        (dots,) = ax.plot(x, y, "o", ms=5, alpha=0.6)
        ax.plot([np.mean(x)], [np.mean(y)], "*", ms=14, color=dots.get_color(), label=f"{r['name']} (mean)")
    ax.set(xlabel="DEQ-phase training time (s, compilation excluded)",
           ylabel=f"{results[0]['split']} {results[0]['metric']}" + (" (%)" if scale == 100 else ""),
           title="Time and quality per setting (dots: seeds; stars: means)")
    ax.legend(fontsize=8)
    return [figures.save(fig, out / "time.png")]


def table(results: list[dict]) -> list[str]:
    r0 = results[0]
    quality = "%" if r0["metric"] == "accuracy" else ".3f"
    cols = (("final", f"{r0['split']} {r0['metric']}", quality),
            ("train_fwd_nfe", "fwd NFE per DEQ step (train)", ".2f"), ("train_bwd_nfe", "bwd NFE", ".2f"),
            ("steps_to_tol", f"eval steps to tol {r0['tol']:g}", ".1f"), ("pretrain_s", "pretraining (s)", ".1f"),
            ("deq_s", "DEQ phase (s)", ".1f"), ("total_s", "total (s)", ".1f"),
            ("deq_ms_per_step", "ms per DEQ step", ".0f"), ("compile_s", "compile (s, excluded)", ".0f"),
            ("deq_memory_mb", "DEQ step memory (MiB)", ".1f"))
    return [
        "Mean ± sample standard deviation over seeds. Times exclude compilation and evaluation; NFE: the solver "
        "loop's f (forward) and VJP (backward) evaluations per training step, DEQ phase:",
        "",
        "| setting | seeds | " + " | ".join(name for _, name, _ in cols) + " |",
        "|---|---|" + "---|" * len(cols),
        *[f"| {r['name']} | {len(r['seeds'])} | " + " | ".join(runs.pm(_values(r, k), fmt) for k, _, fmt in cols)
          + " |" for r in results],
    ]


def speedups(jr: dict, plain: list[dict]) -> tuple[list[str], dict]:
    """Per-limit ratio lines and the verdict; returns ``(lines, numbers for results.json)``."""
    quality = "%" if jr["metric"] == "accuracy" else ".3f"
    lines = ["", runs.RULE, "",
             f"Each unregularized limit against {jr['name']} (ratios seed by seed: no JR / JR):", "",
             "| no-JR setting | quality reached? | DEQ-phase speed-up | pretraining ratio | total speed-up |",
             "|---|---|---|---|---|"]
    numbers = {}
    for p in sorted(plain, key=lambda p: p["limit"]):
        ok = reaches(p, jr)
        numbers[p["limit"]] = {
            "reaches_jr_quality": ok,
            **{f"{k}_ratio": ratios(p, jr, k) for k in ("deq_s", "pretrain_s", "total_s")},
        }
        cells = [runs.pm(numbers[p["limit"]][f"{k}_ratio"], ".2f") + "×" for k in ("deq_s", "pretrain_s", "total_s")]
        lines.append(f"| {p['name']} | {'yes' if ok else 'no'} | " + " | ".join(cells) + " |")
    lines += [""]
    for p in sorted(plain, key=lambda p: p["limit"]):
        lines.append(runs.compare_line(f"final {jr['metric']}", jr["name"], _values(jr, "final"), p["name"],
                                       _values(p, "final"), quality))
        lines.append(runs.compare_line("DEQ-phase time (s)", jr["name"], _values(jr, "deq_s"), p["name"],
                                       _values(p, "deq_s"), ".1f"))
    match = matched(jr, plain)
    lines.append("")
    if match is None:
        worst = max(plain, key=lambda p: p["limit"])
        r = ratios(worst, jr, "deq_s")
        verdict = (f"**Verdict: no unregularized limit among {sorted(p['limit'] for p in plain)} reached the JR "
                   f"model's {jr['metric']} within the spread**, so there is no matched-quality speed-up to report; "
                   f"against the largest limit ({worst['limit']}) the DEQ-phase speed-up is {runs.pm(r, '.2f')}×, a "
                   "lower bound if a larger limit only costs more time.")
    else:
        r = ratios(match, jr, "deq_s")
        mean, sd = runs.spread(r)
        if math.isfinite(sd) and abs(mean - 1) > sd:
            how = "JR trains faster" if mean > 1 else "JR trains slower"
            how = f"{how} (the ratio differs from 1 by more than its spread)"
        elif math.isfinite(sd):
            how = "no difference beyond the spread (the ratio is within one sd of 1)"
        else:
            how = "spread unknown (one seed)"
        verdict = (f"**Verdict: speed-up at matched quality = {runs.pm(r, '.2f')}×** (DEQ phase, "
                   f"{match['name']} / {jr['name']}; total {runs.pm(ratios(match, jr, 'total_s'), '.2f')}×): {how}.")
    lines.append(verdict)
    return lines, {"matched_limit": None if match is None else match["limit"], "by_limit": numbers,
                   "verdict": verdict}


def run(out: str, run_dirs=(), size: str = "small", gamma: float = 1.0, jr_limit: int = 6, limits=(12, 18), *,
        seeds=runs.DEFAULT_SEEDS, runs_dir: str | None = None, train_steps: int | None = None) -> dict:
    """Returns ``{"settings": [combined results], "speedup": {...}}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not run_dirs:
        runs_dir = runs_dir or runs.digits_runs_dir(size, train_steps)
        run_dirs = runs.train_runs(runs_dir, runs.seeded(configs(size, gamma, jr_limit, limits, train_steps), seeds))
    results = [combine([collect(r) for r in members]) for members in runs.group_runs(run_dirs).values()]
    regularized = [r for r in results if r["regularized"]]
    plain = [r for r in results if not r["regularized"]]
    if len(regularized) != 1 or not plain:
        raise ValueError(f"need one JR setting and at least one unregularized one, got "
                         f"{[r['name'] for r in results]}")
    jr = regularized[0]
    lines, numbers = speedups(jr, plain)
    paths = plot(results, out)
    body = ["Seeds: " + "; ".join(f"{r['name']} {r['seeds']}" for r in results) + ".", "", *table(results), *lines]
    heading = f"Training speed-up of JR at matched quality ({jr['data']})"
    saved = {"settings": results, "speedup": numbers}
    figures.write_results(out, heading, body, paths, saved)
    return saved


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    saved = run(FLAGS.out, FLAGS.runs, FLAGS.size, FLAGS.gamma, FLAGS.jr_limit, tuple(int(x) for x in FLAGS.limits),
                seeds=runs.parse_seeds(FLAGS.seeds), runs_dir=FLAGS.runs_dir, train_steps=FLAGS.train_steps)
    print(saved["speedup"]["verdict"])
    print(f"wrote {FLAGS.out}/results.md, time.png")


def define_flags():
    """The command-line flags (defined on demand: importing this module defines none)."""
    flags.DEFINE_string("out", "results/speedup", "Results folder.")
    flags.DEFINE_list("runs", [], "Finished run folders, grouped by config without the seed: one JR setting and "
                      "unregularized ones (default: the shared digits runs).")
    flags.DEFINE_string("runs_dir", None, "Folder of the shared digits runs (default runs/reproduce/digits, "
                        "_large for --size=large).")
    flags.DEFINE_enum("size", "small", list(runs.DIGITS_LENGTH),
                      "Digits runs made here: 500 (small, the Quickstart) or 2000 (large) steps.")
    flags.DEFINE_float("gamma", 1.0, "JR weight of the JR model.")
    flags.DEFINE_integer("jr_limit", 6, "Forward step limit the JR model is trained at.")
    flags.DEFINE_list("limits", ["12", "18"], "Forward step limits the unregularized model is trained at.")
    flags.DEFINE_string("seeds", "0,1,2", "Seeds, comma-separated: each setting is trained once per seed.")
    flags.DEFINE_integer("train_steps", None, "Train the runs for this many steps instead (a quick check; own "
                         "runs folder).")


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
