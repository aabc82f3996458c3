"""The implicit (deep equilibrium) layer: z* = f(params, x, z*), differentiated implicitly.

    z_star, stats = fixed_point(f, params, x, z0)

``f(params, x, z) -> z`` is any function of a batch ``z`` (pytree of ``[B, ...]``
arrays). The forward pass solves for z* with a solver and keeps no tape. The backward
pass, under ``jax.custom_vjp``, turns the output cotangent g into parameter gradients
u . df/dparams with u from one of:

* :class:`SolverConfig` (implicit, the default): solve the adjoint fixed point
  ``u = u J_f(z*) + g`` (J_f = df/dz at z*) with a solver of its own;
* :class:`Phantom`: differentiate through ``steps`` damped applications of f started
  at z* (``steps=1, damping=0`` is Jacobian-free backprop, u = g);
* :class:`Reversible` (with the ``"reversible"`` forward solver, RevDEQ): the exact
  gradient of the coupled iteration's steps, rebuilt backwards instead of stored.

The backward solve's statistics leave the backward pass through a *probe*: pass
``probe=BackwardStats.zeros(B)`` and take the gradient with respect to it; that
gradient is a :class:`BackwardStats` holding the adjoint solve's steps and residuals.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax import solvers
from deq_jax.solvers import base, conv_layout
from deq_jax.solvers.reversible import DEFAULT_BETA, iterate

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Which solver, and how far it runs (hashable, so it is a static argument).

    Attributes:
      name: one of ``deq_jax.solvers.SOLVERS`` ("broyden", "anderson",
        "fixed_point_iteration").
      max_steps: the most solver updates.
      tol: stop once the stop-mode residual is below this.
      stop_mode: "rel" or "abs".
      options: extra keyword arguments of that solver, e.g. ``{"memory": 10}``.
      causal_axis: None, or the axis (>= 1) of z's leaves along which f is causal
        (sequence positions): the solver is then causal at every iterate, so position t
        of z never depends on later positions (see ``deq_jax.solvers.base``).
      precision: matmul precision of f inside this solve (for the backward solve: of the
        VJPs of f): None keeps the platform default, which for float32 on NVIDIA GPUs is
        TF32 (about 3 significant digits per product, so relative residuals much below
        1e-3 may not be reachable); ``"highest"`` computes f in full float32. The
        solver's own products are float32 either way.
    """

    name: str = "broyden"
    max_steps: int = 30
    tol: float = 1e-3
    stop_mode: str = "rel"
    options: Mapping[str, Any] | tuple = ()
    causal_axis: int | None = None
    precision: str | None = None

    def __post_init__(self):
        solvers.get(self.name)  # unknown name -> ValueError
        base.validate(self.max_steps, self.tol, self.stop_mode)
        base.check_causal_axis(self.causal_axis)
        base.check_precision(self.precision)
        options = dict(self.options)
        object.__setattr__(self, "options", tuple(sorted(options.items())))

    def solve(self, f: Callable, z0: PyTree, step_limit=None) -> base.SolverResult:
        """Runs this solver on ``z = f(z)`` from ``z0`` (``step_limit``: see ``solvers.base.solve``)."""
        solve = solvers.get(self.name)
        return solve(
            f,
            z0,
            max_steps=self.max_steps,
            tol=self.tol,
            stop_mode=self.stop_mode,
            step_limit=step_limit,
            causal_axis=self.causal_axis,
            precision=self.precision,
            **dict(self.options),
        )


@dataclasses.dataclass(frozen=True)
class Phantom:
    """Phantom gradient: backpropagate through ``steps`` damped f steps from z*.

    z_{i+1} = (1 - damping) f(z_i) + damping z_i, z_0 = z*; ``steps=1, damping=0`` is
    Jacobian-free backprop. As ``steps`` grows the gradient tends to the implicit one.
    """

    steps: int = 1
    damping: float = 0.0

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Phantom.steps must be a positive int, got {self.steps!r}")
        if not 0 <= self.damping < 1:
            raise ValueError(f"Phantom.damping must be in [0, 1), got {self.damping!r}")


