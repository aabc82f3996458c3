"""The reversible coupled iteration of RevDEQs (McCallum, Arora & Foster, 2025).

Two states, y_0 = z_0, and a relaxation ``beta`` in (0, 2), beta != 1:

    y_{n+1} = (1 - beta) y_n + beta f(z_n)
    z_{n+1} = (1 - beta) z_n + beta f(y_{n+1})

Each step inverts algebraically (``z_n = (z_{n+1} - beta f(y_{n+1})) / (1 - beta)``, then
``y_n = (y_{n+1} - beta f(z_n)) / (1 - beta)``), so a backward pass can rebuild every iterate
instead of storing it: :class:`deq_jax.Reversible` is that gradient mode. The solver here is
the forward iteration alone, with the statistics every solver reports; unlike the others it
returns each example's *last* iterate z_n (not the lowest-residual one), because the
gradient is that of exactly the n steps the example took. An example stops once the residual
of its z meets ``tol``; one whose step meets NaN/Inf goes back to the step before and stops.

The iteration mixes no positions: with ``causal_axis`` only the stopping is per prefix (as in
the other solvers), so position t of every iterate depends on positions <= t only.

Each step evaluates f twice (at z_n, reused for z_n's residual, and at y_{n+1}):
``f_evals = 2 * steps + 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from deq_jax.solvers import base, conv_layout

Array = jax.Array
PyTree = Any
DEFAULT_BETA = 0.5


def check_beta(beta) -> None:
    """``ValueError`` unless ``beta`` is a number in (0, 2) other than 1 (1 cannot be inverted)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0 < beta < 2) or beta == 1:
        raise ValueError(f"beta must be in (0, 2) and not 1 (the step divides by 1 - beta), got {beta!r}")


class Trajectory(NamedTuple):
    """Where the reverse pass starts: the final y and z as working-dtype ``[B, (T,) D]``
    arrays (:func:`deq_jax.solvers.base.ravel_positions`), each example's (causal: each
    position's) step count ``[B, (T)]``, and the loop's step count (the most)."""

    y: Array
    z: Array
    steps: Array
    loop_steps: Array


class _Loop(NamedTuple):
    k: Array
    y: Array
    z: Array
    fz: Array
    stopped: Array
    steps: Array
    abs_res: Array
    rel_res: Array
    metric: Array
    nonfinite: Array
    abs_trace: Array
    rel_trace: Array
    snaps: Array


