"""How exact the reversible gradient is in float32: the rebuilt z0 and the gradient.

    python benchmarks/reversible_precision.py                       # both cells, beta 0.5/0.8/1.2, 5-50 steps
    python benchmarks/reversible_precision.py --cells tanh --steps 5,10

The reverse pass rebuilds every iterate with ``z_n = (z_{n+1} - beta f(y_{n+1})) / (1 - beta)``
(and the same for y). In exact arithmetic that is the forward pass run backwards; in floating
point each step divides the rounding of the one after it by (1 - beta) and by the forward
step's contraction, so the error grows geometrically with the number of steps. Measured
here, for each cell, beta and number of steps n (every example runs exactly n steps):

* ``z0 error``: ``max_b ||rebuilt z0_b - z0_b|| / ||z_n,b||`` of the float32 reverse pass
  (what the training metrics report as ``bwd_residual``, :class:`deq_jax.BackwardStats`);
* ``grad error``: ``||g32 - g64|| / ||g64||`` over all parameters, where g32 is the float32
  reversible gradient and g64 backpropagation through the same n unrolled coupled steps in
  float64 (the exact gradient of that computation);
* ``grad error (f64 reversal)``: the same for the float64 reversible gradient: where even
  float64 loses digits.

Cells: ``tanh`` (``tanh(z W + x)``, width 64, ``||W||_2 = 0.9``, batch 8) and
``mdeq_digits`` (the Quickstart's MDEQ cell at its initialization on 8 digits).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys

if __name__ == "__main__":
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if ROOT not in sys.path:  # `python benchmarks/reversible_precision.py` without PYTHONPATH=.
        sys.path.insert(0, ROOT)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import deq_jax  # noqa: E402
from benchmarks.jr_cost import mdeq_digits  # noqa: E402


def tanh_cell():
    k1, k2 = jax.random.split(jax.random.key(0))
    w = jax.random.normal(k1, (64, 64))
    w = 0.9 * w / jnp.linalg.norm(w, 2)
    x = jax.random.normal(k2, (8, 64))

    def f(params, x, z):
        return jnp.tanh(z @ params["w"] + x)

    return f, {"w": w}, x, jnp.zeros_like(x)


CELLS = {"tanh": tanh_cell, "mdeq_digits": lambda: mdeq_digits(batch=8)}


def cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def measure(f, params, x, z0, beta: float, steps: int) -> dict:
    forward = deq_jax.SolverConfig("reversible", max_steps=steps, tol=1e-30, options={"beta": beta})

    def rev_loss(p, xx, zz):
        z, _ = deq_jax.fixed_point(f, p, xx, zz, forward=forward, backward=deq_jax.Reversible())
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(z))

    def unrolled_loss(p, xx, zz):
        y = z = zz
        for _ in range(steps):
            y = jax.tree.map(lambda a, b: (1 - beta) * a + beta * b, y, f(p, xx, z))
            z = jax.tree.map(lambda a, b: (1 - beta) * a + beta * b, z, f(p, xx, y))
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(z))

    def flat(g):
        return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(g)]).astype(jnp.float64)

    p64, x64, z64 = cast(params, jnp.float64), cast(x, jnp.float64), cast(z0, jnp.float64)
    truth = flat(jax.jit(jax.grad(unrolled_loss))(p64, x64, z64))
    out = {}
    for name, dtype in (("f32", jnp.float32), ("f64", jnp.float64)):
        p, xx, zz = cast(params, dtype), cast(x, dtype), cast(z0, dtype)
        g = flat(jax.jit(jax.grad(rev_loss))(p, xx, zz))
        out[f"grad_{name}"] = float(jnp.linalg.norm(g - truth) / jnp.linalg.norm(truth))
    # The rebuilt z0 of the float32 reversal, through the backward probe.
    p, xx, zz = cast(params, jnp.float32), cast(x, jnp.float32), cast(z0, jnp.float32)
    batch = jax.tree.leaves(zz)[0].shape[0]

    def probed(p, probe):
        z, _ = deq_jax.fixed_point(f, p, xx, zz, forward=forward, backward=deq_jax.Reversible(), probe=probe)
        return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(z))

    stats = jax.jit(jax.grad(probed, argnums=1))(p, deq_jax.BackwardStats.zeros(batch))
    out["z0"] = float(jnp.max(stats.rel_residual))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", default="tanh,mdeq_digits")
    parser.add_argument("--betas", default="0.5,0.8,1.2")
    parser.add_argument("--steps", default="5,10,20,30,50")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{datetime.date.today()} · commit {commit} · {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores · jax {jax.__version__} · {jax.devices()[0].platform}")
    print("\n| cell | beta | steps | z0 error (f32) | grad error (f32) | grad error (f64 reversal) |")
    print("|---|---|---|---|---|---|")
    for cell in [c for c in args.cells.split(",") if c]:
        f, params, x, z0 = CELLS[cell]()
        for beta in [float(b) for b in args.betas.split(",")]:
            for steps in [int(s) for s in args.steps.split(",")]:
                m = measure(f, params, x, z0, beta, steps)
                print(f"| {cell} | {beta:g} | {steps} | {m['z0']:.1e} | {m['grad_f32']:.1e} | {m['grad_f64']:.1e} |",
                      flush=True)


if __name__ == "__main__":
    main()