@dataclasses.dataclass(frozen=True)
class Reversible:
    """The exact gradient of the reversible coupled iteration (RevDEQ), for a forward
    ``SolverConfig("reversible", ...)``: the backward pass runs the n steps each example
    took in reverse, rebuilding y_k and z_k algebraically from y_{k+1} and z_{k+1} instead
    of storing them, and accumulates the gradient of exactly that n-step computation (two
    VJPs of f a step; memory independent of n). See ``deq_jax.solvers.reversible``.

    Attributes:
      precision: matmul precision of the VJPs of f (as :class:`SolverConfig`'s).
    """

    precision: str | None = None

    def __post_init__(self):
        base.check_precision(self.precision)


class BackwardStats(NamedTuple):
    """Per-example statistics of the backward pass, each ``[B]`` float32.

    ``n_steps``: adjoint solver updates (for :class:`Phantom`, its ``steps``; for
    :class:`Reversible`, the steps reversed);
    ``abs_residual``/``rel_residual``: of the adjoint equation at the returned u
    (NaN for :class:`Phantom`, which solves no equation; for :class:`Reversible`, the
    error of the rebuilt z_0, absolute and relative to ``||z_n||``: how exact the reversal
    was); ``converged``: 1.0 or 0.0 (for :class:`Reversible`: the relative error is below
    :data:`REVERSAL_TOL`); ``vjp_evals``: VJPs of f the backward pass evaluated on the batch (the same for every
    example: the batched loop runs until its slowest example stops); ``nonfinite``: 1.0
    where the adjoint solve met NaN/Inf.
    """

    n_steps: Array
    abs_residual: Array
    rel_residual: Array
    converged: Array
    vjp_evals: Array
    nonfinite: Array

    @classmethod
    def zeros(cls, batch_size: int, dtype=jnp.float32) -> BackwardStats:
        """A probe to pass as ``fixed_point(..., probe=...)``; its gradient is the stats."""
        zero = jnp.zeros((batch_size,), dtype)
        return cls(zero, zero, zero, zero, zero, zero)


DEFAULT_FORWARD = SolverConfig("broyden", max_steps=30, tol=1e-3)
DEFAULT_BACKWARD = SolverConfig("broyden", max_steps=30, tol=1e-4)


def _check_backward(backward, forward=None):
    if not isinstance(backward, (SolverConfig, Phantom, Reversible)):
        raise ValueError(f"backward must be a SolverConfig (implicit), a Phantom or a Reversible, got {backward!r}")
    if isinstance(backward, Reversible) and forward is not None and forward.name != "reversible":
        raise ValueError(
            f"backward=Reversible() reverses the reversible solver: use forward=SolverConfig('reversible', ...), "
            f"got forward solver {forward.name!r}"
        )


