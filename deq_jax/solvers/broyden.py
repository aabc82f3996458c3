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
``-H g = g - (S + Y) M^{-1} S^T g``. A new pair adds a row ``<s_new, s_j + y_j>`` and a
column ``<s_i, y_new>`` to M, and the oldest pair leaves with its row and column, so
``M^{-1}`` (``memory`` x ``memory`` per example) is kept up to date in O(memory^2) a step:
the oldest pair leaves by a rank-one downdate, the new one enters by its Schur complement
``p = -s_new^T H y_new``, which is the rank-one correction's denominator. A pair with
``p = 0`` (or not finite) is left out, as the recursive form leaves it out.

Memory does not grow with ``max_steps``: the big buffers S and S + Y are rings of
``memory`` slots (one written per step, in place). Per step the method reads them three
times (S once, S + Y twice). Keeping exactly the last pairs is what lets it converge
where a ring of recursive corrections stalls: those corrections were formed with older
pairs that the ring has dropped, and no longer satisfy the recent secant equations.

Causal mode (``causal_axis``, see ``solvers.base``): every inner product above is a
prefix inner product, so position t takes the step Broyden would take on the prefix
problem (positions <= t), with its own ``M^{-1}`` (``[B, T, m, m]``), reading no later
position. For ``T = 1`` it is the method above.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from deq_jax.solvers import base

Array = jax.Array
DEFAULT_MEMORY = 20


class BroydenState(NamedTuple):
    """Shapes: ``[B, (T,) ...]``, with ``T`` only in causal mode; ``m`` = memory.

    The buffers are rings (pair i in slot ``i % m``); the small arrays are in the order the
    pairs were made, index ``m - 1`` the newest. A pair that is not ``valid`` has a row and
    column of the identity in ``inv``.
    """

    s: Array  # [B, m, (T,) D] steps s_i = dz_i
    a: Array  # [B, m, (T,) D] s_i + y_i, y_i = dg_i
    inv: Array  # [B, (T,) m, m] M^{-1}
    sg: Array  # [B, (T,) m] <s_i, g_prev>
    valid: Array  # [B, (T,) m] bool: the pair is in H (made, denominator not 0, no restart since)
    z_ring: Array  # [B, 2, (T,) D] the iterates of the last two steps (slot count % 2: the current)
    g_ring: Array  # [B, 2, (T,) D] their g(z) = f(z) - z
    count: Array  # [] pairs made so far


def _finite_or_zero(x: Array) -> Array:
    return jnp.where(jnp.isfinite(x), x, 0.0)


def _drop_oldest(inv: Array) -> Array:
    """``[..., m, m]`` M^{-1} -> ``[..., m-1, m-1]`` inverse of M without its first row and
    column: ``N[1:, 1:] - N[1:, 0] N[0, 1:] / N[0, 0]`` (exact for a pair that is an identity
    row and column, where N[1:, 0] = 0)."""
    return inv[..., 1:, 1:] - inv[..., 1:, :1] * inv[..., :1, 1:] / inv[..., :1, :1]


def _add_newest(inv: Array, row: Array, column: Array, corner: Array, ok: Array) -> tuple[Array, Array]:
    """The inverse of ``[[M, column], [row, corner]]`` from ``inv`` = M^{-1} (``[..., k, k]``)
    by the Schur complement ``p = corner - row M^{-1} column``, and whether the new index is
    in: where ``ok`` is False or ``p`` is 0 or not finite it gets an identity row and column
    instead (the pair is left out)."""
    inv_col = jnp.einsum("...ij,...j->...i", inv, column, precision=base.PRECISION)
    row_inv = jnp.einsum("...i,...ij->...j", row, inv, precision=base.PRECISION)
    pivot = corner - jnp.sum(row * inv_col, axis=-1)
    ok = ok & jnp.isfinite(pivot) & (jnp.abs(pivot) > jnp.finfo(inv.dtype).tiny ** 0.5)
    scale = jnp.where(ok, 1.0 / jnp.where(ok, pivot, 1.0), 0.0)[..., None]
    col = inv_col * scale
    top = jnp.concatenate([inv + col[..., :, None] * row_inv[..., None, :], -col[..., None]], -1)
    bottom = jnp.concatenate([-(row_inv * scale), jnp.where(ok, scale[..., 0], 1.0)[..., None]], -1)
    return jnp.concatenate([top, bottom[..., None, :]], axis=-2), ok


