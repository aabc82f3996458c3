"""Forward and backward convergence of trained DEQs, with and without JR (paper Figures 1, 3),
with two controls.

    python -m experiments.reproduce.convergence                       # shared digits runs, 3 seeds
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

Control (a), **solver memory**: the same two solves with memory ``--memory`` (default: the
number of recorded steps, so that no secant pair is ever dropped). Broyden keeps its last
20 secant pairs by default; the unregularized model's residuals bottom out near step 20 and
then rise, which is where that ring starts to evict pairs. If the rise is gone with the
larger memory, it is the solver's memory, not the model.

Control (b), **where the Jacobian is measured**: ||J_f||_F^2 / d (Hutchinson, ``--probes``
probes) and the spectral radius (power method, ``--power_iters``) at the ``--budget``-step
iterate (the trained limit, what training and conditioning.py see) and at a *converged*
fixed point: a forward solve of at most ``--converged_steps`` steps with tolerance
``--converged_tol`` and a memory of that many steps, reporting the residual it reached.

Without ``--runs`` it trains (or reuses) the shared digits runs (``runs.digits``: the
Quickstart config) without JR and with JR γ = 1, once per ``--seeds`` seed, under
``--runs_dir``; conditioning.py, budgets.py and speedup.py use the same runs. Writes
``results.md`` (mean ± sample standard deviation over seeds), ``results.json`` (every
seed), ``forward.png``, ``backward.png``.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import deq_jax.train.cpu_flags as cpu_flags

if __name__ == "__main__":
    cpu_flags.apply()  # before jax's backend starts: the same XLA CPU flags as deq-jax-train

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from deq_jax import solvers  # noqa: E402
from deq_jax.train.sampling import load_run  # noqa: E402
from experiments.reproduce import figures, measure, runs  # noqa: E402

FLAGS = flags.FLAGS

SHOW = (2, 4, 8, 12, 20, 40)  # steps reported in the table


def settings(size: str = "small", train_steps: int | None = None) -> dict[str, dict]:
    """The shared digits runs without JR and with JR γ = 1: ``{name: overrides}``."""
    return dict(runs.digits(size, gamma=g, steps=train_steps) for g in (0.0, 1.0))


def default_memory(solver_name: str) -> int | None:
    """The solver's own memory (Broyden: secant pairs kept), or None if it has none."""
    parameter = inspect.signature(solvers.get(solver_name)).parameters.get("memory")
    return None if parameter is None else parameter.default


def analyse(run_dir, steps: int, batches: int, memory: int, budget: int, converged_steps: int,
            converged_tol: float, power_iters: int, probes: int, examples: int | None = None,
            converged_memory: int | None = None) -> dict:
    """One run: residual traces at the solver's memory and at ``memory``, and the Jacobian
    at the ``budget``-step iterate and at a converged fixed point, on the first
    ``batches`` evaluation batches (at most ``examples`` examples)."""
    c, task, params, step = load_run(run_dir)
    out = {
        "run": str(run_dir),
        "seed": c.seed,
        "label": runs.label(c),
        "checkpoint_step": step,
        "gamma": c.jr.gamma,
        "data": task.name,
        "solver": c.forward.solver,
        "memory": default_memory(c.forward.solver),
        "control_memory": memory,
    }
    for suffix, mem in (("", None), ("_control", memory)):
        m = measure.measure(measure.make_measure(task, c, steps, memory=mem), params, task, batches, examples)
        out["examples"] = int(m["forward"].shape[1])
        out["forward" + suffix] = m["forward"].mean(axis=1).tolist()
        out["backward" + suffix] = m["backward"].mean(axis=1).tolist()
    fn = measure.make_measure(task, c, budget, jacobian=True, probes=probes, power_iters=power_iters,
                              converged_steps=converged_steps, converged_tol=converged_tol,
                              converged_memory=converged_memory)
    m = measure.measure(fn, params, task, batches, examples, seed=c.seed)
    out |= {
        "frobenius_at_budget": float(m["frobenius"].mean()),
        "spectral_at_budget": float(m["spectral_radius"].mean()),
        "frobenius_converged": float(m["converged_frobenius"].mean()),
        "spectral_converged": float(m["converged_spectral_radius"].mean()),
        "converged_residual": float(m["converged_residual"].mean()),
        "converged_residual_max": float(m["converged_residual"].max()),
        "converged_fraction": float((m["converged_residual"] <= converged_tol).mean()),
        "converged_steps": float(m["converged_steps"].mean()),
    }
    for key in ("forward", "backward"):
        for suffix in ("", "_control"):
            trace = np.asarray(out[key + suffix])
            low = int(np.argmin(trace))
            out[f"{key}{suffix}_min_step"] = low
            # How far the residual rose again after its lowest point (1 = no rise).
            out[f"{key}{suffix}_rise"] = float(trace[-1] / trace[low])
    return out


