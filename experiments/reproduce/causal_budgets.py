"""Future-token leakage of trained DEQ-Transformers, and their quality at hard-stopped
forward budgets with causal and ordinary solvers.

    python -m experiments.reproduce.causal_budgets --runs=runs/a,runs/b --out=docs/results/causal_pydoc

For each finished text run and each solver setting (``--solvers``: each of Broyden and
Anderson, ordinary and causal), on the validation split at every forward budget of the
run's ``eval.budgets``:

* quality (bits per character or perplexity) and the mean relative residual at the stop;
* **leakage**: on the first validation batch, the tokens from position T/2 on are replaced
  by random ones; leakage is the largest change of any log-probability at positions < T/2
  (the model is causal, so any change there came through the solver from later tokens).

The parameters are the run's last checkpoint; nothing is trained. Writes ``results.md``,
``results.json`` and ``quality.png`` (quality vs budget per setting and run).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging

from experiments.reproduce import figures

FLAGS = flags.FLAGS
SETTINGS = {
    "broyden": ("broyden", False),
    "broyden_causal": ("broyden", True),
    "anderson": ("anderson", False),
    "anderson_causal": ("anderson", True),
}


def setting_label(name: str) -> str:
    solver, causal = SETTINGS[name]
    return f"{solver.capitalize()} {'causal' if causal else 'ordinary'}"


def measure(run_dir, settings) -> dict:
    """Quality, residual and leakage per budget for every setting, on one run."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from deq_jax.train import config as config_lib
    from deq_jax.train import loop, objective
    from deq_jax.train import step as step_lib
    from deq_jax.train.sampling import load_run

    c, task, params, ckpt_step = load_run(run_dir)
    if not task.language:
        raise ValueError(f"{run_dir} is not a language-model run")
    mesh = step_lib.make_mesh()
    split, metric = task.eval_split, task.main_metric
    inputs, _, _ = next(iter(task.eval_sets[split]()))
    half = inputs.shape[1] // 2
    rng = np.random.default_rng(0)
    changed = inputs.copy()
    changed[:, half:] = rng.integers(0, task.data.vocab_size, size=changed[:, half:].shape)
    budgets = config_lib.budgets(c)
    out = {"run": str(run_dir), "label": _run_label(c), "step": ckpt_step, "metric": metric,
           "budgets": budgets, "trained_with": setting_name(c), "settings": {}}
    for name in settings:
        solver, causal = SETTINGS[name]
        overrides = {"forward": {"solver": solver, "causal": causal}}
        cs = config_lib.resolve(_merge(c.to_dict(), overrides))
        eval_fn = step_lib.make_eval_step(task.model, cs, mesh, with_jacobian=False)
        forward = objective.solvers_from_config(cs).eval_forward

        @jax.jit
        def log_probs(p, tokens, limit, forward=forward):
            logits = objective.forward(task.model, p, tokens, mode="deq", config=forward, step_limit=limit).logits
            return jax.nn.log_softmax(logits.astype(jnp.float32))

        rows = []
        for b in budgets:
            row = loop.evaluate_split(eval_fn, params, task, mesh, b, split)
            a, z = log_probs(params, inputs, b), log_probs(params, changed, b)
            leak = float(jnp.max(jnp.abs(a[:, :half] - z[:, :half])))
            rows.append({"budget": b, metric: row[metric], "residual": row["residual"], "leakage": leak})
            logging.info("%s %s budget %d: %s %.4f residual %.2e leakage %.2e", run_dir, name, b, metric,
                         row[metric], row["residual"], leak)
        out["settings"][name] = rows
    return out


def setting_name(c) -> str:
    """The setting a run was trained with (``broyden``, ``anderson_causal``, ...)."""
    return c.forward.solver + ("_causal" if c.forward.causal else "")


def _run_label(c) -> str:
    jr = "no JR" if c.jr.gamma == 0 else f"JR γ = {c.jr.gamma:g}"
    return f"{jr}, trained with {setting_label(setting_name(c))}"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def table(result: dict) -> list[str]:
    metric, budgets = result["metric"], result["budgets"]
    lines = [
        f"**{result['label']}** (`{result['run']}`, step {result['step']}): validation {metric} / "
        "mean relative residual / leakage (largest change of a log-probability at positions < T/2 "
        "when the tokens from T/2 on change)",
        "",
        "| solver | " + " | ".join(f"{b} steps" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for name, rows in result["settings"].items():
        cells = [f"{r[metric]:.3f} / {r['residual']:.1e} / {r['leakage']:.1e}" for r in rows]
        mark = " (as trained)" if name == result["trained_with"] else ""
        lines.append(f"| {setting_label(name)}{mark} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot(results: list[dict], out: Path) -> list[Path]:
    plt = figures.pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        metric = result["metric"]
        for name, rows in result["settings"].items():
            ax.plot(result["budgets"], [r[metric] for r in rows], marker="o", ms=3, label=setting_label(name),
                    linestyle="-" if SETTINGS[name][1] else "--")
        ax.set(xlabel="forward solver steps allowed (budget)", ylabel=f"validation {metric}", title=result["label"])
        ax.legend(fontsize=8)
    return [figures.save(fig, out / "quality.png")]


def run(out: str, run_dirs, settings=tuple(SETTINGS)) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = [measure(r, settings) for r in run_dirs]
    body = []
    for result in results:
        body += table(result)
    paths = plot(results, out)
    figures.write_results(out, "Causal and ordinary solving of trained DEQ-Transformers", body, paths, results)
    return results


def define_flags():
    flags.DEFINE_string("runs", None, "comma-separated finished text run folders", required=True)
    flags.DEFINE_string("out", "runs/reproduce/causal_budgets", "output folder")
    flags.DEFINE_string("solvers", ",".join(SETTINGS), f"settings among {list(SETTINGS)}")


def main(argv):
    del argv
    settings = FLAGS.solvers.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        sys.exit(f"unknown --solvers {unknown}; choose from {list(SETTINGS)}")
    run(FLAGS.out, FLAGS.runs.split(","), settings)
    print(f"results in {FLAGS.out}/results.md")


if __name__ == "__main__":
    define_flags()
    app.run(main)
