"""Plain (optionally damped) fixed-point iteration: z <- (1 - damping) f(z) + damping z."""

from __future__ import annotations

from collections.abc import Callable

from deq_jax.solvers import base


def _method(damping: float) -> base.Method:
    def init(z, fz):
        return ()

    def step(state, z, fz):
        return z + (1.0 - damping) * (fz - z), state

    return base.Method(init, step)


def fixed_point_iteration(
    f: Callable,
    z0,
    *,
    max_steps: int = 30,
    tol: float = 1e-3,
    stop_mode: str = "rel",
    step_limit=None,
    causal_axis: int | None = None,
    precision: str | None = None,
    early_exit: bool = True,
    snapshots: tuple[int, ...] = (),
    damping: float = 0.0,
) -> base.SolverResult:
    """Solves ``z = f(z)`` per example by iterating ``f``.

    Converges when ``f`` is a contraction; ``damping`` in [0, 1) keeps that share of
    the old iterate, which helps maps whose Jacobian has eigenvalues near -1.

    Args:
      f, z0, max_steps, tol, stop_mode: as for :func:`deq_jax.solvers.broyden`.
      step_limit: optional int (may be traced, e.g. under ``jit``) that lowers the
        step limit to ``min(step_limit, max_steps)`` without recompiling.
      causal_axis: as for :func:`deq_jax.solvers.broyden`; iteration mixes no positions,
        so this changes only the stopping (per prefix) and the returned iterate (the last).
      precision: matmul precision of f's evaluations: None (the platform default,
        TF32 for float32 on NVIDIA GPUs) or a ``jax.default_matmul_precision`` value such
        as ``"highest"`` (full float32); see ``solvers.base.MATMUL_PRECISIONS``.
      early_exit, snapshots: as for :func:`deq_jax.solvers.broyden`.
      damping: weight of the old iterate; 0 is plain iteration.

    Returns:
      A :class:`SolverResult`.

    Example:
      >>> import jax.numpy as jnp
      >>> from deq_jax import solvers
      >>> result = solvers.fixed_point_iteration(jnp.cos, jnp.zeros((2, 3)), max_steps=50)
      >>> [round(v, 3) for v in result.z[:, 0].tolist()]   # z = cos z, 2 examples
      [0.739, 0.739]
      >>> result.n_steps.tolist()      # contracts by 0.67 a step: Broyden takes 4
      [18, 18]
    """
    if not 0 <= damping < 1:
        raise ValueError(f"damping must be in [0, 1), got {damping!r}")
    return base.solve(
        _method(damping), f, z0, max_steps, tol, stop_mode, step_limit, causal_axis, precision, early_exit, snapshots
    )
