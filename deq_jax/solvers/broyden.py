"""Limited-memory ("good") Broyden's method for z = f(z), per example.

Broyden finds a root of g(z) = f(z) - z with quasi-Newton steps z <- z - H g(z), where
H approximates the inverse Jacobian of g. H starts at -I (so the first step is a plain
f step) and takes a rank-one correction per step,

    H <- H + (dz - H dg) (dz^T H) / (dz^T H dg),

kept as H = -I + sum_i u_i v_i^T with the pairs (u_i, v_i) in a ring buffer of
``memory`` slots: memory does not grow with ``max_steps``; the oldest pair is dropped
when the buffer is full.
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
        zeros = jnp.zeros((z.shape[0], memory, z.shape[1]), z.dtype)
        g = fz - z
        return BroydenState(us=zeros, vs=zeros, z_prev=z, g_prev=g, update=g, count=jnp.int32(0))

    def step(s: BroydenState, z, fz):
        g = fz - z
        dz = z - s.z_prev
        slot = s.count % memory
        # Two passes over each buffer: coefficients, then combinations. The slot about
        # to be overwritten is read only through these products (no slice of it), which
        # lets XLA update the buffers in place.
        cv = jnp.einsum("bmd,bd->bm", s.vs, g, precision=base.PRECISION)  # v_i . g
        cu = jnp.einsum("bmd,bd->bm", s.us, dz, precision=base.PRECISION)  # dz . u_i
        keep = (jnp.arange(memory) != slot).astype(cv.dtype)
        both = jnp.einsum("bkm,bmd->bkd", jnp.stack([cv, cv * keep], axis=1), s.us, precision=base.PRECISION)
        hg = both[:, 0] - g  # H g with the current H
        hg_kept = both[:, 1] - g  # ... without the pair in the slot being replaced
        vt = -dz + jnp.einsum("bm,bmd->bd", cu, s.vs, precision=base.PRECISION)  # dz^T H
        # H g_prev = -update exactly (same H), so H dg costs no extra pass.
        hdg = hg + s.update
        denom = base.bdot(vt, g - s.g_prev)
        ok = jnp.isfinite(denom) & (jnp.abs(denom) > jnp.finfo(z.dtype).tiny ** 0.5)
        u = jnp.where(ok[:, None], (dz - hdg) / jnp.where(ok, denom, 1.0)[:, None], 0.0)
        vt = jnp.where(ok[:, None], vt, 0.0)
        # New H = H - u_slot v_slot^T + u vt^T; the next step is -H g.
        update = -(hg_kept + u * base.bdot(vt, g)[:, None])
        # Overflow in H: restart from a plain f step rather than propose NaN.
        update = jnp.where(jnp.isfinite(update), update, g)
        new = BroydenState(
            us=s.us.at[:, slot].set(u),
            vs=s.vs.at[:, slot].set(vt),
            z_prev=z,
            g_prev=g,
            update=update,
            count=s.count + 1,
        )
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
      memory: rank-one pairs kept (ring buffer); costs ``2 * memory * B * D`` floats.

    Returns:
      A :class:`SolverResult`.
    """
    if not isinstance(memory, int) or memory < 1:
        raise ValueError(f"memory must be a positive int, got {memory!r}")
    return base.solve(_method(memory), f, z0, max_steps, tol, stop_mode, step_limit)