def fixed_point(
    f: Callable,
    params: PyTree,
    x: PyTree,
    z0: PyTree,
    *,
    forward: SolverConfig = DEFAULT_FORWARD,
    backward: SolverConfig | Phantom = DEFAULT_BACKWARD,
    probe: BackwardStats | None = None,
    step_limit: Array | int | None = None,
) -> tuple[PyTree, base.SolverResult]:
    """Solves ``z* = f(params, x, z*)`` from ``z0``; differentiable in params and x.

    Args:
      f: ``f(params, x, z) -> z``; pass everything differentiable through ``params``
        or ``x``, never by closure.
      params, x: pytrees (``x`` may be None); every leaf of ``x`` is per example, with
        z0's batch size as its leading axis.
      z0: initial batch; the gradient with respect to it is zero (but with
        :class:`Reversible`, which differentiates the iteration from z0).
      forward: the forward solver.
      backward: a :class:`SolverConfig` for the implicit backward solve, a
        :class:`Phantom`, or :class:`Reversible` (with the ``"reversible"`` forward solver:
        the exact gradient of its steps; the gradient with respect to z0 is then exact too).
      probe: optional :class:`BackwardStats` of zeros; its cotangent is the
        backward-pass statistics (see module doc).
      step_limit: optional int scalar, may be traced: the forward solve stops after
        ``min(step_limit, forward.max_steps)`` updates. Lets a jitted training step
        vary the forward budget (the paper's random lowering) without recompiling.

    Returns:
      ``(z_star, result)``: z* with z0's structure and the forward
      :class:`~deq_jax.solvers.SolverResult` (``result.z`` is z* and differentiable
      like it; the statistics are not).

    Example:
      A contraction whose fixed point and gradient are known, ``z* = x / (1 - a)``:

      >>> import jax, jax.numpy as jnp, deq_jax
      >>> def f(params, x, z):
      ...     return params["a"] * z + x
      >>> params, x = {"a": 0.5}, jnp.ones((2, 3))      # a batch of 2 examples
      >>> z_star, result = deq_jax.fixed_point(f, params, x, jnp.zeros_like(x))
      >>> z_star.tolist()
      [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
      >>> result.converged.tolist()                     # per example, as every statistic
      [True, True]
      >>> loss = lambda p: deq_jax.fixed_point(f, p, x, jnp.zeros_like(x))[0].sum()
      >>> float(jax.grad(loss)(params)["a"])            # d/da 6 / (1 - a) = 6 / (1 - a)^2
      24.0
    """
    if not isinstance(forward, SolverConfig):
        raise ValueError(f"forward must be a SolverConfig, got {forward!r}")
    _check_backward(backward, forward)
    if step_limit is not None:
        step_limit = jnp.asarray(step_limit, jnp.int32)
        if step_limit.shape != ():
            raise ValueError(f"step_limit must be a scalar, got shape {step_limit.shape}")
    _check_batch(x, z0)
    if isinstance(backward, Reversible):
        _warn_if_reversal_cannot_hold(forward, z0)
    solve = _reversible_fixed_point if isinstance(backward, Reversible) else _fixed_point
    try:
        return solve(f, forward, backward, params, x, z0, probe, step_limit)
    except jax.errors.UnexpectedTracerError as e:
        raise _closure_error(e) from e


CLOSURE_HINT = (
    "f closes over an array that JAX is differentiating or transforming (e.g. a cell's weights "
    "captured by a lambda, or an Equinox module closed over inside the loss). Pass everything "
    "differentiable through f's params or x instead: f(params, x, z) with params=the cell's arrays "
    "(Equinox: params, static = eqx.partition(cell, eqx.is_array); f = lambda p, x, z: "
    "eqx.combine(p, static)(x, z)). The solve's custom_vjp cannot see closed-over values."
)


def _closure_error(error: Exception) -> ValueError:
    """The tracer error of a closed-over differentiated value, with what to do instead."""
    return ValueError(f"{CLOSURE_HINT}\nJAX said: {str(error).splitlines()[0]}")


def _check_batch(x, z0) -> None:
    """``ValueError`` unless every leaf of ``z0`` has a batch axis and every leaf of ``x`` has
    z0's batch size as its leading axis (a leaf of batch 1 would broadcast silently inside f,
    a mismatch fail deep in it). A 1-D z0 leaf is refused: it is almost always one example
    without its batch axis, which would be solved as that many one-number examples."""
    z_leaves = jax.tree.leaves(z0)
    if not z_leaves or any(jnp.ndim(leaf) < 1 for leaf in z_leaves):
        return  # the solver reports a bad z0 itself
    flat = [jnp.shape(leaf) for leaf in z_leaves if jnp.ndim(leaf) == 1]
    if flat:
        raise ValueError(
            f"z0 has 1-D leaves {flat}: deq_jax solves a batch, every leaf [B, ...] with the examples "
            "along axis 0 (each stops on its own). For one example add the batch axis (z0[None], x[None]; "
            "a per-example f then needs jax.vmap); for B one-number examples use shape [B, 1]"
        )
    batch = jnp.shape(z_leaves[0])[0]
    bad = [jnp.shape(leaf) for leaf in jax.tree.leaves(x) if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != batch]
    if bad:
        raise ValueError(
            f"every leaf of x must have z0's batch size {batch} as its leading axis (pass what is "
            f"shared by all examples through params); got x leaves of shapes {bad}"
        )


