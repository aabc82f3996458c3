"""Early exit vs a fixed trip count (``early_exit=False``) for short, training-size solves.

    python benchmarks/trip_count.py                 # dense and conv, 6 and 12 steps
    python benchmarks/trip_count.py --problems dense --steps 6,12,30

A solve with early exit is a while loop whose predicate (some example still active and
the step limit not reached) is computed on the device; on a GPU, XLA copies it to the
host and waits for it before every step. With ``early_exit=False`` the loop runs exactly
``max_steps`` steps, a trip count XLA knows at compile time, so there is no predicate to
copy; the result is the same (tests/test_solvers.py), and f runs ``max_steps + 1`` times
whatever happens. The tolerance here (1e-12) is out of reach, so both loops run every
step and time the same f evaluations: the ratio fixed / early is the cost (> 1) or gain
(< 1) of the loop's structure alone. Interleaved rounds, minimum over ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/trip_count.py` without PYTHONPATH=.
    sys.path.insert(0, ROOT)

from benchmarks import problems  # noqa: E402
from benchmarks.solvers import SOLVER_ROWS, _table, _time  # noqa: E402
from deq_jax import solvers  # noqa: E402

TOL = 1e-12


def rows(problem: str, steps: list[int], repeats: int) -> list[list]:
    f, params, x, z0 = problems.PROBLEMS[problem]()
    out = []
    for label, name, options in SOLVER_ROWS:
        for n in steps:
            solves = [
                jax.jit(lambda p, x, z, early_exit=early_exit, name=name, n=n, options=options: solvers.get(name)(
                    lambda zz: f(p, x, zz), z, max_steps=n, tol=TOL, early_exit=early_exit, **options))
                for early_exit in (True, False)
            ]
            evals = [int(solve(params, x, z0).f_evals) for solve in solves]
            early_ms, fixed_ms = (1e3 * t for t in _time([(solve, (params, x, z0)) for solve in solves], repeats))
            out.append([problem, label, n, f"{evals[0]} / {evals[1]}", f"{early_ms:.2f}", f"{fixed_ms:.2f}",
                        f"{fixed_ms / early_ms:.3f}"])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", default="dense,conv")
    parser.add_argument("--steps", default="6,12")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}\n")
    steps = [int(n) for n in args.steps.split(",")]
    table = [row for problem in args.problems.split(",") for row in rows(problem, steps, args.repeats)]
    print(_table(["problem", "solver", "steps", "f evals early / fixed", "early exit ms", "fixed ms", "fixed / early"],
                 table))


if __name__ == "__main__":
    main()
