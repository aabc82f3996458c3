"""What one solver step launches: the kernels in each solver's while-loop body.

    python benchmarks/loop_kernels.py                     # dense and conv, every solver
    python benchmarks/loop_kernels.py --problems dense

Where one f is short (tens of microseconds on a GPU), a solver's overhead is set by how
many kernels its loop body launches, not by its arithmetic. This script compiles each
jitted solve (``benchmarks/problems.py``, the settings of ``benchmarks/solvers.py``) for
the default backend and reads the optimized HLO of its while loop: every instruction of
the body that runs as its own kernel or runtime thunk (fusions, dots, convolutions,
library custom calls, copies, dynamic-update-slices, ...; not parameters, tuples,
get-tuple-elements, constants or bitcasts), counted through ``call``s (on a GPU, XLA
outlines command-buffer sequences into called computations; each call is one graph
launch) but not into fusions. It prints per problem and solver:

* body: kernels per solver step; f: the same count for a while loop that only applies
  f (the floor a solver could reach); bookkeeping = body - f;
* copies: whole-buffer copies in the body; branches: ``conditional`` instructions (each
  one a device-to-host copy of its predicate per step on a GPU; the solvers have none);
* cond: kernels of the loop's condition (its predicate is copied to the host every step);
* calls: command-buffer (``call``) launches in the body.

Counts, not times: they do not depend on the machine's load. The GPU's counts differ
from the CPU's (XLA fuses differently there); run it on each.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/loop_kernels.py` without PYTHONPATH=.
    sys.path.insert(0, ROOT)

from benchmarks import problems  # noqa: E402
from benchmarks.solvers import MAX_STEPS, SOLVER_ROWS, TOL  # noqa: E402
from deq_jax import solvers  # noqa: E402

# Instructions that are not kernels (no work, or views).
NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = .*? ([\w\-]+)\((.*)$")


def computations(hlo: str) -> dict[str, list[str]]:
    """HLO text -> ``{computation name: its instruction lines}``."""
    found, name = {}, None
    for line in hlo.splitlines():
        if name is None:
            match = _COMPUTATION.match(line)
            if match:
                name = match.group(1)
                found[name] = []
        elif line.strip() == "}":
            name = None
        else:
            found[name].append(line)
    return found


def _called(rest: str, key: str) -> str | None:
    match = re.search(key + r"=%?([\w.\-]+)", rest)
    return match.group(1) if match else None


def count(comps: dict[str, list[str]], name: str) -> dict[str, int]:
    """Kernel counts of computation ``name``, through ``call``s (not into fusions)."""
    tally = {"kernels": 0, "copies": 0, "branches": 0, "calls": 0}
    for line in comps[name]:
        match = _INSTRUCTION.match(line)
        if not match or match.group(1) in NOT_KERNELS:
            continue
        op, rest = match.groups()
        if op == "call":
            tally["calls"] += 1
            for key, value in count(comps, _called(rest, "to_apply")).items():
                tally[key] += value
            continue
        tally["kernels"] += 1
        tally["copies"] += op == "copy"
        tally["branches"] += op == "conditional"
    return tally


def main_loop(hlo: str) -> tuple[dict[str, int], dict[str, int]]:
    """Counts of the body and of the condition of the while loop with the largest body."""
    comps = computations(hlo)
    loops = []
    for lines in comps.values():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if match and match.group(1) == "while":
                loops.append((_called(match.group(2), "body"), _called(match.group(2), "condition")))
    if not loops:
        raise RuntimeError("no while loop in the compiled solve")
    body, condition = max(loops, key=lambda bc: count(comps, bc[0])["kernels"])
    return count(comps, body), count(comps, condition)


def f_loop_kernels(f, params, x, z0) -> int:
    """Kernels per step of a while loop that only applies f (and counts its steps)."""

    def run(z):
        return jax.lax.fori_loop(0, MAX_STEPS, lambda _, zz: f(params, x, zz), z)

    body, _ = main_loop(jax.jit(run).lower(z0).compile().as_text())
    return body["kernels"]


def rows(problem: str) -> list[list]:
    f, params, x, z0 = problems.PROBLEMS[problem]()
    f_kernels = f_loop_kernels(f, params, x, z0)
    out = []
    for label, name, options in SOLVER_ROWS:
        solve = jax.jit(lambda z, name=name, options=options: solvers.get(name)(
            lambda zz: f(params, x, zz), z, max_steps=MAX_STEPS, tol=TOL, **options))
        body, condition = main_loop(solve.lower(z0).compile().as_text())
        out.append([problem, label, body["kernels"], f_kernels, body["kernels"] - f_kernels, body["copies"],
                    body["branches"], condition["kernels"], body["calls"]])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", default="dense,conv")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}\n")
    print("| problem | solver | body | f | bookkeeping | copies | branches | cond | calls |")
    print("|---|---|---|---|---|---|---|---|---|")
    for problem in args.problems.split(","):
        for row in rows(problem):
            print("| " + " | ".join(str(v) for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