def _solve_forward(f, forward, params, x, z0, step_limit):
    result = forward.solve(lambda z: f(params, x, z), z0, step_limit)
    return result.z, result


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fixed_point(f, forward, backward, params, x, z0, probe, step_limit):
    return _solve_forward(f, forward, params, x, jax.lax.stop_gradient(z0), step_limit)


def _fixed_point_fwd(f, forward, backward, params, x, z0, probe, step_limit):
    z_star, result = _solve_forward(f, forward, params, x, jax.lax.stop_gradient(z0), step_limit)
    return (z_star, result), (params, x, z_star, z0, probe)


def _fixed_point_bwd(f, forward, backward, residuals, cotangent):
    try:
        return _backward(f, backward, residuals, cotangent)
    except jax.errors.UnexpectedTracerError as e:
        raise _closure_error(e) from e


def _backward(f, backward, residuals, cotangent):
    params, x, z_star, z0, probe = residuals
    # result.z is z* too: its cotangent joins g, so neither output loses gradient.
    g = jax.tree.map(jnp.add, cotangent[0], cotangent[1].z)
    if isinstance(backward, Phantom):
        (d_params, d_x), stats = _phantom_vjp(f, backward, params, x, z_star, g)
    else:
        (d_params, d_x), adjoint = _implicit_vjp(f, backward, params, x, z_star, g)
        stats = _stats_of(adjoint)
    d_z0 = jax.tree.map(jnp.zeros_like, z0)
    d_probe = None if probe is None else jax.tree.map(lambda p, s: s.astype(p.dtype), probe, stats)
    return d_params, d_x, d_z0, d_probe, None


_fixed_point.defvjp(_fixed_point_fwd, _fixed_point_bwd)