def plot(groups: dict[str, list[dict]], out: Path) -> list[Path]:
    plt = figures.pyplot()
    paths = []
    for key, what in (("forward", "forward solve z = f(z)"), ("backward", "backward (adjoint) solve u = u J + g")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for _name, rs in groups.items():
            r0 = rs[0]
            x = np.arange(len(r0[key]))
            color = figures.seed_lines(ax, x, [r[key] for r in rs], f"{r0['label']}, memory {r0['memory']}",
                                       log=True)
            figures.seed_lines(ax, x, [r[key + "_control"] for r in rs],
                               f"{r0['label']}, memory {r0['control_memory']}", log=True, color=color, ls="--")
        memories = {r["memory"] for rs in groups.values() for r in rs if r["memory"]}
        for mem in memories:
            ax.axvline(mem, color="0.5", lw=0.8, ls=":", label=f"memory {mem} full: pairs start to be dropped")
        ax.set(xlabel="solver step", ylabel="mean relative residual",
               title=f"Convergence of the {what}\n(mean over seeds, thin: each seed; dashed: larger memory)")
        ax.legend(fontsize=7)
        paths.append(figures.save(fig, out / f"{key}.png"))
    return paths


def _reference(groups: dict[str, list[dict]]) -> str:
    """The unregularized setting (label "no reg."), else the first."""
    return next((n for n, rs in groups.items() if rs[0]["label"] == "no reg."), next(iter(groups)))


def tables(groups: dict[str, list[dict]], steps: int, budget: int, converged_steps: int,
           converged_tol: float, converged_memory: int | None = None) -> list[str]:
    shown = [s for s in SHOW if s <= steps]
    lines = []
    for key, what in (("forward", "Forward"), ("backward", "Backward (adjoint)")):
        lines += [
            f"{what} solve: mean relative residual after k steps (mean ± sd over seeds):",
            "",
            "| run | seeds | memory | " + " | ".join(f"@{s}" for s in shown) + " |",
            "|---|---|---|" + "---|" * len(shown),
        ]
        for rs in groups.values():
            for suffix, mem_key in (("", "memory"), ("_control", "control_memory")):
                cells = [runs.pm([r[key + suffix][s] for r in rs], ".1e") for s in shown]
                lines.append(f"| {rs[0]['label']} | {len(rs)} | {rs[0][mem_key]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Control (a): the lowest mean residual, the step where it is reached, and the rise after it "
        f"(residual at step {steps} / lowest residual; 1 = no rise), per solver memory:",
        "",
        "| run | memory | fwd lowest | fwd at step | fwd rise | bwd lowest | bwd at step | bwd rise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rs in groups.values():
        for suffix, mem_key in (("", "memory"), ("_control", "control_memory")):
            cells = []
            for key in ("forward", "backward"):
                cells += [runs.pm([min(r[key + suffix]) for r in rs], ".1e"),
                          runs.pm([r[f"{key}{suffix}_min_step"] for r in rs], ".1f"),
                          runs.pm([r[f"{key}{suffix}_rise"] for r in rs], ".3g")]
            lines.append(f"| {rs[0]['label']} | {rs[0][mem_key]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Control (b): the Jacobian at the {budget}-step iterate and at a converged fixed point (at most "
        f"{converged_steps} steps, tol {converged_tol:g}, memory {converged_memory or converged_steps}):",
        "",
        f"| run | ‖J‖²_F/d at {budget} steps | ‖J‖²_F/d converged | ρ at {budget} steps | ρ converged | "
        f"residual reached (mean) | (worst example) | examples at tol | steps used |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rs in groups.values():
        cells = [runs.pm([r[k] for r in rs], fmt) for k, fmt in (
            ("frobenius_at_budget", ".3f"), ("frobenius_converged", ".3f"), ("spectral_at_budget", ".3f"),
            ("spectral_converged", ".3f"), ("converged_residual", ".1e"), ("converged_residual_max", ".1e"),
            ("converged_fraction", "%"), ("converged_steps", ".1f"))]
        lines.append(f"| {rs[0]['label']} | " + " | ".join(cells) + " |")

    lines += ["", runs.RULE, ""]
    ref = _reference(groups)
    base = groups[ref]
    at = min(budget, steps)
    for name, rs in groups.items():
        if name == ref:
            continue
        a, b = rs[0]["label"], base[0]["label"]
        for key in ("forward", "backward"):
            lines.append(runs.compare_line(f"{key} residual at {at} steps", a, [r[key][at] for r in rs],
                                           b, [r[key][at] for r in base], ".1e"))
        for key, what in (("frobenius_converged", "‖J‖²_F/d at the converged fixed point"),
                          ("spectral_converged", "ρ at the converged fixed point")):
            lines.append(runs.compare_line(what, a, [r[key] for r in rs], b, [r[key] for r in base], ".3f"))
    for rs in groups.values():
        r0 = rs[0]
        for key in ("forward", "backward"):
            lines.append(runs.compare_line(
                f"{key} rise after the lowest residual, {r0['label']}", f"memory {r0['memory']}",
                [r[f"{key}_rise"] for r in rs], f"memory {r0['control_memory']}",
                [r[f"{key}_control_rise"] for r in rs], ".3g"))
        for key, what in (("frobenius", "‖J‖²_F/d"), ("spectral", "ρ")):
            lines.append(runs.compare_line(
                f"{what} of {r0['label']}", f"at {budget} steps", [r[f"{key}_at_budget"] for r in rs],
                "converged", [r[f"{key}_converged"] for r in rs], ".3f"))
    return lines


def run(out: str, run_dirs=(), size: str = "small", steps: int = 40, batches: int = 1, *, seeds=runs.DEFAULT_SEEDS,
        runs_dir: str | None = None, train_steps: int | None = None, memory: int | None = None, budget: int = 12,
        converged_steps: int = 100, converged_tol: float = 1e-6, power_iters: int = 100,
        probes: int = 8, examples: int | None = None, converged_memory: int | None = None) -> dict[str, list[dict]]:
    """Returns ``{setting: [per-seed results]}``; writes results.md/json and the figures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    memory = memory or steps
    if not run_dirs:
        runs_dir = runs_dir or runs.digits_runs_dir(size, train_steps)
        run_dirs = runs.train_runs(runs_dir, runs.seeded(settings(size, train_steps), seeds))
    groups = {name: [analyse(r, steps, batches, memory, budget, converged_steps, converged_tol, power_iters, probes,
                             examples, converged_memory) for r in members]
              for name, members in runs.group_runs(run_dirs).items()}
    paths = plot(groups, out)
    first = next(iter(groups.values()))[0]
    heading = (f"Solver convergence of trained models ({first['data']}, {steps} steps recorded, first {batches} "
               f"evaluation batch(es), {first['examples']} examples)")
    body = ["Settings and seeds: " + "; ".join(f"{rs[0]['label']} ({name}): seeds {[r['seed'] for r in rs]}"
                                                 for name, rs in groups.items()) + ".", "", *tables(
        groups, steps, budget, converged_steps, converged_tol, converged_memory)]
    figures.write_results(out, heading, body, paths, groups)
    return groups


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run(FLAGS.out, FLAGS.runs, FLAGS.size, FLAGS.steps, FLAGS.batches, seeds=runs.parse_seeds(FLAGS.seeds),
        runs_dir=FLAGS.runs_dir, train_steps=FLAGS.train_steps, memory=FLAGS.memory, budget=FLAGS.budget,
        converged_steps=FLAGS.converged_steps, converged_tol=FLAGS.converged_tol, power_iters=FLAGS.power_iters,
        probes=FLAGS.probes, examples=FLAGS.examples, converged_memory=FLAGS.converged_memory)
    print(f"wrote {FLAGS.out}/results.md, forward.png, backward.png")


def define_flags():
    """The command-line flags (defined on demand: importing this module defines none, so
    several scripts can be imported into one process)."""
    flags.DEFINE_string("out", "results/convergence", "Results folder.")
    flags.DEFINE_list("runs", [], "Run folders to analyse, grouped by config without the seed "
                      "(default: the shared digits runs without and with JR).")
    flags.DEFINE_string("runs_dir", None, "Folder of the shared digits runs (default runs/reproduce/digits, "
                        "_large for --size=large).")
    flags.DEFINE_enum("size", "small", list(runs.DIGITS_LENGTH), "Digits runs: 500 (small) or 2000 steps.")
    flags.DEFINE_string("seeds", "0,1,2", "Seeds of the digits runs, comma-separated.")
    flags.DEFINE_integer("train_steps", None, "Train the digits runs for this many steps instead (a quick check; "
                         "own runs folder).")
    flags.DEFINE_integer("steps", 40, "Solver steps to record.")
    flags.DEFINE_integer("batches", 1, "Evaluation batches per run.")
    flags.DEFINE_integer("memory", None, "Solver memory of control (a) (default: --steps, nothing dropped).")
    flags.DEFINE_integer("budget", 12, "Step budget at which the Jacobian is also measured (the trained limit).")
    flags.DEFINE_integer("converged_steps", 100, "Step limit of the converged solve of control (b).")
    flags.DEFINE_float("converged_tol", 1e-6, "Tolerance of the converged solve of control (b).")
    flags.DEFINE_integer("converged_memory", None, "Solver memory of the converged solve (default: "
                         "--converged_steps; lower it for large states, e.g. causal solvers on long sequences).")
    flags.DEFINE_integer("examples", None, "At most this many examples of the --batches batches (default: all).")
    flags.DEFINE_integer("power_iters", 100, "Power-method iterations for the spectral radius.")
    flags.DEFINE_integer("probes", 8, "Hutchinson probes for ||J||_F^2/d.")


if __name__ == "__main__":
    define_flags()
    sys.exit(app.run(main))
