"""Limited-memory ("good") Broyden's method for z = f(z), per example.

Broyden finds a root of g(z) = f(z) - z with quasi-Newton steps z <- z - H g(z), where
H approximates the inverse Jacobian of g. H starts at -I (so the first step is a plain
f step) and takes a rank-one correction per step,

    H <- H + (dz - H dg) (dz^T H) / (dz^T H dg),

kept as H = -I + sum_i u_i v_i^T with the pairs (u_i, v_i) in a ring buffer of
``memory`` slots: memory does not grow with ``max_steps``; the oldest pair is dropped
when the buffer is full.

Causal mode (``causal_axis``, see ``solvers.base``): position t takes the step that
Broyden would take on the prefix problem (positions <= t) from the shared history of
iterates, H^(t) built from the last ``memory`` secant pairs (dz_i, dg_i) restricted to
positions <= t. The vectors u_i, v_i of H^(t) differ for every t, but all lie in the span
of the stored dz_i and dg_i, so they are kept as coefficients over that basis W, computed
per position from the prefix Gram matrix W^T W (``[B, T, 2m, 2m]``) by the same rank-one
recursion, rebuilt from H = -I at every step (as L-BFGS does). For ``T = 1`` and before
the buffer wraps this is exactly the method above (tested); after it wraps, the method
above keeps pairs formed with older pairs that are gone, this one only the last m.
A simpler per-position variant (prefix sums inside the formulas above, one shared u_i,
v_i) is causal too but diverged on a Transformer cell in our tests: its u_i at position
s < t were formed with the prefix-s scalars, so no H^(t) satisfies the secant equations.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from deq_jax.solvers import base

Array = jax.Array
DEFAULT_MEMORY = 20


class BroydenState(NamedTuple):
    us: Array  # [B, memory, D]: batch first, so the products are plain batched matvecs
    vs: Array  # [B, memory, D]
    z_prev: Array  # [B, D]
    g_prev: Array  # [B, D] g(z_prev) = f(z_prev) - z_prev
    update: Array  # [B, D] -H g_prev, the step taken from z_prev
    count: Array  # [] rank-one updates made so far


def _method(memory: int) -> base.Method:
    def init(z, fz):
        zeros = jnp.zeros((z.shape[0], memory) + z.shape[1:], z.dtype)
        g = fz - z
        return BroydenState(us=zeros, vs=zeros, z_prev=z, g_prev=g, update=g, count=jnp.int32(0))

    def step(s: BroydenState, z, fz):
        g = fz - z
        dz = z - s.z_prev
        slot = s.count % memory
        # Two passes over each buffer: coefficients, then combinations. The slot about
        # to be overwritten is read only through these products (no slice of it), which
        # lets XLA update the buffers in place. Coefficients are [B, memory].
        cv = base.pcoeffs(s.vs, g)  # <v_i, g>
        cu = base.pcoeffs(s.us, dz)  # <dz, u_i>
        keep = (jnp.arange(memory) != slot).astype(cv.dtype)
        both = jnp.einsum("bk...m,bm...d->bk...d", jnp.stack([cv, cv * keep], axis=1), s.us, precision=base.PRECISION)
        hg = both[:, 0] - g  # H g with the current H
        hg_kept = both[:, 1] - g  # ... without the pair in the slot being replaced
        vt = -dz + base.combine(cu, s.vs)  # dz^T H
        # H g_prev = -update exactly (same H), so H dg costs no extra pass.
        hdg = hg + s.update
        denom = base.pdot(vt, g - s.g_prev)[..., None]
        ok = jnp.isfinite(denom) & (jnp.abs(denom) > jnp.finfo(z.dtype).tiny ** 0.5)
        u = jnp.where(ok, (dz - hdg) / jnp.where(ok, denom, 1.0), 0.0)
        vt = jnp.where(ok, vt, 0.0)
        # New H = H - u_slot v_slot^T + u vt^T; the next step is -H g.
        update = -(hg_kept + u * base.pdot(vt, g)[..., None])
        us, vs = s.us.at[:, slot].set(u), s.vs.at[:, slot].set(vt)
        # Overflow in H for an example (g itself is finite, or the loop has stopped it):
        # that example restarts, H = -I (its pairs are dropped), and takes a plain f step,
        # so the next step's H g_prev = -update holds again. The buffers are only touched
        # (a cond, not a select every step) when some example overflowed.
        overflow = ~jnp.all(jnp.isfinite(update), axis=-1)  # [B]
        update = jnp.where(overflow[:, None], g, update)
        us, vs = jax.lax.cond(
            jnp.any(overflow),
            lambda: tuple(jnp.where(overflow[:, None, None], 0.0, b) for b in (us, vs)),
            lambda: (us, vs),
        )
        new = BroydenState(us=us, vs=vs, z_prev=z, g_prev=g, update=update, count=s.count + 1)
        return z + update, new

    return base.Method(init, step)


class CausalBroydenState(NamedTuple):
    basis: Array  # [B, 2m, T, D]: slots 0..m-1 hold dz_i, slots m..2m-1 the matching dg_i
    gram: Array  # [B, T, 2m, 2m] prefix inner products of the basis
    a: Array  # [B, T, 2m, m] u_i = W a_i per position, column i = i-th oldest pair
    b: Array  # [B, T, 2m, m] v_i = W b_i
    z_prev: Array  # [B, T, D]
    g_prev: Array  # [B, T, D]
    count: Array  # [] secant pairs stored so far


def _causal_method(memory: int) -> base.Method:
    k = 2 * memory

    def init(z, fz):
        basis = jnp.zeros((z.shape[0], k) + z.shape[1:], z.dtype)
        gram = jnp.zeros(z.shape[:2] + (k, k), z.dtype)
        coef = jnp.zeros(z.shape[:2] + (k, memory), z.dtype)
        return CausalBroydenState(basis, gram, coef, coef, z, fz - z, jnp.int32(0))

    def apply(left, right, vec):  # sum_i left_i (right_i . vec) per position: [B, T, 2m]
        return jnp.einsum("btki,bti->btk", left, jnp.einsum("btki,btk->bti", right, vec, precision=base.PRECISION),
                          precision=base.PRECISION)

    def add_pair(gram, a, b, column, i):
        """Column ``column`` of a and b from pair i, given the older pairs' columns."""
        e_dz = jax.nn.one_hot(i, k, dtype=gram.dtype)
        e_dg = jax.nn.one_hot(memory + i, k, dtype=gram.dtype)
        g_dz = jnp.take(gram, i, axis=-1)  # G e_dz: [B, T, 2m]
        g_dg = jnp.take(gram, memory + i, axis=-1)
        h_dg = -e_dg + apply(a, b, g_dg)  # coefficients of H dg_i
        v = -e_dz + apply(b, a, g_dz)  # coefficients of H^T dz_i
        denom = jnp.einsum("btk,btk->bt", v, g_dg, precision=base.PRECISION)[..., None]  # <v_i, dg_i>_t
        ok = jnp.isfinite(denom) & (jnp.abs(denom) > jnp.finfo(gram.dtype).tiny ** 0.5)
        u = jnp.where(ok, (e_dz - h_dg) / jnp.where(ok, denom, 1.0), 0.0)
        return a.at[..., column].set(u), b.at[..., column].set(jnp.where(ok, v, 0.0))

    def step(s: CausalBroydenState, z, fz):
        g = fz - z
        dz, dg = z - s.z_prev, g - s.g_prev
        slot = s.count % memory
        basis = s.basis.at[:, slot].set(dz).at[:, memory + slot].set(dg)
        row_dz = base.pcoeffs(basis, dz)  # [B, T, 2m]: <w_j, dz>_t
        row_dg = base.pcoeffs(basis, dg)
        gram = s.gram.at[..., slot, :].set(row_dz).at[..., :, slot].set(row_dz)
        gram = gram.at[..., memory + slot, :].set(row_dg).at[..., :, memory + slot].set(row_dg)

        # H^(t) = -I + sum_i (W a_i) (W b_i)^T over the pairs, oldest first. Pairs not
        # written yet are zero vectors: their denominator is 0 and they are skipped.
        # Until the buffer is full the older pairs' columns stay valid (their Gram entries
        # do not change), so one column is added; once it wraps, the oldest pair leaves
        # and every column is rebuilt from H = -I.
        def one_more():
            return add_pair(gram, s.a, s.b, s.count, slot)

        def rebuild():
            zeros = jnp.zeros_like(s.a)
            return jax.lax.fori_loop(
                0, memory, lambda col, ab: add_pair(gram, *ab, col, (slot + 1 + col) % memory), (zeros, zeros)
            )

        a, b = jax.lax.cond(s.count < memory, one_more, rebuild)
        # The next step is -H g = g - W a b^T (W^T g).
        update = g - base.combine(apply(a, b, base.pcoeffs(basis, g)), basis)
        update = jnp.where(jnp.isfinite(update), update, g)
        return z + update, CausalBroydenState(basis, gram, a, b, z, g, s.count + 1)

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
      memory: rank-one pairs kept (ring buffer); costs ``2 * memory * B * D`` floats.

    Returns:
      A :class:`SolverResult`.
    """
    if not isinstance(memory, int) or memory < 1:
        raise ValueError(f"memory must be a positive int, got {memory!r}")
    method = _method(memory) if causal_axis is None else _causal_method(memory)
    return base.solve(method, f, z0, max_steps, tol, stop_mode, step_limit, causal_axis)
