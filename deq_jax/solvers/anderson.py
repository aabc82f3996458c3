"""Anderson acceleration for z = f(z), per example.

Keeps the last ``m`` iterates x_i and residuals g_i = f(x_i) - x_i and mixes them,

    alpha = argmin ||sum_i alpha_i g_i||^2 + lam * s * ||alpha||^2  s.t.  sum_i alpha_i = 1,
    x_next = sum_i alpha_i (x_i + beta * g_i),

with s = mean_i ||g_i||^2, so the regularization is relative to the residuals' scale and
the small m x m system (G G^T + lam s I) w = 1, alpha = w / sum(w) is never singular.
The Gram matrix G G^T is kept between steps and gains one row per step. Should the
solve still fail (non-finite alpha), that example takes a plain mixing step instead.

Causal mode (``causal_axis``, see ``solvers.base``): the Gram matrix is one per position,
built from prefix inner products over positions <= t (``[B, T, m, m]``), so position t
is mixed with its own weights alpha_t that read no later position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from deq_jax.solvers import base

Array = jax.Array


class AndersonState(NamedTuple):
    ps: Array  # [B, m, D] proposals x_i + beta g_i (batch first: the products are batched matvecs); causal [B, m, T, D]
    gs: Array  # [B, m, D] residuals g_i = f(x_i) - x_i; causal [B, m, T, D]
    gram: Array  # [B, m, m] g_i . g_j; causal [B, T, m, m], prefix inner products <g_i, g_j>_t
    count: Array  # [] entries written so far


def _solve_spd(a: Array, b: Array) -> Array:
    """Solves ``a w = b`` for symmetric positive definite ``a`` (``[..., m, m]``, ``[..., m]``)
    by Gaussian elimination without pivoting (stable for such matrices), unrolled over the
    m rows: for Anderson's few rows one fused pass per row, where ``jnp.linalg.solve``
    calls LAPACK once per matrix on CPU (5x slower at m = 5, B = 64)."""
    m = a.shape[-1]
    aug = jnp.concatenate([a, b[..., None]], axis=-1)
    for k in range(m):
        row = aug[..., k, :] / aug[..., k, k : k + 1]
        aug = (aug - aug[..., :, k : k + 1] * row[..., None, :]).at[..., k, :].set(row)
    return aug[..., -1]


def _method(memory: int, regularization: float, mixing: float) -> base.Method:
    def init(z, fz):
        zeros = jnp.zeros((z.shape[0], memory) + z.shape[1:], z.dtype)
        gram = jnp.zeros(z.shape[:-1] + (memory, memory), z.dtype)
        return AndersonState(ps=zeros, gs=zeros, gram=gram, count=jnp.int32(0))

    def step(s: AndersonState, z, fz):
        eye = jnp.eye(memory, dtype=z.dtype)
        g = fz - z
        slot = s.count % memory
        # sum_i alpha_i (x_i + beta g_i) is one combination of the stored proposals.
        ps = s.ps.at[:, slot].set(z + mixing * g)
        gs = s.gs.at[:, slot].set(g)
        row = base.pcoeffs(gs, g)  # [B, (T,) m]
        gram = s.gram.at[..., slot, :].set(row).at[..., :, slot].set(row)
        valid = jnp.arange(memory) < jnp.minimum(s.count + 1, memory)  # [m]
        pair = valid[:, None] & valid[None, :]
        scale = jnp.sum(jnp.where(valid, jnp.diagonal(gram, axis1=-2, axis2=-1), 0.0), axis=-1)
        scale = scale / jnp.sum(valid) + jnp.finfo(z.dtype).tiny
        a = jnp.where(pair, gram, eye) + (regularization * scale)[..., None, None] * (eye * valid)
        w = _solve_spd(a, jnp.broadcast_to(valid.astype(z.dtype), gram.shape[:-1]))  # [B, (T,) m]
        alpha = w / jnp.sum(w, axis=-1, keepdims=True)
        ok = jnp.all(jnp.isfinite(alpha), axis=-1, keepdims=True)
        alpha = jnp.where(ok, alpha, jax.nn.one_hot(slot, memory, dtype=z.dtype))
        new = AndersonState(ps=ps, gs=gs, gram=gram, count=s.count + 1)
        return base.combine(alpha, ps), new

    return base.Method(init, step)


def anderson(
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
    memory: int = 5,
    regularization: float = 1e-4,
    mixing: float = 1.0,
) -> base.SolverResult:
    """Solves ``z = f(z)`` per example with Anderson acceleration.

    Args:
      f, z0, max_steps, tol, stop_mode: as for :func:`deq_jax.solvers.broyden`.
      step_limit: optional int (may be traced, e.g. under ``jit``) that lowers the
        step limit to ``min(step_limit, max_steps)`` without recompiling.
      causal_axis: as for :func:`deq_jax.solvers.broyden` (per-position mixing weights).
      precision: matmul precision of f's evaluations: None (the platform default,
        TF32 for float32 on NVIDIA GPUs) or a ``jax.default_matmul_precision`` value such
        as ``"highest"`` (full float32); see ``solvers.base.MATMUL_PRECISIONS``.
      early_exit, snapshots: as for :func:`deq_jax.solvers.broyden`.
      memory: ``m``, the number of past iterates mixed.
      regularization: ``lam``, Tikhonov weight relative to the mean squared residual.
      mixing: ``beta`` in (0, 1]; 1 mixes the f values, smaller values damp.

    Returns:
      A :class:`SolverResult`.

    Example:
      >>> import jax.numpy as jnp
      >>> from deq_jax import solvers
      >>> result = solvers.anderson(jnp.cos, jnp.zeros((2, 3)))   # z = cos z, 2 examples
      >>> [round(v, 3) for v in result.z[:, 0].tolist()]
      [0.739, 0.739]
      >>> result.converged.tolist()
      [True, True]
    """
    if not isinstance(memory, int) or memory < 1:
        raise ValueError(f"memory must be a positive int, got {memory!r}")
    base.validate(max_steps, tol, stop_mode)
    memory = min(memory, max_steps)  # a solve never makes more entries than steps: no unused slots
    if not regularization >= 0:
        raise ValueError(f"regularization must be >= 0, got {regularization!r}")
    if not 0 < mixing <= 1:
        raise ValueError(f"mixing must be in (0, 1], got {mixing!r}")
    return base.solve(
        _method(memory, regularization, mixing), f, z0, max_steps, tol, stop_mode, step_limit, causal_axis, precision,
        early_exit, snapshots,
    )
