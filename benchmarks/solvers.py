"""Solver overhead benchmark: how much a solve costs beyond its f evaluations.

    python benchmarks/solvers.py                  # every problem, default and tuned XLA flags
    python benchmarks/solvers.py --problems dense --settings default

For each problem (see benchmarks/problems.py: float32, z0 = 0, target relative
residual 1e-4, at most 100 steps) and each solver, prints

* f evals: how many times the solve evaluated f on the batch; max rel: the largest
  per-example relative residual at the returned z; solve: time of one jitted solve;
* overhead = solve / (f evals x f), with f = one f evaluation timed inside a jitted
  while loop, as in a solve (the floor is 1.0: a solver that costs nothing beyond f);
* fwd+bwd: one jitted jax.grad of mean(z*^2) through deq_jax.fixed_point with the
  implicit backward (same solver both ways, backward tol 1e-4), and its ratio to
  fwd evals x f + (bwd evals + 1) x vjp, with vjp = one z-VJP of f timed inside a loop;
* the Hutchinson Jacobian estimate (1 probe) and its gradient, relative to one
  jitted f call (both are single jitted calls);
* jaxopt's FixedPointIteration / AndersonAcceleration / Broyden where jaxopt is
  installed (pip install -e ".[benchmarks]"), with the same memory, tolerance set
  so that the whole batch reaches relative residual 1e-4 (jaxopt stops on one norm
  over the whole batch), and Broyden with stepsize 1 (no line search) like ours.

Each XLA flag setting runs in its own process (XLA reads flags once); timings are the
minimum over up to --repeats interleaved rounds after a compile-and-warm-up run; each
row's ratio uses the f (and VJP) timings of its own rounds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

SETTINGS = {
    "default": "",
    # Separate dots instead of XLA CPU's dot+elementwise+reduce fusions, and region
    # analysis in copy insertion (fewer buffer copies in while loops). Neither changes
    # what is computed.
    "tuned": "--xla_cpu_experimental_ynn_fusion_type=individual_dot --xla_cpu_copy_insertion_use_region_analysis=true",
}
TOL = 1e-4
MAX_STEPS = 100
# (row label, solver, options): Broyden at its default memory and at a smaller one.
SOLVER_ROWS = [
    ("broyden", "broyden", {"memory": 20}),
    ("broyden (memory 10)", "broyden", {"memory": 10}),
    ("anderson", "anderson", {"memory": 5}),
    ("fixed_point_iteration", "fixed_point_iteration", {}),
]


def _time(calls, repeats):
    """Minimum wall time of each ``(fn, args)`` in ``calls``, timed in interleaved rounds.

    Interleaving puts a solve and its f baseline under the same machine load; calls
    slower than 0.4 s x repeats per round get fewer rounds (at least 2).
    """
    import jax

    first = []
    for fn, args in calls:
        jax.block_until_ready(fn(*args))  # compile and warm up
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        first.append(time.perf_counter() - start)
    budget_s = 0.4 * repeats
    rounds = max(2, min(repeats, int(budget_s / max(sum(first), 1e-9))))
    best = list(first)
    for _ in range(rounds - 1):
        for i, (fn, args) in enumerate(calls):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _in_while_loop(step, n):
    """``x -> step`` applied n times inside a lax.while_loop, like a solver's body (with
    its convolutions in XLA CPU's fast layout on CPU, as the solvers put them)."""
    import jax

    from deq_jax.solvers import conv_layout

    step = conv_layout.on_cpu(step)

    def run(x):
        return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, step(c[1])), (0, x))[1]

    return run


