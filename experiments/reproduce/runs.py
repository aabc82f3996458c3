"""Training runs made by the reproduction scripts, seeds, and how results are summarized.

**One registry of digits runs** (:func:`digits`), shared by conditioning.py, budgets.py,
schedules.py, convergence.py and speedup.py: every setting is the Quickstart config
(``deq_jax/configs/digits.py``: 500 steps, 150 of them pretraining) with a checkpoint
every 50 steps (all kept, for conditioning.py), the final evaluation at every forward
budget (``eval.budgets="all"``) and one evaluation at the end (evaluation does not change
training); only the setting's own keys differ (``jr.gamma``, weight decay, schedule,
forward step limit) and the seed. A setting's folder name is made from those keys
(``gamma_1``, ``gamma_0_wd_0.5``, ``gamma_1_limit_6``, ``staircase_0.5``, ...), so that
the scripts that need the same run (no JR, JR γ = 1) train it once, into
``<runs_dir>/<setting>/seed<k>``, default ``runs/reproduce/digits`` (``--size=large``:
``runs/reproduce/digits_large``, 2000 steps). A finished run is reused only if its saved
config equals the one asked for.

**Seeds**: each setting is trained once per seed (config key ``seed``: the digits
train/test split, initialization, batch order and every random draw of training).
Tables report the mean ± the sample standard deviation over seeds (:func:`spread`,
:func:`pm`); a difference between two settings counts only when it exceeds the sum of
their standard deviations (:func:`separated`, :data:`RULE`). Run folders given on the
command line (``--runs``) are grouped by their resolved config without the seed
(:func:`group_runs`).
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np

DEFAULT_SEEDS = (0, 1, 2)

# The shared digits runs, by --size: the Quickstart length ("small") or 4x it ("large").
DIGITS_LENGTH = {
    "small": {"num_steps": 500, "pretrain_steps": 150, "checkpoint_every": 50},
    "large": {"num_steps": 2000, "pretrain_steps": 600, "checkpoint_every": 100},
}
DIGITS_LIMIT = 12  # the Quickstart forward step limit

RULE = (
    "Rules: a difference between two settings counts (is *separated*) only when "
    "|mean_a − mean_b| > sd_a + sd_b, with sd the sample standard deviation over seeds "
    "(unpaired); with the same seeds in both (the same data split, initialization and "
    "batches), the per-seed differences d_k = a_k − b_k also give a paired verdict: "
    "separated when |mean d| > sd d. With a single seed nothing is separated."
)


def parse_seeds(text) -> tuple[int, ...]:
    """``"0,1,2"`` (or a list of strings or ints) -> ``(0, 1, 2)``; at least one, no repeats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    seeds = tuple(int(s) for s in items if str(s).strip() != "")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct integers, got {text!r}")
    return seeds


