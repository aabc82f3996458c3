"""Training speed-up of JR at matched quality, on the paper's protocol.

    python -m experiments.reproduce.speedup                          # digits: the sweep below, 3 seeds
    python -m experiments.reproduce.speedup --gammas="0.5:4;0.1:20" --seeds=0,1,2,3,4   # chosen γ, more seeds
    python -m experiments.reproduce.speedup --runs=runs/a/seed0,...  # any finished run folders

The paper's speed-up (CIFAR-10: 93.1% with JR at 6 forward steps against 93.6% without JR
at 17; ImageNet: 14 against 27 steps, "roughly 2x") compares each model at the step
limits *it needs*, and lets the JR model run with lower limits in both directions
(Table 4: CIFAR-10 7/8, JR on 5% of the steps). Here, on the shared digits runs
(``runs.digits``: the Quickstart config, 500 steps of which 150 unrolled pretraining,
forward tol 1e-3, backward tol 1e-4, solves that stop early once every example of the
batch has converged), with ``--validation`` (20%) of the training set held out:

* **JR arms**: forward limit ``--jr_limit`` (6), backward ``--jr_bwd_limit`` (8); the JR
  frequency p over ``--probs`` (the paper's 0.05, 0.1, 0.35 and the Quickstart's 0.5),
  and per p the weights γ = c / p for c in ``--grid`` (1, 2, 4: p·γ, the expected weight
  per step, around the Quickstart's 0.5 · 4 = 2), or ``--gammas`` given per p;
* **no-JR arms**: forward limits ``--limits`` (12, the Quickstart's, and 18), backward
  ``--bwd_limit`` (12); an item ``fwd/bwd`` sets both (``--limits=6/8,12,18``: also the
  JR arms' own limits without JR, the control for what the lower limits alone do).

Every limit is the configured one; training lowers the forward limit by U{0..2} on every
step (``forward.random_lower``), in every arm.

**Choosing γ** per p: the γ with the best mean *validation* accuracy at the arm's own
limit; the test set is never used to choose. **Matched quality**: for each chosen JR arm,
the smallest no-JR limit whose validation accuracy is not worse than the JR arm's by
either rule (unpaired: |mean_a − mean_b| > sd_a + sd_b; paired: the per-seed differences'
|mean| > their sd). Test accuracy is reported for every arm, with both rules.

**Time**: the runs' own ``summary.json`` (``train_time_s_by_mode``), which excludes
compilation and evaluation: the pretraining phase (no JR, no solver, the same in every
arm: its ratio shows the timing noise), the DEQ phase and the total. **Speed-up** = no-JR
DEQ-phase time / JR DEQ-phase time, one ratio per seed (seed k against seed k: the same
data split, initialization and batches), mean ± sample sd; the solver work per DEQ step
(f and VJP evaluations as the loops ran them, ``fwd_nfe`` / ``bwd_nfe``) is reported
beside it. Times are only comparable when the runs were trained one at a time on an
otherwise idle machine.

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

PROBS = (0.05, 0.1, 0.35, 0.5)
GRID = (1.0, 2.0, 4.0)  # p * gamma
SCALARS = ("final", "reported", "pretrain_s", "deq_s", "total_s", "deq_ms_per_step", "compile_s", "train_fwd_nfe",
           "train_bwd_nfe", "train_fwd_steps", "jr_share", "steps_at_limit", "steps_to_tol", "residual_at_limit",
           "jacobian", "deq_memory_mb")


def gammas_for(probs=PROBS, grid=GRID) -> dict[float, tuple[float, ...]]:
    """``{p: (c / p for c in grid)}``, rounded to 3 significant digits."""
    return {p: tuple(float(f"{c / p:.3g}") for c in grid) for p in probs}


def parse_gammas(text: str) -> dict[float, tuple[float, ...]]:
    """``"0.5:2,4;0.1:20"`` -> ``{0.5: (2.0, 4.0), 0.1: (20.0,)}``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        prob, _, values = part.partition(":")
        out[float(prob)] = tuple(float(v) for v in values.split(",") if v.strip())
        if not out[float(prob)] or not 0 < float(prob) <= 1:
            raise ValueError(f"--gammas needs 'p:γ,γ;p:γ' with p in (0, 1], got {text!r}")
    return out


