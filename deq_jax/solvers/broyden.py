"""Limited-memory ("good") Broyden's method for z = f(z), per example.

Broyden finds a root of g(z) = f(z) - z with quasi-Newton steps z <- z - H g(z), where
H approximates the inverse Jacobian of g. Good Broyden starts from H = -I (so the first
step is a plain f step) and, for each secant pair (s, y) = (dz, dg) in turn, takes the
rank-one correction

    H <- H + (s - H y) (s^T H) / (s^T H y).

The limited-memory version here keeps the last ``memory`` pairs and applies exactly these
corrections for them, from H = -I, at every step (as L-BFGS does), in the compact form

    H = -I + (S + Y) M^{-1} S^T,    M = tril(S^T S, -1) + S^T Y,

with the pairs as the columns of S and Y in the order they were made (oldest first);
``tril(., -1)`` keeps the products of each pair with the older ones. The next step is
``-H g = g - (S + Y) M^{-1} S^T g``. ``M`` (``memory`` x ``memory``) is solved by
elimination in that order: its k-th pivot is ``-s_k^T H_{k-1} y_k``, the rank-one
denominator, so a pair whose denominator is 0 or not finite is dropped, as the recursive
form drops it.

Memory does not grow with ``max_steps``: the big buffers are rings of ``memory`` slots
(one written per step, in place), and the small products keep the chronological order.
Per step the method reads the buffers three times (S once, S + Y twice) and solves one
small system; keeping only the last pairs is what lets it converge where a ring of
recursive corrections stalls (each correction was formed with older pairs that the ring
has since dropped).

Causal mode (``causal_axis``, see ``solvers.base``): every inner product above is a
prefix inner product, so position t takes the step Broyden would take on the prefix
problem (positions <= t) with its own small system ``[B, T, m, m]``, reading no later
position. For ``T = 1`` it is the method above.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from deq_jax.solvers import base

Array = jax.Array
DEFAULT_MEMORY = 20


class BroydenState(NamedTuple):
    """Shapes: ``[B, (T,) ...]``, with ``T`` only in causal mode; ``m`` = memory.

    The buffers are rings (pair i in slot ``i % m``); the small products are in the order
    the pairs were made, index ``m - 1`` the newest.
    """

    s: Array  # [B, m, (T,) D] steps s_i = dz_i
    a: Array  # [B, m, (T,) D] s_i + y_i, y_i = dg_i
    ss: Array  # [B, (T,) m, m] <s_i, s_j>
    sy: Array  # [B, (T,) m, m] <s_i, y_j>
    sg: Array  # [B, (T,) m] <s_i, g_prev>
    valid: Array  # [B, (T,) m] bool: the pair exists (written, not dropped by a restart)
    z_prev: Array  # [B, (T,) D]
    g_prev: Array  # [B, (T,) D] g(z_prev) = f(z_prev) - z_prev
    count: Array  # [] pairs made so far


def _append(x: Array, new: Array, axis: int) -> Array:
    """Drops index 0 of ``x`` along ``axis`` and appends ``new`` (size 1 there) at the end."""
    return jnp.concatenate([jax.lax.slice_in_dim(x, 1, x.shape[axis], axis=axis), new], axis=axis)


def _append_pair(products: Array, row: Array, column: Array) -> Array:
    """Shifts an ``[..., m, m]`` matrix one pair older and sets the newest row and column."""
    top = jnp.concatenate([products[..., 1:, 1:], column[..., :-1, None]], axis=-1)
    return jnp.concatenate([top, row[..., None, :]], axis=-2)


def eliminate(mat: Array, rhs: Array, valid: Array) -> Array:
    """Solves ``mat c = rhs`` (``[..., m, m]``, ``[..., m]``) by Gaussian elimination in index
    order, without pivoting. Index k is dropped (``c_k = 0``, its equation removed) when it is
    not ``valid`` or its pivot is 0 or not finite."""
    m = mat.shape[-1]
    small = jnp.finfo(mat.dtype).tiny ** 0.5
    aug = jnp.concatenate([mat, rhs[..., None]], axis=-1)  # [..., m, m + 1]
    for k in range(m):
        row = aug[..., k, :]
        pivot = row[..., k]
        ok = valid[..., k] & jnp.isfinite(pivot) & (jnp.abs(pivot) > small)
        unit = jax.nn.one_hot(k, m + 1, dtype=mat.dtype)
        row = jnp.where(ok[..., None], row / jnp.where(ok, pivot, 1.0)[..., None], unit)
        column = aug[..., :, k] * (jnp.arange(m) != k)
        aug = (aug - column[..., None] * row[..., None, :]).at[..., k, :].set(row)
    return aug[..., -1]


def _method(memory: int) -> base.Method:
    m = memory

    def init(z, fz):
        buffer = jnp.zeros((z.shape[0], m) + z.shape[1:], z.dtype)
        lead = z.shape[:-1]  # [B] or [B, T]
        products = jnp.zeros(lead + (m, m), z.dtype)
        return BroydenState(
            s=buffer, a=buffer, ss=products, sy=products, sg=jnp.zeros(lead + (m,), z.dtype),
            valid=jnp.zeros(lead + (m,), bool), z_prev=z, g_prev=fz - z, count=jnp.int32(0),
        )

    def step(st: BroydenState, z, fz):
        g = fz - z
        s_new = z - st.z_prev
        y_new = g - st.g_prev
        slot = st.count % m
        s = st.s.at[:, slot].set(s_new)
        a = st.a.at[:, slot].set(s_new + y_new)

        def chronological(coeffs):  # [..., m] by slot -> oldest first, newest (slot) last
            return jnp.roll(coeffs, -(slot + 1), axis=-1)

        # One pass over S gives <s_i, s_new> and <s_i, g>; one over S + Y gives <s_new, a_j>.
        both = base.pcoeffs_stacked(s, jnp.stack([s_new, g], axis=1))  # [B, (T,) 2, m]
        s_s, s_g = chronological(both[..., 0, :]), chronological(both[..., 1, :])
        s_a = chronological(base.pcoeffs(a, s_new))
        # <s_i, y_new> = <s_i, g> - <s_i, g_prev>; the newest <s_new, g_prev> is new.
        s_gprev = _append(st.sg, base.pdot(s_new, st.g_prev)[..., None], axis=-1)
        ss = _append_pair(st.ss, s_s, s_s)
        sy = _append_pair(st.sy, s_a - s_s, s_g - s_gprev)
        valid = _append(st.valid, jnp.ones_like(st.valid[..., :1]), axis=-1)
        mat = jnp.tril(ss, -1) + sy
        c = eliminate(mat, jnp.where(valid, s_g, 0.0), valid)
        update = g - base.combine(jnp.roll(c, slot + 1, axis=-1), a)
        # Overflow for an example (g itself is finite, or the loop has stopped it): it
        # restarts from H = -I (its pairs dropped, its buffers zeroed) with a plain f step.
        # The buffers are only touched (a cond, not a select every step) when one overflowed.
        overflow = ~jnp.all(jnp.isfinite(update), axis=-1)  # [B, (T)]
        if overflow.ndim == 2:  # causal: position t's products enter every later prefix
            overflow = jax.lax.cummax(overflow.astype(jnp.int32), axis=1).astype(bool)
        update = jnp.where(overflow[..., None], g, update)
        valid = valid & ~overflow[..., None]
        mask = overflow[:, None, ..., None]  # [B, 1, (T,) 1], like the buffers
        s, a = jax.lax.cond(
            jnp.any(overflow),
            lambda: (jnp.where(mask, 0.0, s), jnp.where(mask, 0.0, a)),
            lambda: (s, a),
        )
        new = BroydenState(s=s, a=a, ss=ss, sy=sy, sg=s_g, valid=valid, z_prev=z, g_prev=g, count=st.count + 1)
        return z + update, new

    return base.Method(init, step)


def broyden(
    f: Callable,
    z0,
    *,
    max_steps: int = 30,
    tol: float = 1e-3,
    stop_mode: str = "rel",
    step_limit=None,
    causal_axis: int | None = None,
    precision: str | None = None,
    memory: int = DEFAULT_MEMORY,
) -> base.SolverResult:
    """Solves ``z = f(z)`` per example with limited-memory Broyden.

    Args:
      f: maps a batch ``z`` (pytree of ``[B, ...]`` arrays) to one of the same shapes.
        Examples must not interact inside ``f`` (no batch statistics).
      z0: the initial batch.
      max_steps: the most solver updates (``f`` runs at most ``max_steps + 1`` times).
      tol: stop an example once its stop-mode residual is below ``tol``.
      stop_mode: ``"rel"`` for ``||f(z)-z|| / ||f(z)||``, ``"abs"`` for ``||f(z)-z||``.
      step_limit: optional int (may be traced, e.g. under ``jit``) that lowers the
        step limit to ``min(step_limit, max_steps)`` without recompiling.
      causal_axis: optional axis (>= 1) of every leaf of ``z0`` along which ``f`` is
        causal (e.g. 1 for ``[B, T, D]`` sequence states); the solver is then causal at
        every iterate (``solvers.base`` module doc). None: ordinary per-example solve.
      precision: matmul precision of f's evaluations: None (the platform default,
        TF32 for float32 on NVIDIA GPUs) or a ``jax.default_matmul_precision`` value such
        as ``"highest"`` (full float32); see ``solvers.base.MATMUL_PRECISIONS``.
      memory: secant pairs kept (the last ones); costs ``2 * memory * B * D`` floats.

    Returns:
      A :class:`SolverResult`.
    """
    if not isinstance(memory, int) or memory < 1:
        raise ValueError(f"memory must be a positive int, got {memory!r}")
    return base.solve(_method(memory), f, z0, max_steps, tol, stop_mode, step_limit, causal_axis, precision)
