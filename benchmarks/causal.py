"""Causal against ordinary solving of a DEQ-Transformer cell: cost and convergence.

    python benchmarks/causal.py              # pydoc-size cell (B 16, T 64, d 128), gains 1 and 2

For each solver, ordinary (whole-sequence inner products, per-example stopping) and
causal (``causal_axis=1``: prefix inner products and per-prefix stopping), prints

* f evals and the worst relative residual of a solve to tol 1e-3 with at most 30 steps;
* the worst relative residual after exactly 12 steps (the trained budget of the pydoc
  config) and the time of that 12-step solve;
* overhead = time of the 12-step solve / (13 x f), with f timed inside a while loop as
  in ``benchmarks/solvers.py`` (1.0 is the floor), and the causal/ordinary time ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SOLVERS = ("broyden", "anderson", "fixed_point_iteration")
BUDGET = 12


def run(gain: float, repeats: int) -> str:
    import jax
    import jax.numpy as jnp

    from benchmarks import problems
    from benchmarks.solvers import _in_while_loop, _table, _time
    from deq_jax import solvers

    f, params, x, z0 = problems.transformer(gain=gain)
    loop_n = 20
    f_loop = jax.jit(lambda p, x, z: _in_while_loop(lambda z: f(p, x, z), loop_n)(z))
    rows, times = [], {}
    for name in SOLVERS:
        for causal in (None, 1):

            def solve(p, x, z0, max_steps, tol, name=name, causal=causal):
                return solvers.get(name)(lambda z: f(p, x, z), z0, max_steps=max_steps, tol=tol, causal_axis=causal)

            to_tol = jax.jit(lambda p, x, z0, s=solve: s(p, x, z0, 30, 1e-3))
            at_budget = jax.jit(lambda p, x, z0, s=solve: s(p, x, z0, BUDGET, 1e-12))
            r_tol, r_budget = to_tol(params, x, z0), at_budget(params, x, z0)
            t_budget, t_f = _time([(at_budget, (params, x, z0)), (f_loop, (params, x, z0))], repeats)
            times[name, causal] = t_budget
            f_time = t_f / loop_n
            rows.append([
                name + (" (causal)" if causal else ""),
                int(r_tol.f_evals),
                f"{float(jnp.max(r_tol.rel_residual)):.1e}",
                f"{float(jnp.max(r_budget.rel_residual)):.1e}",
                f"{t_budget * 1e3:.1f}",
                f"{t_budget / ((BUDGET + 1) * f_time):.2f}",
                f"{t_budget / times[name, None]:.2f}" if causal else "",
            ])
    header = ["solver", "f evals to 1e-3 (max 30)", "max rel there", f"max rel at {BUDGET} steps",
              f"{BUDGET}-step solve ms", "overhead", "causal / ordinary time"]
    return f"### gain {gain}: f = {f_time * 1e3:.2f} ms\n\n" + _table(header, rows) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gains", default="1,2")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"# Causal solving benchmark ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)\n")
    for gain in args.gains.split(","):
        print(run(float(gain), args.repeats), flush=True)


if __name__ == "__main__":
    main()
