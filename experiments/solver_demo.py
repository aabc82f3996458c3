"""A first look at deq_jax: solve a small DEQ cell, differentiate it, measure its Jacobian.

    python -m experiments.solver_demo [--batch 32] [--width 256] [--spectral-norm 0.95]

Prints, for each root solver, the forward solve's steps and residuals, the implicit
backward solve's steps (read through the BackwardStats probe), and the Jacobian
regularization term of the paper (Hutchinson estimate of ||J_f(z*)||_F^2 / d) next
to its exact value and the power-method spectral radius.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import deq_jax


def cell(params, x, z):
    """f(z) = tanh(z W + x U + b): a small weight-tied DEQ cell."""
    return jnp.tanh(z @ params["w"] + x @ params["u"] + params["b"])


def make_params(key, width, spectral_norm):
    kw, ku = jax.random.split(key)
    w = jax.random.normal(kw, (width, width))
    return {
        "w": spectral_norm * w / jnp.linalg.norm(w, 2),
        "u": jax.random.normal(ku, (width, width)) / jnp.sqrt(width),
        "b": jnp.zeros((width,)),
    }


# The root solvers; the reversible iteration is compared in its own mode (a RevDEQ trains the
# iteration, not a fixed point: docs/guides/reversible.md).
ROOT_SOLVERS = tuple(name for name in deq_jax.solvers.SOLVERS if name != "reversible")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--spectral-norm", type=float, default=0.95, help="||W||_2 of the cell")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    kp, kx, kj = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    params = make_params(kp, args.width, args.spectral_norm)
    x = jax.random.normal(kx, (args.batch, args.width))
    z0 = jnp.zeros((args.batch, args.width))

    print(f"DEQ cell tanh(z W + x U + b): batch {args.batch}, width {args.width}, ||W||_2 = {args.spectral_norm}")
    print(f"{'solver':<22} {'fwd steps':>9} {'fwd rel res':>11} "
          f"{'bwd steps':>9} {'bwd rel res':>11} {'grad norm':>9} {'ms':>7}")
    for name in ROOT_SOLVERS:
        forward = deq_jax.SolverConfig(name, max_steps=60, tol=1e-4)
        backward = deq_jax.SolverConfig(name, max_steps=60, tol=1e-4)

        def loss(p, probe, forward=forward, backward=backward):
            z, result = deq_jax.fixed_point(cell, p, x, z0, forward=forward, backward=backward, probe=probe)
            return jnp.mean(jnp.square(z)), result

        step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        probe = deq_jax.BackwardStats.zeros(args.batch)
        jax.block_until_ready(step(params, probe))
        start = time.perf_counter()
        (grads, bstats), result = jax.block_until_ready(step(params, probe))
        ms = (time.perf_counter() - start) * 1e3
        gnorm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
        print(
            f"{name:<22} {float(jnp.mean(result.n_steps)):>9.1f} {float(jnp.max(result.rel_residual)):>11.1e} "
            f"{float(jnp.mean(bstats.n_steps)):>9.1f} {float(jnp.max(bstats.rel_residual)):>11.1e} "
            f"{gnorm:>9.2e} {ms:>7.1f}"
        )

    z_star, _ = deq_jax.fixed_point(cell, params, x, z0)
    fz = lambda z: cell(params, x, z)  # noqa: E731
    estimate = deq_jax.hutchinson_frobenius(fz, z_star, kj, num_probes=4)
    exact = deq_jax.exact_frobenius(fz, z_star)
    radius = deq_jax.spectral_radius(fz, z_star, kj)
    print("\nJacobian at z* (mean over the batch):")
    print(f"  ||J||_F^2 / d  Hutchinson (4 probes) {float(jnp.mean(estimate)):.4f}   "
          f"exact {float(jnp.mean(exact)):.4f}")
    print(f"  spectral radius (power method)       {float(jnp.mean(radius)):.4f}")


if __name__ == "__main__":
    main()