def configs(size: str = "small", gammas: dict | None = None, jr_limit: int = 6, jr_bwd_limit: int = 8,
            limits=(12, 18), bwd_limit: int = 12, validation: float = 0.2,
            train_steps: int | None = None) -> dict[str, dict]:
    """``{folder name: overrides}``: every JR arm (``gammas``: ``{p: (γ, ...)}``, default
    :func:`gammas_for`), then the no-JR arm at each of ``limits``."""
    gammas = gammas_for() if gammas is None else gammas
    common = {"steps": train_steps, "validation": validation}
    made = [runs.digits(size, gamma=g, limit=jr_limit, bwd_limit=jr_bwd_limit, jr={"prob": p}, **common)
            for p, values in gammas.items() for g in values]
    made += [runs.digits(size, gamma=0.0, limit=fwd, bwd_limit=bwd, **common)
             for fwd, bwd in parse_limits(limits, bwd_limit)]
    return dict(made)


def parse_limits(limits, bwd_limit: int = 12) -> list[tuple[int, int]]:
    """No-JR limits as ``(forward, backward)`` pairs: each item an int (forward; backward
    ``bwd_limit``), a ``"fwd/bwd"`` string or a pair."""
    out = []
    for item in limits:
        if isinstance(item, str) and "/" in item:
            fwd, bwd = item.split("/")
            out.append((int(fwd), int(bwd)))
        elif isinstance(item, (tuple, list)):
            out.append((int(item[0]), int(item[1])))
        else:
            out.append((int(item), int(bwd_limit)))
    return out