def digits_length(size: str = "small", steps: int | None = None) -> dict:
    """``train`` keys of the shared digits runs: the size's length, or ``steps`` steps
    (a quick check: pretraining 30%, a log row and checkpoint every fifth of the run)."""
    if steps is None:
        length = dict(DIGITS_LENGTH[size])
        return length | {"keep_checkpoints": 1000, "eval_every": length["num_steps"]}
    every = max(steps // 5, 1)
    return {"num_steps": steps, "pretrain_steps": int(round(0.3 * steps)), "checkpoint_every": every,
            "log_every": every, "keep_checkpoints": 1000, "eval_every": steps}


def digits_runs_dir(size: str = "small", steps: int | None = None) -> str:
    """The default folder of the shared digits runs (a separate one per size or --steps)."""
    return "runs/reproduce/digits" + ("_large" if size == "large" else "") + (f"_steps{steps}" if steps else "")


def digits(size: str = "small", *, gamma: float = 1.0, weight_decay: float = 0.0, limit: int = DIGITS_LIMIT,
           jr: dict | None = None, steps: int | None = None, bwd_limit: int = DIGITS_LIMIT,
           validation: float = 0.0) -> tuple[str, dict]:
    """One setting of the shared digits registry: ``(folder name, config overrides)``.

    ``jr``: further ``jr`` keys (a schedule, ``prob``); ``schedule`` "staircase" or
    "adaptive" names the folder after it (the adaptive one also after its
    ``target_residual``), a ``prob`` other than the Quickstart's 0.5 adds ``_p_<prob>``.
    ``limit`` / ``bwd_limit``: the forward / backward step limits; ``validation``: the
    fraction of the training set held out as a validation split (``data.validation_fraction``).
    """
    from deq_jax.train.config import default_config

    defaults = default_config()
    jr = dict(jr or {})
    schedule = jr.get("schedule", "constant")
    if schedule == "constant":
        name = f"gamma_{gamma:g}"
    elif schedule == "adaptive":
        name = f"adaptive_{gamma:g}_target_{jr.get('target_residual', defaults.jr.target_residual):g}"
    else:
        name = f"{schedule}_{gamma:g}"
    if jr.get("prob", defaults.jr.prob) != defaults.jr.prob:
        name += f"_p_{jr['prob']:g}"
    if jr.get("pretrain_gamma", 0.0):
        name += f"_pre_{jr['pretrain_gamma']:g}"
    if weight_decay:
        name += f"_wd_{weight_decay:g}"
    if limit != DIGITS_LIMIT:
        name += f"_limit_{limit}"
    if bwd_limit != DIGITS_LIMIT:
        name += f"_bwd_{bwd_limit}"
    if validation:
        name += f"_val_{validation:g}"
    config = {"train": digits_length(size, steps), "eval": {"budgets": "all"}, "jr": {"gamma": float(gamma), **jr}}
    if weight_decay:
        config["optim"] = {"weight_decay": float(weight_decay)}
    if limit != DIGITS_LIMIT:
        config["forward"] = {"max_steps": int(limit)}
    if bwd_limit != DIGITS_LIMIT:
        config["backward"] = {"max_steps": int(bwd_limit)}
    if validation:
        config["data"] = {"validation_fraction": float(validation)}
    return name, config


def seeded(configs: dict[str, dict], seeds) -> dict[str, dict]:
    """``{name: overrides}`` -> ``{"name/seed<k>": overrides with seed k}``, seeds innermost."""
    return {f"{name}/seed{k}": merge(config, {"seed": int(k)}) for name, config in configs.items() for k in seeds}


def merge(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``, nested dicts merged key by key (neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def saved_config(run_dir) -> dict:
    """A run folder's resolved config as saved (``config.json``), as a dict."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    return json.loads(path.read_text())


def resolved(config) -> dict:
    """``config`` (overrides) resolved against the defaults, as ``config.json`` would hold it."""
    from deq_jax.train import resolve

    return json.loads(resolve(config).to_json_best_effort())


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between a saved config ``a`` and an asked one ``b``; keys
    the saved config lacks (added to the library's defaults after it was trained) are
    not counted."""
    out = []
    for key in sorted(set(a) & set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} (saved) vs {vb!r} (asked)")
    return out


# Trains one run in a fresh Python process (argv: config JSON, run folder, resume 0/1).
_TRAIN_ONE = (
    "import json, sys\n"
    "import deq_jax.train.cpu_flags as cpu_flags\n"
    "cpu_flags.apply()\n"
    "from deq_jax.train import train\n"
    "train(json.loads(sys.argv[1]), sys.argv[2], resume=sys.argv[3] == '1')\n"
)


def train_runs(out: Path, configs: dict[str, dict], *, fresh_process: bool = True) -> list[Path]:
    """Trains every ``{name: config overrides}`` into ``out/<name>`` (names may hold a
    ``/``, as :func:`seeded`'s do).

    A finished run (with ``summary.json``) is reused and an interrupted one resumed from
    its last checkpoint (a script killed half-way loses at most a checkpoint interval),
    but only if the folder's saved config equals the one asked for; otherwise
    ``ValueError`` (another script's run, or a changed setting, under the same name).

    ``fresh_process``: each run trains in a new Python process (the default), so that its
    times do not depend on which runs the same process trained before: in one long-lived
    process the same no-JR setting's DEQ phase took 6% longer after 36-38 earlier runs
    than after 13-14 (``docs/results.md``, speed-up). ``RuntimeError`` if that process fails.
    """
    import subprocess
    import sys

    from deq_jax.train import train

    dirs = []
    for name, config in configs.items():
        run = Path(out) / name
        if (run / "config.json").exists():
            diff = _diff(saved_config(run), resolved(config))
            if diff:
                raise ValueError(f"{run} holds a run with another config ({'; '.join(diff)}); "
                                 "choose another --runs_dir or remove that folder")
        if not (run / "summary.json").exists():
            resume = run.exists()
            if fresh_process:
                proc = subprocess.run([sys.executable, "-c", _TRAIN_ONE, json.dumps(config), str(run),
                                       "1" if resume else "0"])
                if proc.returncode != 0:
                    raise RuntimeError(f"training {run} failed (exit code {proc.returncode}; its output is above)")
            else:
                train(config, run, resume=resume)
        dirs.append(run)
    return dirs


def seed_of(run_dir) -> int:
    """The ``seed`` a run folder was trained with."""
    return int(saved_config(run_dir)["seed"])


def group_runs(run_dirs) -> dict[str, list[Path]]:
    """Run folders grouped by their resolved config without the seed: ``{setting: [runs
    by seed]}``, settings in order of first appearance.

    A setting is named after the folder that holds its ``seed<k>`` folders (as
    :func:`train_runs` lays them out with :func:`seeded`), else after its first run
    folder. ``ValueError`` if a setting holds the same seed twice.
    """
    groups: dict[str, list[Path]] = {}
    for run in map(Path, run_dirs):
        config = saved_config(run)
        try:  # with the defaults of keys added since (as open_run reads it)
            config = resolved(config)
        except ValueError as e:  # a config today's checks reject: grouped by what was saved
            warnings.warn(f"{run}: its saved config no longer resolves ({e}); grouping it by the saved config",
                          stacklevel=2)
        config.pop("seed", None)
        groups.setdefault(json.dumps(config, sort_keys=True), []).append(run)
    named: dict[str, list[Path]] = {}
    for members in groups.values():
        members = sorted(members, key=seed_of)
        seeds = [seed_of(m) for m in members]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"the same config and seed twice among {[str(m) for m in members]}")
        first = members[0]
        name = first.parent.name if re.fullmatch(r"seed\d+", first.name) else first.name
        base, i = name, 2
        while name in named:
            name, i = f"{base}_{i}", i + 1
        named[name] = members
    return named


def spread(values) -> tuple[float, float]:
    """``(mean, sample standard deviation)`` of per-seed values (NaNs dropped); the
    deviation is NaN with fewer than two values."""
    v = np.asarray([float(x) for x in values], np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else math.nan)


def separated(a, b) -> bool:
    """True when the per-seed values ``a`` and ``b`` differ by more than their spreads:
    |mean_a - mean_b| > sd_a + sd_b (sample standard deviations). False when either has
    fewer than two values (no spread known)."""
    (ma, sa), (mb, sb) = spread(a), spread(b)
    if not all(math.isfinite(x) for x in (ma, sa, mb, sb)):
        return False
    return abs(ma - mb) > sa + sb


def paired_differences(a, b) -> list[float]:
    """Per-seed differences ``a_k - b_k`` of two settings' values listed seed by seed (the
    same seeds in the same order; NaN pairs dropped)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds, got {len(a)} and {len(b)} values")
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if math.isfinite(float(x)) and math.isfinite(float(y))]
    return [x - y for x, y in pairs]


def paired_separated(a, b) -> bool:
    """True when the per-seed differences ``d = a - b`` (:func:`paired_differences`) are
    away from 0 by more than their sample standard deviation: |mean d| > sd d. False
    with fewer than two pairs."""
    mean, sd = spread(paired_differences(a, b))
    return math.isfinite(sd) and abs(mean) > sd


def _format(value: float, fmt: str) -> str:
    if fmt == "%":
        return f"{100 * value:.1f}"
    return format(value, fmt)


def pm(values, fmt: str = ".3g") -> str:
    """Mean ± sample standard deviation of per-seed values as text: ``pm([0.97, 0.975],
    "%")`` -> ``"97.2 ± 0.4%"``; ``fmt`` a format spec (".1e", ".3f") or "%" (percent, one
    decimal). One value: the value alone."""
    mean, sd = spread(values)
    if not math.isfinite(mean):
        return "–"
    unit = "%" if fmt == "%" else ""
    if not math.isfinite(sd):
        return _format(mean, fmt) + unit
    return f"{_format(mean, fmt)} ± {_format(sd, fmt)}{unit}"


def compare_line(what: str, name_a: str, a, name_b: str, b, fmt: str = ".3g", paired: bool = True) -> str:
    """One results.md line: ``what`` of ``name_a`` vs ``name_b``, both as mean ± sd, and
    whether the difference exceeds the spread (:func:`separated`); with ``paired`` (the
    values listed seed by seed, the same seeds in both) also the per-seed differences and
    the paired verdict (:func:`paired_separated`)."""
    ma, mb = spread(a)[0], spread(b)[0]
    diff = ma - mb
    shown = f"{100 * diff:+.1f} points" if fmt == "%" else f"{diff:+{fmt}}"
    if not math.isfinite(spread(a)[1]) or not math.isfinite(spread(b)[1]):
        verdict = "spread unknown (fewer than two seeds)"
    else:
        verdict = "unpaired: " + ("**exceeds the spread**" if separated(a, b) else "within the spread")
        if paired and len(a) == len(b):
            d = paired_differences(a, b)
            shown_d = pm([100 * x for x in d], ".1f") + " points" if fmt == "%" else pm(d, fmt)
            verdict += f"; paired: d = {shown_d}, " + ("**separated**" if paired_separated(a, b) else "not separated")
    return f"- {what}, {name_a} vs {name_b}: {pm(a, fmt)} vs {pm(b, fmt)} (difference {shown}): {verdict}."


def stats(per_seed: list[dict], keys) -> dict:
    """``{"mean": {k: ...}, "sd": {k: ...}}`` over seeds for each key (scalars, or
    equal-length lists: element by element)."""
    mean, sd = {}, {}
    for k in keys:
        values = [r[k] for r in per_seed]
        if values and isinstance(values[0], (list, tuple, np.ndarray)):
            pairs = [spread(column) for column in zip(*values, strict=True)]
            mean[k], sd[k] = [m for m, _ in pairs], [s for _, s in pairs]
        else:
            mean[k], sd[k] = spread(values)
    return {"mean": mean, "sd": sd}


def label(c) -> str:
    """A run's regularization in words, from its resolved config: "no reg.", "weight decay 0.5",
    "JR γ = 1", "JR adaptive (γ0 = 0.5)", with " + FPC (3 states)" for fixed-point correction,
    and "RevDEQ (β = 0.5)" before it for the reversible gradient."""
    j, wd = c.jr, c.optim.weight_decay
    rev = f"RevDEQ (β = {c.forward.beta:g})" if c.backward.mode == "reversible" else ""
    fpc = f" + FPC ({c.correction.n_states} states)" if c.correction.n_states > 1 else ""
    if j.gamma == 0 and j.schedule == "constant":
        text = ("no reg." if not rev else "") if wd == 0 else f"weight decay {wd:g}"
        return " + ".join(t for t in (rev, text) if t) + fpc
    text = f"JR γ = {j.gamma:g}" if j.schedule == "constant" else f"JR {j.schedule} (γ0 = {j.gamma:g})"
    if j.pretrain_gamma:
        text += f", also in pretraining (γ = {j.pretrain_gamma:g})"
    text += f" + weight decay {wd:g}" if wd else ""
    return " + ".join(t for t in (rev, text) if t) + fpc


def final_numbers(run_dir) -> tuple[dict, dict, object]:
    """``(numbers, summary, config)`` of a finished run folder: ``numbers`` holds its name,
    label, data, quality metric and split, the final quality at the step limit (``final``),
    the solver statistics, Jacobian norm and train time. Raises ``FileNotFoundError`` if
    the run has not finished (no ``summary.json``)."""
    from deq_jax.train.sampling import open_run

    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{run_dir} has no summary.json (the run has not finished)")
    s = json.loads(summary_path.read_text())
    c, _, _ = open_run(run_dir)
    key, split = s["main_metric"], s["eval_split"]
    numbers = {
        "name": run_dir.name,
        "label": label(c),
        "data": s["data"],
        "metric": key,
        "split": split,
        "final": s[f"{split}_{key}"],
        "limit": c.forward.max_steps,
        "tol": c.forward.tol,
        "steps_at_limit": s["fwd_steps_at_limit"],
        "steps_to_tol": s["fwd_steps_to_tol"],
        "converged_to_tol": s["converged_to_tol"],
        "residual_at_limit": s["residual_at_limit"],
        "jacobian": s["jacobian_frobenius_sq_per_dim"],
        "spectral_radius": s.get("spectral_radius"),
        "fwd_nfe_per_batch": s.get("fwd_nfe_per_batch"),
        "train_time_s": s["train_time_s"],
        "train_time_s_by_mode": s.get("train_time_s_by_mode", {}),
        "compile_s": s.get("compile_s", {}),
        "step_memory_mb": s.get("step_memory_mb", {}),
        "pretrain_steps": c.train.pretrain_steps,
        "seed": c.seed,
    }
    return numbers, s, c