def _reversible_forward(f, forward, params, x, z0, step_limit):
    options = dict(forward.options)
    return iterate(
        lambda z: f(params, x, z), z0, max_steps=forward.max_steps, tol=forward.tol, stop_mode=forward.stop_mode,
        step_limit=step_limit, causal_axis=forward.causal_axis, precision=forward.precision, **options,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _reversible_fixed_point(f, forward, backward, params, x, z0, probe, step_limit):
    result, _ = _reversible_forward(f, forward, params, x, z0, step_limit)
    return result.z, result


def _reversible_fwd(f, forward, backward, params, x, z0, probe, step_limit):
    result, trajectory = _reversible_forward(f, forward, params, x, z0, step_limit)
    return (result.z, result), (params, x, z0, trajectory, probe)


def _reversible_bwd(f, forward, backward, residuals, cotangent):
    params, x, z0, trajectory, probe = residuals
    g = jax.tree.map(jnp.add, cotangent[0], cotangent[1].z)
    try:
        (d_params, d_x, d_z0), rebuilt = reverse(f, forward, backward, params, x, z0, trajectory, g)
    except jax.errors.UnexpectedTracerError as e:
        raise _closure_error(e) from e
    d_probe = None
    if probe is not None:
        stats = _reversal_stats(z0, rebuilt, trajectory, forward.causal_axis)
        d_probe = jax.tree.map(lambda p, s: s.astype(p.dtype), probe, stats)
    return d_params, d_x, d_z0, d_probe, None


# A reversal whose rebuilt z0 is off by more than this, relative to the final state, no longer
# gives the exact gradient to float32's useful digits (docs/guides/reversible.md).
REVERSAL_TOL = 1e-3


def reversal_amplification(beta: float, steps: int) -> float:
    """The most a reverse pass of ``steps`` steps can amplify a rounding error of the last
    state, for a contractive f: ``|1 - beta| ** (-2 * steps)`` (a step of the coupled
    iteration has determinant ``(1 - beta)^2`` per direction; along a direction where J_f has
    eigenvalue near 1 the forward step keeps one factor ~1, so the other is (1 - beta)^2)."""
    return abs(1.0 - beta) ** (-2.0 * steps)


def _warn_if_reversal_cannot_hold(forward: SolverConfig, z0) -> None:
    """A warning when rounding in z0's dtype, amplified by :func:`reversal_amplification`, can
    exceed :data:`REVERSAL_TOL`: the gradient may then be far from exact (measured in
    docs/guides/reversible.md); the probe's ``rel_residual`` says how far the reversal got."""
    beta = dict(forward.options).get("beta", DEFAULT_BETA)
    dtype = base.working_dtype([jnp.result_type(leaf) for leaf in jax.tree.leaves(z0)])
    eps = float(jnp.finfo(dtype).eps)
    if eps * reversal_amplification(beta, forward.max_steps) <= REVERSAL_TOL:
        return
    safe = 0
    while eps * reversal_amplification(beta, safe + 1) <= REVERSAL_TOL:
        safe += 1
    warnings.warn(
        f"the reversible gradient with beta={beta:g} over max_steps={forward.max_steps} in {np.dtype(dtype).name} may "
        f"not be exact: its reverse pass can amplify rounding up to |1 - beta|^(-2 steps) = "
        f"{reversal_amplification(beta, forward.max_steps):.1e}x. It holds within {safe} steps at this beta (the "
        f"closer beta is to 1, the fewer), or in float64; the backward probe's rel_residual measures the rebuilt "
        f"z0's error. See docs/guides/reversible.md.",
        stacklevel=3,
    )


def _reversal_stats(z0, rebuilt, trajectory, causal_axis) -> BackwardStats:
    """The reverse pass's statistics: the residuals are those of the *reversal*, how far the
    rebuilt z_0 is from the true one (absolute, and relative to the final z_n); "converged"
    means relative error < :data:`REVERSAL_TOL`; "nonfinite" that the rebuilt states overflowed."""
    _, ravel, _ = base.ravel_positions(z0, rebuilt.dtype, causal_axis)
    z0_mat = ravel(z0)
    batch = z0_mat.shape[0]
    error = jnp.sqrt(jnp.sum(((rebuilt - z0_mat) ** 2).reshape(batch, -1), axis=1))
    scale = jnp.sqrt(jnp.sum((trajectory.z ** 2).reshape(batch, -1), axis=1)) + base.REL_EPS
    relative = error / scale
    steps = trajectory.steps[:, -1] if trajectory.steps.ndim == 2 else trajectory.steps
    return BackwardStats(
        n_steps=steps.astype(jnp.float32),
        abs_residual=error.astype(jnp.float32),
        rel_residual=relative.astype(jnp.float32),
        converged=(relative < REVERSAL_TOL).astype(jnp.float32),
        vjp_evals=jnp.full((batch,), 2 * trajectory.loop_steps, jnp.float32),
        nonfinite=(~jnp.isfinite(relative)).astype(jnp.float32),
    )


_reversible_fixed_point.defvjp(_reversible_fwd, _reversible_bwd)


def reverse(f, forward, backward, params, x, z0, trajectory, g):
    """The reverse pass of the reversible iteration: from (y_n, z_n) and the cotangent g of
    z_n, rebuild each step backwards and accumulate the gradient.

    Step k -> k + 1 was ``y' = (1 - b) y + b f(z)``, ``z' = (1 - b) z + b f(y')``. Backwards:
    ``z = (z' - b f(y')) / (1 - b)`` with ``y_bar += b z_bar J_f(y')``, then
    ``y = (y' - b f(z)) / (1 - b)`` with ``z_bar = (1 - b) z_bar + b y_bar J_f(z)`` and
    ``y_bar = (1 - b) y_bar``; the parameters collect ``b z_bar df/dtheta (y')`` and
    ``b y_bar df/dtheta (z)``. An example (causal: a position) is reversed through its own
    steps only. Returns ``((d_params, d_x, d_z0), z0_rebuilt)``, the second the rebuilt z_0 as
    a working-dtype ``[B, (T,) D]`` array (equal to z0 up to the rounding the reversal amplifies).
    """
    beta = dict(forward.options).get("beta", DEFAULT_BETA)
    dtype = trajectory.z.dtype
    _, ravel, unravel = base.ravel_positions(z0, dtype, forward.causal_axis)
    leaves, treedef = jax.tree.flatten((params, x))
    floating = [jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in leaves]

    def merge(float_leaves):
        it = iter(float_leaves)
        return treedef.unflatten([next(it) if fl else leaf for leaf, fl in zip(leaves, floating, strict=True)])

    def f_mat(float_leaves, z):
        p, xx = merge(float_leaves)
        return ravel(f(p, xx, unravel(z)))

    def f_and_vjp(inputs):  # f(z) and the cotangent's VJP at z, in one function of one pytree
        float_leaves, z, cotangent = inputs
        out, vjp = jax.vjp(f_mat, float_leaves, z)
        return out, vjp(cotangent.astype(out.dtype))

    # Its convolutions (the VJP's transposed ones too) in XLA CPU's fast layout, as the solvers do.
    f_and_vjp = conv_layout.on_cpu(f_and_vjp)
    float_leaves = [leaf for leaf, fl in zip(leaves, floating, strict=True) if fl]
    z0_mat = ravel(z0)

    def body(carry):
        k, y, z, y_bar, z_bar, grads = carry
        k = k - 1
        active = (trajectory.steps > k)[..., None]
        with base.precision_scope(backward.precision):
            f_y, (g_theta, g_y) = f_and_vjp((float_leaves, y, jnp.where(active, beta * z_bar, 0.0)))
            z_prev = jnp.where(active, (z - beta * f_y) / (1.0 - beta), z)
            y_bar_t = y_bar + g_y
            # The first step's state is known exactly: z0. Linearizing there, not at its rebuilt
            # copy, matters where f has kinks: a z0 of zeros puts ReLUs exactly at 0, and a
            # rebuilt 1e-17 would flip their derivative.
            f_z, (h_theta, g_z) = f_and_vjp(
                (float_leaves, jnp.where(k == 0, z0_mat, z_prev), jnp.where(active, beta * y_bar_t, 0.0)))
            y_prev = jnp.where(active, (y - beta * f_z) / (1.0 - beta), y)
        grads = [a + b + c for a, b, c in zip(grads, g_theta, h_theta, strict=True)]
        # A stopped example (causal: position) passes its state through unchanged; what the active
        # ones' f read from it (causal: later positions read earlier ones) still flows into it.
        z_bar = jnp.where(active, (1.0 - beta) * z_bar, z_bar) + g_z
        y_bar = jnp.where(active, (1.0 - beta) * y_bar_t, y_bar_t)
        return k, y_prev, z_prev, y_bar, z_bar, grads

    g_mat = ravel(g)
    start = (trajectory.loop_steps, trajectory.y, trajectory.z, jnp.zeros_like(g_mat), g_mat,
             [jnp.zeros_like(leaf) for leaf in float_leaves])
    _, _, z_rebuilt, y_bar, z_bar, grads = jax.lax.while_loop(lambda c: c[0] > 0, body, start)
    it = iter(grads)
    d_leaves = [next(it) if fl else np.zeros(jnp.shape(leaf), jax.dtypes.float0)
                for leaf, fl in zip(leaves, floating, strict=True)]
    d_params, d_x = treedef.unflatten(d_leaves)
    return (d_params, d_x, unravel(y_bar + z_bar)), z_rebuilt


def _stats_of(result: base.SolverResult) -> BackwardStats:
    return BackwardStats(
        n_steps=result.n_steps.astype(jnp.float32),
        abs_residual=result.abs_residual.astype(jnp.float32),
        rel_residual=result.rel_residual.astype(jnp.float32),
        converged=result.converged.astype(jnp.float32),
        vjp_evals=jnp.broadcast_to(result.f_evals, result.n_steps.shape).astype(jnp.float32),
        nonfinite=result.nonfinite.astype(jnp.float32),
    )


def _implicit_vjp(f, backward, params, x, z_star, g):
    """Solves u = u J + g at z* and returns (u df/d(params, x), adjoint SolverResult)."""
    with base.precision_scope(backward.precision):  # the VJPs keep the precision they are linearized at
        _, vjp_all = jax.vjp(f, params, x, z_star)
    # Only the z-part of the VJP is needed inside the loop; XLA drops the rest there.
    result = backward.solve(lambda u: jax.tree.map(jnp.add, vjp_all(u)[2], g), g)
    d_params, d_x, _ = vjp_all(result.z)
    return (d_params, d_x), result


def _phantom_vjp(f, phantom, params, x, z_star, g):
    def unrolled_from_star(p, xx):
        return damped_unroll(f, p, xx, z_star, phantom.steps, phantom.damping)

    _, vjp_px = jax.vjp(unrolled_from_star, params, x)
    batch = jax.tree.leaves(z_star)[0].shape[0]
    stats = BackwardStats(
        n_steps=jnp.full((batch,), phantom.steps, jnp.float32),
        abs_residual=jnp.full((batch,), jnp.nan, jnp.float32),
        rel_residual=jnp.full((batch,), jnp.nan, jnp.float32),
        converged=jnp.zeros((batch,), jnp.float32),
        vjp_evals=jnp.full((batch,), phantom.steps, jnp.float32),
        nonfinite=jnp.zeros((batch,), jnp.float32),
    )
    return vjp_px(g), stats


def damped_unroll(f: Callable, params: PyTree, x: PyTree, z: PyTree, steps: int, damping: float) -> PyTree:
    """``steps`` damped applications of f from z, differentiated normally:
    ``z_{i+1} = (1 - damping) f(params, x, z_i) + damping z_i``."""

    # A Python loop, not a scan: XLA's CPU backend puts convolutions in its fast layout in the
    # entry computation only, not in a loop's body (deq_jax.solvers.conv_layout).
    for _ in range(steps):
        z = jax.tree.map(lambda a, b: (1.0 - damping) * a + damping * b, f(params, x, z), z)
    return z


def adjoint_solve(
    f: Callable,
    params: PyTree,
    x: PyTree,
    z_star: PyTree,
    g: PyTree,
    backward: SolverConfig = DEFAULT_BACKWARD,
) -> tuple[tuple[PyTree, PyTree], base.SolverResult]:
    """The implicit backward pass on its own: solve ``u = u J_f(z*) + g``.

    Returns ``((d_params, d_x), result)`` with ``result.z = u``: the same numbers
    ``jax.grad`` through :func:`fixed_point` uses, plus the full adjoint
    :class:`~deq_jax.solvers.SolverResult` (traces included) for inspection.
    """
    if not isinstance(backward, SolverConfig):
        raise ValueError(f"adjoint_solve needs a SolverConfig, got {backward!r}")
    return _implicit_vjp(f, backward, params, x, z_star, g)


def unrolled(f: Callable, params: PyTree, x: PyTree, z0: PyTree, num_layers: int) -> PyTree:
    """``num_layers`` weight-tied applications of f from z0, differentiated normally.

    The pretraining mode of DEQs: z_{i+1} = f(params, x, z_i); returns z_{num_layers}.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    return damped_unroll(f, params, x, z0, num_layers, 0.0)
