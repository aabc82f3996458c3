"""A DEQ layer as one pure function: the solve, the pretraining unroll and the JR term::

    z_star, stats = deq_jax.equilibrium(f, params, x, z0, jr_keys=key)
    loss = task_loss(head(z_star)) + gamma * jnp.mean(stats.jr)

This is what the framework layers (:class:`deq_jax.linen.DEQ`, :class:`deq_jax.nnx.DEQ`)
call once they have turned the user's cell into ``f(params, x, z)`` with its parameters
as an explicit argument; Equinox users call it directly with ``eqx.partition`` /
``eqx.combine`` (docs/guides/your_own_model.md). Everything differentiable must reach ``f`` through
``params`` or ``x``, never by closure (a closed-over array that ``jax.grad`` traces
raises JAX's ``UnexpectedTracerError``); pass a traced PRNG key the cell uses the same way
(e.g. ``params=(cell_params, dropout_key)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from deq_jax import correction as fpc
from deq_jax import deq, jacobian
from deq_jax.mixed_precision import in_compute_dtype
from deq_jax.solvers import base

Array = jax.Array
PyTree = Any


class DEQStats(NamedTuple):
    """What a DEQ layer reports next to z*.

    Attributes:
      result: the forward :class:`~deq_jax.solvers.SolverResult` (steps, residuals,
        convergence per example; ``None`` when the cell was unrolled instead of solved).
      jr: ``[B]`` float32 Hutchinson estimate of ``||J_f(z*)||_F^2 / d`` at the constant
        ``stop_gradient(z*)``, differentiable in ``params`` and ``x`` (the paper's JR
        term); ``None`` unless JR keys were given.
      states: with fixed-point correction (:class:`deq_jax.Correction`), the
        ``n_states`` states to supervise, the last being z* (``correction.loss(loss_fn,
        states)``); otherwise ``None``.
    """

    result: base.SolverResult | None
    jr: Array | None
    states: tuple | None = None


def equilibrium(
    f: Callable,
    params: PyTree,
    x: PyTree,
    z0: PyTree,
    *,
    forward: deq.SolverConfig = deq.DEFAULT_FORWARD,
    backward: deq.SolverConfig | deq.Phantom | deq.Reversible = deq.DEFAULT_BACKWARD,
    step_limit: Array | int | None = None,
    probe: deq.BackwardStats | None = None,
    unroll: int | None = None,
    jr_keys: Array | None = None,
    jr_probes: int = 1,
    jr_mode: str = "vjp",
    jr_if: Array | bool | None = None,
    compute_dtype: Any = None,
    correction: fpc.Correction | None = None,
) -> tuple[PyTree, DEQStats]:
    """z* of ``z = f(params, x, z)`` (or ``unroll`` applications of f), with its statistics.

    Args:
      f, params, x, z0, forward, backward, step_limit, probe: as in
        :func:`deq_jax.fixed_point` (z0's leaves are ``[B, ...]``).
      unroll: None to solve for the fixed point; a positive int k to apply f k times
        from z0 and differentiate through them (the pretraining mode, :func:`deq_jax.unrolled`).
      jr_keys: None (no JR term), one PRNG key, or ``[B]`` typed keys (one per example:
        the probes then do not depend on how the batch is split across devices).
      jr_probes: Hutchinson probes per example.
      jr_mode: ``"vjp"`` (``||eps^T J||^2``, reverse mode, the paper's; works for any
        differentiable cell) or ``"jvp"`` (``||J eps||^2``, forward mode; the cell must
        support ``jax.jvp``, so no ``custom_vjp`` inside it). With Gaussian probes both
        estimates have the same distribution; which is cheaper depends on the cell
        (``benchmarks/jr_cost.py``).
      jr_if: optional bool scalar (may be traced): compute the JR term only when true
        (``jax.lax.cond``; the term is zeros otherwise). Its cost: on a GPU, every call
        copies the predicate to the host and waits for it; on CPU, the term's convolutions
        and their gradients run outside XLA's fast layout (its layout pass skips a cond's
        branches: 2.3x the whole digits train step). In a training loop, flip the coin on
        the host and compile one step with the term and one without, as
        :mod:`deq_jax.train` does.
      compute_dtype: None, or a dtype (e.g. ``jnp.bfloat16``) to evaluate f in, everywhere
        (solve, unroll, JR term); params, z and the solver stay in their own dtypes
        (:mod:`deq_jax.mixed_precision`).
      correction: None, or a :class:`deq_jax.Correction`: the forward solve records the
        iterates at ``correction.steps(forward.max_steps)`` and ``stats.states`` holds the
        states to supervise (fixed-point correction, :mod:`deq_jax.correction`). Ignored
        with ``unroll``.

    Returns:
      ``(z, stats)``: z with z0's structure and a :class:`DEQStats`.

    Example:
      >>> import jax, jax.numpy as jnp, deq_jax
      >>> def f(params, x, z):
      ...     return jnp.tanh(z @ params["w"] + x)
      >>> params, x = {"w": 0.3 * jnp.eye(4)}, jnp.ones((8, 4))
      >>> z, stats = deq_jax.equilibrium(f, params, x, jnp.zeros_like(x),
      ...                                jr_keys=jax.random.key(0))
      >>> stats.jr.shape                    # the JR term per example, to add to the loss
      (8,)
      >>> bool(stats.result.converged.all())
      True
    """
    f = in_compute_dtype(f, compute_dtype)
    states = None
    if unroll is None:
        if correction is not None:
            forward = fpc.with_snapshots(forward, correction)
        z, result = deq.fixed_point(
            f, params, x, z0, forward=forward, backward=backward, probe=probe, step_limit=step_limit
        )
        if correction is not None:
            states = fpc.supervised_states(f, params, x, result.snapshots, z, correction.phantom)
    else:
        z, result = deq.unrolled(f, params, x, z0, unroll), None
    jr = None
    if jr_keys is not None:
        jr = jacobian_term(f, params, x, z, jr_keys, jr_probes, jr_if, mode=jr_mode)
    return z, DEQStats(result, jr, states)


def jacobian_term(
    f: Callable,
    params: PyTree,
    x: PyTree,
    z: PyTree,
    keys: Array,
    num_probes: int = 1,
    when: Array | bool | None = None,
    *,
    mode: str = "vjp",
) -> Array:
    """``[B]`` Hutchinson ``||J_f(z)||_F^2 / d`` at the constant ``stop_gradient(z)``,
    differentiable in ``params`` and ``x``, by ``mode`` ``"vjp"`` or ``"jvp"``; zeros where
    ``when`` is false (see :func:`equilibrium`)."""
    z = jax.lax.stop_gradient(z)

    def estimate():
        fz = functools.partial(f, params, x)
        return jacobian.hutchinson_frobenius(fz, z, keys, num_probes=num_probes, mode=mode)

    if when is None:
        return estimate()
    shape = jax.eval_shape(estimate)
    return jax.lax.cond(jnp.asarray(when, bool), estimate, lambda: jnp.zeros(shape.shape, shape.dtype))