def iterate(
    f: Callable,
    z0: PyTree,
    *,
    beta: float = DEFAULT_BETA,
    max_steps: int = 30,
    tol: float = 1e-3,
    stop_mode: str = "rel",
    step_limit=None,
    causal_axis: int | None = None,
    precision: str | None = None,
    early_exit: bool = True,
    snapshots: tuple[int, ...] = (),
) -> tuple[base.SolverResult, Trajectory]:
    """The coupled iteration with per-example (causal: per-position) stopping; returns the
    :class:`~deq_jax.solvers.SolverResult` and the :class:`Trajectory` the reverse pass starts from."""
    base.validate(max_steps, tol, stop_mode)
    check_beta(beta)
    if not isinstance(early_exit, bool):
        raise ValueError(f"early_exit must be True or False, got {early_exit!r}")
    snapshots = base.check_snapshots(snapshots, max_steps)
    f = base.at_precision(f, precision)
    limit = max_steps if step_limit is None else jnp.clip(jnp.asarray(step_limit, jnp.int32), 0, max_steps)
    dtype = base.working_dtype([leaf.dtype for leaf in jax.tree.leaves(z0)])
    z0_mat, ravel, unravel = base.ravel_positions(z0, dtype, causal_axis)
    f_mat = conv_layout.on_cpu(base._checked_f(f, z0, ravel, unravel))
    causal = causal_axis is not None
    batch = z0_mat.shape[0]

    measure, whole = base.stop_test(tol, stop_mode, causal)

    fz0 = f_mat(z0_mat)
    abs0, rel0, metric0, finite0, met0 = measure(z0_mat, fz0)
    nan_trace = jnp.full((max_steps + 1, batch), jnp.nan, dtype)
    state = _Loop(
        k=jnp.int32(0), y=z0_mat, z=z0_mat, fz=fz0, stopped=met0 | ~finite0,
        steps=jnp.zeros(metric0.shape, jnp.int32), abs_res=abs0, rel_res=rel0, metric=metric0,
        nonfinite=~finite0, abs_trace=nan_trace.at[0].set(whole(abs0)), rel_trace=nan_trace.at[0].set(whole(rel0)),
        snaps=jnp.zeros((len(snapshots),) + z0_mat.shape, dtype),
    )
    snap_steps = jnp.asarray(snapshots, jnp.int32).reshape((-1,) + (1,) * z0_mat.ndim)

    def cond(s: _Loop):
        return (s.k < limit) & ~jnp.all(s.stopped)

    def body(s: _Loop):
        ran = True if early_exit else cond(s)
        stopped = s.stopped if early_exit else s.stopped | ~ran
        # A stopped example (causal: position) keeps its y and z also while f is evaluated:
        # later positions read earlier ones, and must see them as they stay.
        frozen = stopped[..., None]
        y = jnp.where(frozen, s.y, (1.0 - beta) * s.y + beta * s.fz)
        z = jnp.where(frozen, s.z, (1.0 - beta) * s.z + beta * f_mat(y))
        fz = f_mat(z)
        abs_res, rel_res, metric, finite, met = measure(z, fz)
        k = s.k + 1
        accept = ~stopped & finite  # a failed step is undone: the example keeps its last finite iterate
        keep = accept[..., None]
        z = jnp.where(keep, z, s.z)
        abs_res = jnp.where(accept, abs_res, s.abs_res)  # of the iterate each example now holds
        rel_res = jnp.where(accept, rel_res, s.rel_res)
        return _Loop(
            k=k,
            y=jnp.where(keep, y, s.y),
            z=z,
            fz=jnp.where(keep, fz, s.fz),
            stopped=s.stopped | (~stopped & ~finite) | (accept & met),
            steps=jnp.where(accept, k, s.steps),
            abs_res=abs_res,
            rel_res=rel_res,
            metric=jnp.where(accept, metric, s.metric),
            nonfinite=s.nonfinite | (~stopped & ~finite),
            abs_trace=s.abs_trace.at[k].set(row(ran, abs_res)),
            rel_trace=s.rel_trace.at[k].set(row(ran, rel_res)),
            snaps=jnp.where(snap_steps == k, z[None], s.snaps),
        )

    def row(ran, residuals):
        return whole(residuals) if early_exit else jnp.where(ran, whole(residuals), jnp.nan)

    if early_exit:
        s = jax.lax.while_loop(cond, body, state)
    else:
        s = jax.lax.fori_loop(0, max_steps, lambda _, s: body(s), state)
    snaps = jnp.where(snap_steps > s.k, s.z[None], s.snaps)
    result = base.SolverResult(
        z=unravel(s.z),
        n_steps=whole(s.steps),
        abs_residual=whole(s.abs_res),
        rel_residual=whole(s.rel_res),
        abs_trace=s.abs_trace,
        rel_trace=s.rel_trace,
        converged=(jnp.max(s.metric, axis=1) if causal else s.metric) < tol,
        nonfinite=jnp.any(s.nonfinite, axis=1) if causal else s.nonfinite,
        f_evals=2 * s.k + 1,
        snapshots=tuple(unravel(snap) for snap in snaps),
    )
    return result, Trajectory(s.y, s.z, s.steps, s.k)


def reversible(
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
    beta: float = DEFAULT_BETA,
) -> base.SolverResult:
    """Solves ``z = f(z)`` per example with the reversible coupled iteration (module doc).

    ``f``, ``z0``, ``max_steps`` (coupled steps, two f evaluations each), ``tol``,
    ``stop_mode``, ``step_limit``, ``causal_axis``, ``precision``, ``early_exit`` and
    ``snapshots`` are as for :func:`deq_jax.solvers.broyden`.

    Args:
      beta: the relaxation, in (0, 2) and not 1.

    Returns:
      A :class:`SolverResult` whose ``z`` is each example's last iterate.

    Example:
      >>> import jax.numpy as jnp
      >>> from deq_jax import solvers
      >>> result = solvers.reversible(jnp.cos, jnp.zeros((2, 3)), beta=0.8)   # z = cos z
      >>> [round(v, 3) for v in result.z[:, 0].tolist()]
      [0.739, 0.739]
      >>> result.n_steps.tolist(), int(result.f_evals)      # two f evaluations a step
      ([14, 14], 29)
    """
    result, _ = iterate(
        f, z0, beta=beta, max_steps=max_steps, tol=tol, stop_mode=stop_mode, step_limit=step_limit,
        causal_axis=causal_axis, precision=precision, early_exit=early_exit, snapshots=snapshots,
    )
    return result