def _method(memory: int) -> base.Method:
    m = memory

    def init(z, fz):
        buffer = jnp.zeros((z.shape[0], m) + z.shape[1:], z.dtype)
        lead = z.shape[:-1]  # [B] or [B, T]
        ring = jnp.zeros((z.shape[0], 2) + z.shape[1:], z.dtype)
        return BroydenState(
            s=buffer, a=buffer, inv=jnp.broadcast_to(jnp.eye(m, dtype=z.dtype), lead + (m, m)),
            sg=jnp.zeros(lead + (m,), z.dtype), valid=jnp.zeros(lead + (m,), bool),
            z_ring=ring.at[:, 1].set(z), g_ring=ring.at[:, 1].set(fz - z), count=jnp.int32(0),
        )

    def step(st: BroydenState, z, fz):
        g = fz - z
        # The previous z and g sit in a ring of two slots, written before they are read: a
        # carry that moved z into a z_prev slot would cost XLA's CPU while loop two to five
        # copies of z-sized arrays a step (its copy insertion cannot order the move).
        z_ring = st.z_ring.at[:, st.count % 2].set(z)
        g_ring = st.g_ring.at[:, st.count % 2].set(g)
        s_new = z - z_ring[:, (st.count + 1) % 2]
        y_new = g - g_ring[:, (st.count + 1) % 2]
        slot = st.count % m
        # The buffers only ever hold finite numbers (a pair that is not valid then adds
        # exactly 0 to every product below): an example whose z or g is not finite (a
        # stopped one) writes zeros instead.
        s = st.s.at[:, slot].set(_finite_or_zero(s_new))
        a = st.a.at[:, slot].set(_finite_or_zero(s_new + y_new))

        def chronological(coeffs):  # [..., m] by slot -> oldest first, newest (slot) last
            return jnp.roll(coeffs, -(slot + 1), axis=-1)

        s_g = chronological(base.pcoeffs(s, g))  # <s_i, g>
        # M's new row: M[new, j] = <s_new, s_j> + <s_new, y_j> = <s_new, a_j> (j older);
        # its new column: M[i, new] = <s_i, y_new> = <s_i, g> - <s_i, g_prev> (i older).
        older = st.valid[..., 1:]
        row = jnp.where(older, chronological(base.pcoeffs(a, s_new))[..., :-1], 0.0)
        column = jnp.where(older, s_g[..., :-1] - st.sg[..., 1:], 0.0)
        corner = base.pdot(s_new, y_new)
        # An oldest pair whose removal leaves M singular (N[0, 0] = 0) restarts the example.
        restart = ~(jnp.isfinite(st.inv[..., 0, 0]) & (jnp.abs(st.inv[..., 0, 0]) > jnp.finfo(z.dtype).tiny ** 0.5))
        inv, ok = _add_newest(_drop_oldest(st.inv), row, column, corner, ~restart)
        valid = jnp.concatenate([older, ok[..., None]], axis=-1)
        c = jnp.einsum("...ij,...j->...i", inv, jnp.where(valid, s_g, 0.0), precision=base.PRECISION)
        update = g - base.combine(jnp.roll(c, slot + 1, axis=-1), a)
        # Overflow for an example (g itself is finite, or the loop has stopped it): it
        # restarts from H = -I (its pairs dropped) with a plain f step. No branch here: a
        # `cond` would cost a device-to-host copy of its predicate every step on a GPU.
        overflow = ~jnp.all(jnp.isfinite(update), axis=-1)  # [B, (T)]
        if overflow.ndim == 2:  # causal: position t's products enter every later prefix
            overflow = jax.lax.cummax(overflow.astype(jnp.int32), axis=1).astype(bool)
        update = jnp.where(overflow[..., None], g, update)
        reset = (overflow | restart)[..., None]
        valid = valid & ~reset
        inv = jnp.where(reset[..., None], jnp.eye(m, dtype=z.dtype), inv)
        new = BroydenState(s=s, a=a, inv=inv, sg=s_g, valid=valid, z_ring=z_ring, g_ring=g_ring, count=st.count + 1)
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
    early_exit: bool = True,
    snapshots: tuple[int, ...] = (),
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
      early_exit: True: stop once every example has stopped. False: always run
        ``max_steps`` steps (the same result, ``f_evals = max_steps + 1``), a trip count
        known at compile time, so that a GPU does not copy the loop's predicate to the
        host every step; for short solves that mostly run to their limit (training).
      snapshots: increasing step counts k (default none): ``result.snapshots`` then
        holds, for each, the iterate the solve returns with ``step_limit=k``, recorded
        on the way (fixed-point correction supervises them).
      memory: secant pairs kept (the last ones); costs ``2 * memory * B * D`` floats.

    Returns:
      A :class:`SolverResult`.

    Example:
      >>> import jax.numpy as jnp
      >>> from deq_jax import solvers
      >>> result = solvers.broyden(jnp.cos, jnp.zeros((2, 3)))   # z = cos z, 2 examples
      >>> [round(v, 4) for v in result.z[:, 0].tolist()]
      [0.7391, 0.7391]
      >>> result.n_steps.tolist(), result.converged.tolist()
      ([4, 4], [True, True])
    """
    if not isinstance(memory, int) or memory < 1:
        raise ValueError(f"memory must be a positive int, got {memory!r}")
    base.validate(max_steps, tol, stop_mode)
    memory = min(memory, max_steps)  # a solve never makes more pairs than steps: no unused slots
    return base.solve(
        _method(memory), f, z0, max_steps, tol, stop_mode, step_limit, causal_axis, precision, early_exit, snapshots
    )