def run_problem(name, repeats):
    import jax
    import jax.numpy as jnp

    import deq_jax
    from benchmarks import problems

    f, params, x, z0 = problems.PROBLEMS[name]()
    loop_n = 10 if name == "conv" else 100
    # Baselines: f and its z-VJP applied inside a while loop, as in a solve.
    f_loop = jax.jit(lambda p, x, z: _in_while_loop(lambda z: f(p, x, z), loop_n)(z))

    def vjp_loop(p, x, zs, g):
        _, vjp = jax.vjp(lambda z: f(p, x, z), zs)
        return _in_while_loop(lambda u: vjp(u)[0] + g, loop_n)(g)

    vjp_loop = jax.jit(vjp_loop)

    rows, grad_rows, f_times = [], [], []
    z_star = None
    for label, solver, options in SOLVER_ROWS:
        solve = jax.jit(
            lambda p, x, z0, s=solver, o=options: deq_jax.solvers.get(s)(
                lambda z: f(p, x, z), z0, max_steps=MAX_STEPS, tol=TOL, **o
            )
        )
        result = solve(params, x, z0)
        z_star = result.z if z_star is None else z_star
        g = jax.tree.map(lambda z: 2.0 * z / z.size, result.z)
        config = deq_jax.SolverConfig(solver, max_steps=MAX_STEPS, tol=TOL, options=options)

        def loss(p, config=config):
            z, _ = deq_jax.fixed_point(f, p, x, z0, forward=config, backward=config)
            return jnp.mean(jnp.square(z))

        grad = jax.jit(jax.grad(loss))
        adjoint_fn = jax.jit(lambda p, zs, g, c=config: deq_jax.adjoint_solve(f, p, x, zs, g, c))
        _, adjoint = adjoint_fn(params, result.z, g)
        t_solve, t_grad, t_f, t_vjp = _time(
            [(solve, (params, x, z0)), (grad, (params,)), (f_loop, (params, x, z0)),
             (vjp_loop, (params, x, result.z, g))],
            repeats,
        )
        f_time, vjp_time = t_f / loop_n, t_vjp / loop_n
        f_times.append((f_time, vjp_time))
        evals, bwd = int(result.f_evals), int(adjoint.f_evals)
        rows.append(
            [label, evals, f"{float(jnp.max(result.rel_residual)):.1e}", f"{t_solve * 1e3:.2f}",
             f"{t_solve / (evals * f_time):.2f}"]
        )
        ideal = evals * f_time + (bwd + 1) * vjp_time
        grad_rows.append([label, evals, bwd, f"{t_grad * 1e3:.2f}", f"{t_grad / ideal:.2f}"])

    key = jax.random.PRNGKey(0)
    jac = jax.jit(lambda p, zs: deq_jax.hutchinson_frobenius(lambda z: f(p, x, z), zs, key))
    jac_grad = jax.jit(
        jax.grad(lambda p, zs: jnp.mean(deq_jax.hutchinson_frobenius(lambda z: f(p, x, z), zs, key)))
    )
    f_once = jax.jit(lambda p, z: f(p, x, z))
    t_jac, t_jac_grad, t_f_once = _time(
        [(jac, (params, z_star)), (jac_grad, (params, z_star)), (f_once, (params, z_star))], repeats
    )

    f_time = min(t for t, _ in f_times)
    vjp_time = min(t for _, t in f_times)
    rows += _jaxopt_rows(f, params, x, z0, z_star, f_loop, loop_n, repeats)
    out = [
        f"### {name}: f = {f_time * 1e3:.3f} ms, z-VJP = {vjp_time * 1e3:.3f} ms (inside a while loop; "
        f"f alone, jitted: {t_f_once * 1e3:.3f} ms)",
        "",
        _table(["solver", "f evals", "max rel", "solve ms", "overhead"], rows),
        "",
        _table(["fwd+bwd (implicit)", "fwd evals", "bwd evals", "ms", "ratio"], grad_rows),
        "",
        _table(
            ["Jacobian (1 probe)", "ms", "ratio to jitted f"],
            [["estimate", f"{t_jac * 1e3:.2f}", f"{t_jac / t_f_once:.2f}"],
             ["its gradient", f"{t_jac_grad * 1e3:.2f}", f"{t_jac_grad / t_f_once:.2f}"]],
        ),
        "",
    ]
    return "\n".join(out)


def _jaxopt_rows(f, params, x, z0, z_star, f_loop, loop_n, repeats):
    try:
        import jaxopt
    except ImportError:
        return [["jaxopt (not installed)", "-", "-", "-", "-"]]
    import jax
    import jax.numpy as jnp

    from deq_jax.solvers import residual_norms

    batch = z0.shape[0]
    tol_abs = TOL * float(jnp.linalg.norm(f(params, x, z_star)))
    fixed = lambda z, p, x: f(p, x, z)  # noqa: E731
    solvers = {
        "jaxopt.FixedPointIteration": jaxopt.FixedPointIteration(fixed, maxiter=MAX_STEPS, tol=tol_abs),
        "jaxopt.AndersonAcceleration": jaxopt.AndersonAcceleration(
            fixed, history_size=5, ridge=1e-4, maxiter=MAX_STEPS, tol=tol_abs
        ),
        "jaxopt.Broyden": jaxopt.Broyden(
            lambda z, p, x: f(p, x, z) - z, history_size=20, stepsize=1.0, maxiter=MAX_STEPS, tol=tol_abs
        ),
    }
    rows = []
    for name, solver in solvers.items():
        run = jax.jit(lambda p, x, z0, s=solver: s.run(z0, p, x))
        z, state = run(params, x, z0)
        t, t_f = _time([(run, (params, x, z0)), (f_loop, (params, x, z0))], repeats)
        f_time = t_f / loop_n
        evals = int(state.iter_num) + 1
        _, rel = residual_norms(z.reshape(batch, -1), f(params, x, z).reshape(batch, -1))
        rows.append([name, evals, f"{float(jnp.max(rel)):.1e}", f"{t * 1e3:.2f}", f"{t / (evals * f_time):.2f}"])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="dense,dense_hard,conv")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"XLA flag settings: {list(SETTINGS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        for name in args.problems.split(","):
            print(run_problem(name, args.repeats), flush=True)
        return

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import platform

    print(f"# Solver benchmark ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)\n")
    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            sys.exit(f"unknown setting {setting!r}; choose from {list(SETTINGS)}")
        flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), SETTINGS[setting]]))
        print(f"## XLA flags: {setting} ({SETTINGS[setting] or 'none'})\n", flush=True)
        pythonpath = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=pythonpath)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--problems", args.problems,
               "--repeats", str(args.repeats)]
        subprocess.run(cmd, env=env, check=True)


if __name__ == "__main__":
    main()