def collect(run_dir) -> dict:
    """A finished run's quality (``final``: its evaluation split, the validation split when
    it has one; ``reported``: the test split, else the same), training time per phase
    (compilation excluded) and the solver work of its DEQ-phase training steps."""
    numbers, s, c = runs.final_numbers(run_dir)
    by_mode = numbers["train_time_s_by_mode"]
    rows = [r for r in read(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train" and r["mode"] == "deq"]
    deq_steps = c.train.num_steps - c.train.pretrain_steps
    key = numbers["metric"]
    reported = s.get(f"test_{key}", numbers["final"])

    def mean(name):
        values = [r[name] for r in rows if r.get(name) is not None and math.isfinite(r[name])]
        return float(np.mean(values)) if values else math.nan

    return numbers | {
        "run": str(run_dir),
        "gamma": c.jr.gamma,
        "prob": c.jr.prob,
        "bwd_limit": c.backward.max_steps,
        "regularized": numbers["label"] != "no reg.",
        "reported": reported,
        "reported_split": "test" if f"test_{key}" in s else numbers["split"],
        "pretrain_s": by_mode.get("unrolled", 0.0),
        "deq_s": by_mode.get("deq", 0.0),
        "total_s": sum(by_mode.values()),
        "deq_ms_per_step": 1000 * by_mode.get("deq", 0.0) / max(deq_steps, 1),
        "compile_s": sum(numbers["compile_s"].values()),
        "train_fwd_nfe": mean("fwd_nfe"),
        "train_bwd_nfe": mean("bwd_nfe"),
        "train_fwd_steps": mean("fwd_steps"),
        "jr_share": mean("jr_applied"),
        "deq_memory_mb": numbers["step_memory_mb"].get("deq", math.nan),
    }


def combine(per_seed: list[dict]) -> dict:
    first = per_seed[0]
    keys = ("label", "data", "metric", "split", "reported_split", "limit", "bwd_limit", "tol", "gamma", "prob",
            "regularized")
    name = (f"JR γ = {first['gamma']:g}, p = {first['prob']:g}" if first["regularized"] else first["label"])
    return {
        **{k: first[k] for k in keys},
        "name": f"{name}, limits {first['limit']}/{first['bwd_limit']}",
        "seeds": [r["seed"] for r in per_seed],
        "per_seed": [{k: r[k] for k in (*SCALARS, "seed", "run")} for r in per_seed],
        **runs.stats(per_seed, SCALARS),
    }


def _values(r, key):
    return [s[key] for s in r["per_seed"]]


def _by_seed(a: dict, b: dict, key: str) -> tuple[list, list]:
    """``a``'s and ``b``'s values of ``key`` on the seeds both have, seed by seed."""
    b_by_seed = {s["seed"]: s[key] for s in b["per_seed"]}
    pairs = [(s[key], b_by_seed[s["seed"]]) for s in a["per_seed"] if s["seed"] in b_by_seed]
    return [x for x, _ in pairs], [y for _, y in pairs]


def ratios(num: dict, den: dict, key: str) -> list[float]:
    """Per-seed ratios num[key] / den[key], seed k against seed k (common seeds only)."""
    a, b = _by_seed(num, den, key)
    return [x / y for x, y in zip(a, b)]


def _higher_is_better(r: dict) -> bool:
    return r["metric"] == "accuracy"


def worse(candidate: dict, target: dict, key: str = "final") -> bool:
    """True when ``candidate``'s ``key`` is worse than ``target``'s by the unpaired rule
    (:func:`runs.separated`) or the paired one (:func:`runs.paired_separated`, on the
    seeds both have)."""
    a, b = _values(candidate, key), _values(target, key)
    lower = (np.mean(a) < np.mean(b)) if _higher_is_better(candidate) else (np.mean(a) > np.mean(b))
    if not lower:
        return False
    pa, pb = _by_seed(candidate, target, key)
    return runs.separated(a, b) or runs.paired_separated(pa, pb)


def matched(jr: dict, plain: list[dict]) -> dict | None:
    """The unregularized setting with the smallest limit whose validation quality is not
    worse than the JR arm's by either rule (:func:`worse`), or None."""
    return next((p for p in sorted(plain, key=lambda p: p["limit"]) if not worse(p, jr)), None)


def choose(jr_settings: list[dict]) -> dict[float, dict]:
    """Per JR frequency p, the setting with the best mean validation quality (``final``);
    ties go to the smaller γ."""
    chosen = {}
    for r in sorted(jr_settings, key=lambda r: (r["prob"], r["gamma"])):
        best = chosen.get(r["prob"])
        sign = 1 if _higher_is_better(r) else -1
        if best is None or sign * r["mean"]["final"] > sign * best["mean"]["final"]:
            chosen[r["prob"]] = r
    return chosen


def plot(results: list[dict], out: Path) -> list[Path]:
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    scale = 100 if results[0]["metric"] == "accuracy" else 1
    for r in results:
        x, y = _values(r, "deq_s"), [scale * v for v in _values(r, "reported")]
        (dots,) = ax.plot(x, y, "o", ms=5, alpha=0.6)
        ax.plot([np.mean(x)], [np.mean(y)], "*", ms=14, color=dots.get_color(), label=f"{r['name']} (mean)")
    ax.set(xlabel="DEQ-phase training time (s, compilation excluded)",
           ylabel=f"{results[0]['reported_split']} {results[0]['metric']}" + (" (%)" if scale == 100 else ""),
           title="Time and quality: chosen JR arms and no JR (dots: seeds; stars: means)")
    ax.legend(fontsize=7)
    return [figures.save(fig, out / "time.png")]


def table(results: list[dict], chosen_names=()) -> list[str]:
    r0 = results[0]
    quality = "%" if r0["metric"] == "accuracy" else ".3f"
    cols = (("final", f"{r0['split']} {r0['metric']}", quality),
            ("reported", f"{r0['reported_split']} {r0['metric']}", quality),
            ("train_fwd_nfe", "fwd NFE per DEQ step", ".2f"), ("train_bwd_nfe", "bwd NFE", ".2f"),
            ("jr_share", "JR steps", ".2f"), ("steps_to_tol", f"eval steps to tol {r0['tol']:g}", ".1f"),
            ("pretrain_s", "pretraining (s)", ".1f"), ("deq_s", "DEQ phase (s)", ".1f"),
            ("deq_ms_per_step", "ms per DEQ step", ".0f"), ("deq_memory_mb", "DEQ step memory (MiB)", ".1f"))
    return [
        "| setting | seeds | " + " | ".join(name for _, name, _ in cols) + " |",
        "|---|---|" + "---|" * len(cols),
        *[f"| {'**' + r['name'] + '**' if r['name'] in chosen_names else r['name']} | {len(r['seeds'])} | "
          + " | ".join(runs.pm(_values(r, k), fmt) for k, _, fmt in cols) + " |" for r in results],
    ]


def _ratio_verdict(r: list[float]) -> str:
    mean, sd = runs.spread(r)
    if not math.isfinite(sd):
        return "spread unknown (one seed)"
    if abs(mean - 1) > sd:
        return (("JR trains faster" if mean > 1 else "JR trains slower")
                + " (the per-seed ratios differ from 1 by more than their sd)")
    return "no difference beyond the spread (the per-seed ratios are within one sd of 1)"


def speedups(chosen: dict[float, dict], plain: list[dict]) -> tuple[list[str], dict]:
    """Per chosen JR arm: the matched no-JR limit, the speed-up ratios and the verdict."""
    any_jr = next(iter(chosen.values()))
    quality = "%" if any_jr["metric"] == "accuracy" else ".3f"
    lines = ["", "Each chosen JR arm against each no-JR limit (ratios seed by seed: no JR / JR):", "",
             "| JR arm | no-JR setting | reaches JR's validation quality? | DEQ-phase speed-up | "
             "pretraining ratio | total speed-up |", "|---|---|---|---|---|---|"]
    numbers = {}
    for prob, jr in sorted(chosen.items()):
        entry = {"gamma": jr["gamma"], "name": jr["name"], "by_limit": {}}
        for p in sorted(plain, key=lambda p: p["limit"]):
            ok = not worse(p, jr)
            entry["by_limit"][p["limit"]] = {
                "reaches_jr_quality": ok,
                **{f"{k}_ratio": ratios(p, jr, k) for k in ("deq_s", "pretrain_s", "total_s")}}
            cells = [runs.pm(entry["by_limit"][p["limit"]][f"{k}_ratio"], ".2f") + "×"
                     for k in ("deq_s", "pretrain_s", "total_s")]
            lines.append(f"| {jr['name']} | {p['name']} | {'yes' if ok else 'no'} | " + " | ".join(cells) + " |")
        numbers[prob] = entry
    lines += ["", runs.RULE, ""]
    for _prob, jr in sorted(chosen.items()):
        for p in sorted(plain, key=lambda p: p["limit"]):
            for key, what, fmt in (("final", f"{jr['split']} {jr['metric']}", quality),
                                   ("reported", f"{jr['reported_split']} {jr['metric']}", quality),
                                   ("deq_s", "DEQ-phase time (s)", ".1f")):
                a, b = _by_seed(jr, p, key)
                lines.append(runs.compare_line(what, jr["name"], a, p["name"], b, fmt))
    lines.append("")
    verdicts = []
    for prob, jr in sorted(chosen.items()):
        match = matched(jr, plain)
        entry = numbers[prob]
        entry["matched_limit"] = None if match is None else match["limit"]
        if match is None:
            worst = max(plain, key=lambda p: p["limit"])
            r = ratios(worst, jr, "deq_s")
            text = (f"p = {prob:g} (γ = {jr['gamma']:g}): no no-JR limit among {sorted(p['limit'] for p in plain)} "
                    f"reached its validation quality, so no matched speed-up; against the largest "
                    f"({worst['limit']}) the DEQ phase is {runs.pm(r, '.2f')}× as long without JR")
        else:
            r = ratios(match, jr, "deq_s")
            text = (f"p = {prob:g} (γ = {jr['gamma']:g}): speed-up at matched quality **{runs.pm(r, '.2f')}×** "
                    f"(DEQ phase, {match['name']} / {jr['name']}; total "
                    f"{runs.pm(ratios(match, jr, 'total_s'), '.2f')}×): {_ratio_verdict(r)}")
        entry["verdict"] = text
        verdicts.append(text)
    lines += ["**Verdicts**, per JR frequency (γ chosen on the validation split):", ""]
    lines += [f"- {v}." for v in verdicts]
    return lines, numbers


def run(out: str, run_dirs=(), size: str = "small", gammas: dict | None = None, jr_limit: int = 6,
        jr_bwd_limit: int = 8, limits=(12, 18), bwd_limit: int = 12, validation: float = 0.2, *,
        seeds=runs.DEFAULT_SEEDS, runs_dir: str | None = None, train_steps: int | None = None) -> dict:
    """Returns ``{"settings": [combined results], "chosen": {p: name}, "speedup": {p: {...}}}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not run_dirs:
        runs_dir = runs_dir or runs.digits_runs_dir(size, train_steps).replace("/digits", "/speedup")
        made = configs(size, gammas, jr_limit, jr_bwd_limit, limits, bwd_limit, validation, train_steps)
        run_dirs = runs.train_runs(runs_dir, runs.seeded(made, seeds))
    results = [combine([collect(r) for r in members]) for members in runs.group_runs(run_dirs).values()]
    regularized = [r for r in results if r["regularized"]]
    plain = [r for r in results if not r["regularized"]]
    if not regularized or not plain:
        raise ValueError(f"need JR settings and unregularized ones, got {[r['name'] for r in results]}")
    chosen = choose(regularized)
    chosen_names = {r["name"] for r in chosen.values()}
    lines, numbers = speedups(chosen, plain)
    paths = plot(list(chosen.values()) + plain, out)
    body = ["Seeds: " + "; ".join(f"{r['name']} {r['seeds']}" for r in results) + ".", "",
            "Mean ± sample standard deviation over seeds. Times exclude compilation and evaluation; NFE: the "
            "solver loops' f (forward) and VJP (backward) evaluations per DEQ training step; JR steps: the "
            f"share of DEQ steps with the JR term. Chosen γ per p (best mean {results[0]['split']} "
            f"{results[0]['metric']}) in bold:", "",
            *table(sorted(regularized, key=lambda r: (r["prob"], r["gamma"])), chosen_names), "",
            "Without JR:", "", *table(sorted(plain, key=lambda r: r["limit"])), *lines]
    heading = f"Training speed-up of JR at matched quality ({results[0]['data']})"
    saved = {"settings": results, "chosen": {p: r["name"] for p, r in chosen.items()}, "speedup": numbers}
    figures.write_results(out, heading, body, paths, saved)
    return saved


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    gammas = (parse_gammas(FLAGS.gammas) if FLAGS.gammas
              else gammas_for(tuple(float(p) for p in FLAGS.probs), tuple(float(c) for c in FLAGS.grid)))
    saved = run(FLAGS.out, FLAGS.runs, FLAGS.size, gammas, FLAGS.jr_limit, FLAGS.jr_bwd_limit,
                tuple(FLAGS.limits), FLAGS.bwd_limit, FLAGS.validation,
                seeds=runs.parse_seeds(FLAGS.seeds), runs_dir=FLAGS.runs_dir, train_steps=FLAGS.train_steps)
    for entry in saved["speedup"].values():
        print(entry["verdict"])
    print(f"wrote {FLAGS.out}/results.md, time.png")


def define_flags():
    """The command-line flags (defined on demand: importing this module defines none)."""
    flags.DEFINE_string("out", "results/speedup", "Results folder.")
    flags.DEFINE_list("runs", [], "Finished run folders, grouped by config without the seed: JR settings and "
                      "unregularized ones (default: the digits runs made here).")
    flags.DEFINE_string("runs_dir", None, "Folder of the runs made here (default runs/reproduce/speedup, "
                        "_large for --size=large).")
    flags.DEFINE_enum("size", "small", list(runs.DIGITS_LENGTH),
                      "Digits runs made here: 500 (small, the Quickstart) or 2000 (large) steps.")
    flags.DEFINE_list("probs", [str(p) for p in PROBS], "JR frequencies p of the JR arms.")
    flags.DEFINE_list("grid", [str(c) for c in GRID], "Values of p·γ tried per p (γ = value / p).")
    flags.DEFINE_string("gammas", "", "Instead of --probs and --grid: 'p:γ,γ;p:γ' (e.g. '0.5:4;0.1:20').")
    flags.DEFINE_integer("jr_limit", 6, "Forward step limit of the JR arms.")
    flags.DEFINE_integer("jr_bwd_limit", 8, "Backward step limit of the JR arms.")
    flags.DEFINE_list("limits", ["12", "18"], "Forward step limits of the no-JR arms, or fwd/bwd pairs (6/8).")
    flags.DEFINE_integer("bwd_limit", 12, "Backward step limit of the no-JR arms.")
    flags.DEFINE_float("validation", 0.2, "Fraction of the training set held out to choose γ and match quality.")
    flags.DEFINE_string("seeds", "0,1,2", "Seeds, comma-separated: each setting is trained once per seed.")
    flags.DEFINE_integer("train_steps", None, "Train the runs for this many steps instead (a quick check; own "
                         "runs folder).")


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
