"""What every fixed-point solver shares: the result type, residual norms and the loop.

A solver is split in two, after optimistix: a small *method* that proposes the next
iterate from the current one (Broyden, Anderson, plain iteration), and one loop,
written here, that does the bookkeeping every method needs:

* per-example residuals ``||f(z) - z||`` (norm over each example's trailing axes);
* per-example stopping: an example that met ``tol`` stops changing;
* per-example lowest-residual iterate, its step count and residuals (in ``rel`` mode an
  iterate whose absolute residual exceeds z0's is the best only if it met ``tol``);
* residual traces of shape ``[max_steps + 1, B]``;
* non-finite values: a step that produces NaN/Inf for an example never replaces that
  example's best iterate; the example stops and ``nonfinite`` says it happened.

Internally the loop works on a ``[B, D]`` matrix in a *working* dtype of at least
float32 (so norms and Broyden/Anderson products stay in float32 when ``f`` runs in
bfloat16); ``f`` is always called on its own pytree structure and dtypes.

**Causal solving** (``causal_axis``). For sequence models whose ``f`` is causal along
an axis (position t of ``f(z)`` reads positions <= t of ``z``), a solver that mixes
positions through inner products over the whole sequence is not causal before it
converges: position t of an iterate then depends on later tokens. With ``causal_axis``
set, ``T`` is that axis and every inner product a method takes is a *prefix* inner
product, ``<a, b>_t = sum_{s <= t} a_s . b_s``, so each position gets its own
coefficients (Broyden) or mixing weights (Anderson) from positions <= t. Residuals are
prefix norms too, and position t stops once the residuals of every prefix up to t meet
``tol`` (the stopped positions are always a prefix of the sequence). By induction,
position t of every iterate is a function of positions <= t of ``f``'s inputs. The loop
then returns the last iterate (a best iterate chosen by whole-sequence residual would
let later positions decide which iterate position t gets); a non-finite value at
position t sends positions >= t back to their last finite iterate and stops them.
In causal mode the working arrays are ``[B, T, D]`` and per-position quantities ``[B, T]``;
the methods are written once for both shapes (:func:`pdot`, :func:`pcoeffs`, :func:`combine`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax.solvers import conv_layout

Array = jax.Array
PyTree = Any

STOP_MODES = ("rel", "abs")
# Added to ||f(z)|| in the relative residual so that a zero fixed point has no 0/0.
REL_EPS = 1e-8
# Full precision for the solvers' small products, also on accelerators whose default
# float32 matmul precision is lower (TF32 on NVIDIA GPUs).
PRECISION = jax.lax.Precision.HIGHEST
# What ``precision=`` accepts for f's own matmuls and convolutions: None keeps the
# platform's default (on NVIDIA GPUs float32 matmuls then run in TF32, about 3 significant
# digits per product); the others are ``jax.default_matmul_precision`` values.
MATMUL_PRECISIONS = (None, "default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


class SolverResult(NamedTuple):
    """What a solve returns (a pytree: it can cross ``jit``/``vmap`` boundaries).

    Shapes use ``B`` for the batch (leading axis of every leaf of ``z0``) and ``T`` for
    ``max_steps``.

    Attributes:
      z: the lowest-residual iterate of each example, same pytree/shapes/dtypes as z0.
      n_steps: ``[B]`` int32, the number of solver updates that produced ``z``
        (0 means ``z0`` itself).
      abs_residual: ``[B]`` ``||f(z) - z||`` at ``z``.
      rel_residual: ``[B]`` ``||f(z) - z|| / (||f(z)|| + 1e-8)`` at ``z``.
      abs_trace: ``[T + 1, B]`` the absolute residual of the current iterate at each
        step (row 0 is ``z0``); rows after the loop ended are NaN (not run).
      rel_trace: ``[T + 1, B]`` the same for the relative residual.
      converged: ``[B]`` bool, the stop-mode residual at ``z`` is below ``tol``.
      nonfinite: ``[B]`` bool, a NaN/Inf was met for this example (``z`` is then the
        best finite iterate seen, or ``z0`` itself if ``f(z0)`` was not finite).
      f_evals: ``[]`` int32, how many times ``f`` was evaluated on the batch.
      snapshots: one z-like pytree per step count in the solve's ``snapshots`` argument
        (empty by default): the iterate the solve would have returned had its step limit
        been that count, i.e. the lowest-residual iterate of the first ``k`` updates
        (causal: the last); what fixed-point correction supervises. Not differentiable
        through :func:`deq_jax.fixed_point` (its gradient is zero).
    """

    z: PyTree
    n_steps: Array
    abs_residual: Array
    rel_residual: Array
    abs_trace: Array
    rel_trace: Array
    converged: Array
    nonfinite: Array
    f_evals: Array
    snapshots: tuple = ()


class Method(NamedTuple):
    """A solver's own part: how to propose the next iterate.

    ``init(z, fz) -> state`` and ``step(state, z, fz) -> (z_next, state)``, where
    ``z`` and ``fz = f(z)`` are ``[B, D]`` arrays in the working dtype. The loop
    freezes examples that have stopped, so a method may propose anything for them
    but must keep every example's computation independent of the others: the ``z``
    and ``fz`` of an example that met NaN/Inf stay non-finite (ordinary solves).
    """

    init: Callable[[Array, Array], Any]
    step: Callable[[Any, Array, Array], tuple[Array, Any]]


def validate(max_steps, tol, stop_mode) -> None:
    """Raises ``ValueError`` for arguments no solver accepts."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)):
        raise ValueError(f"max_steps must be a Python int, got {max_steps!r}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not isinstance(tol, (int, float, np.floating)) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")


def check_snapshots(snapshots, max_steps: int) -> tuple[int, ...]:
    """``snapshots`` as a tuple of increasing step counts in ``[1, max_steps]``, or ``ValueError``."""
    steps = tuple(snapshots) if isinstance(snapshots, (tuple, list)) else None
    if steps is None or not all(
        isinstance(k, (int, np.integer)) and not isinstance(k, bool) and 1 <= k <= max_steps for k in steps
    ) or list(steps) != sorted(set(steps)):
        raise ValueError(f"snapshots must be increasing step counts in [1, max_steps={max_steps}], got {snapshots!r}")
    return tuple(int(k) for k in steps)


def check_precision(precision) -> None:
    """``ValueError`` unless ``precision`` is one of :data:`MATMUL_PRECISIONS`."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"precision must be one of {MATMUL_PRECISIONS}, got {precision!r}")


def precision_scope(precision):
    """A context in which f is traced at matmul ``precision`` (None: the platform default).

    JAX fixes a dot's or convolution's precision when it is traced, so f traced (or
    linearized) inside this context keeps it wherever it later runs, e.g. in a while loop.
    """
    check_precision(precision)
    return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)


def at_precision(f: Callable, precision) -> Callable:
    """``f`` traced at matmul ``precision`` (see :func:`precision_scope`); None: f itself."""
    check_precision(precision)
    if precision is None:
        return f

    def f_at_precision(*args):
        with precision_scope(precision):
            return f(*args)

    return f_at_precision


def working_dtype(dtypes) -> np.dtype:
    """The dtype the loop computes in: the inputs' common float type, at least float32."""
    if not all(jnp.issubdtype(d, jnp.floating) for d in dtypes):
        raise TypeError(f"fixed-point solvers need floating-point z0, got dtypes {list(dtypes)}")
    return jnp.result_type(jnp.float32, *dtypes)


def ravel_batch(tree: PyTree, dtype) -> tuple[Array, Callable[[PyTree], Array], Callable[[Array], PyTree]]:
    """Flattens a pytree of ``[B, ...]`` arrays to one ``[B, D]`` array of ``dtype``.

    Returns the matrix, the map (pytree like ``tree`` -> matrix) and its inverse
    (matrix -> pytree with the original structure, shapes and dtypes). One leaf is a
    reshape, with no copy.
    """
    return ravel_positions(tree, dtype, None)


def check_causal_axis(causal_axis) -> None:
    """``ValueError`` unless ``causal_axis`` is None or an int >= 1 (axis 0 is the batch)."""
    if causal_axis is None:
        return
    if isinstance(causal_axis, bool) or not isinstance(causal_axis, (int, np.integer)) or causal_axis < 1:
        raise ValueError(
            f"causal_axis must be None or an int >= 1 (axis 0 is the batch), got {causal_axis!r}"
        )


def ravel_positions(
    tree: PyTree, dtype, causal_axis: int | None
) -> tuple[Array, Callable[[PyTree], Array], Callable[[Array], PyTree]]:
    """Flattens a pytree of ``[B, ...]`` arrays to one array of ``dtype``: ``[B, D]``, or
    ``[B, T, D]`` with ``T`` the length of axis ``causal_axis`` of every leaf (moved next
    to the batch axis).

    Returns the array, the map (pytree like ``tree`` -> array) and its inverse (array ->
    pytree with the original structure, shapes and dtypes).
    """
    check_causal_axis(causal_axis)
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        raise ValueError("z0 is an empty pytree")
    for leaf in leaves:
        if jnp.ndim(leaf) < 1:
            raise ValueError(
                "every leaf of z0 needs a leading batch axis; got a scalar leaf. "
                "For a single example, add an axis: z0[None]"
            )
    shapes = [leaf.shape for leaf in leaves]
    batch = shapes[0][0]
    if any(shape[0] != batch for shape in shapes):
        raise ValueError(f"every leaf of z0 must share the batch size (leading axis); got shapes {shapes}")
    if causal_axis is None:
        lead, moved = (batch,), shapes
    else:
        if any(len(shape) <= causal_axis for shape in shapes):
            raise ValueError(f"causal_axis={causal_axis} is not an axis of every leaf of z0; got shapes {shapes}")
        length = shapes[0][causal_axis]
        if any(shape[causal_axis] != length for shape in shapes):
            raise ValueError(
                f"every leaf of z0 must have the same length along causal_axis={causal_axis}; got shapes {shapes}"
            )
        lead = (batch, length)
        # Each leaf's shape with the sequence axis moved to position 1.
        moved = [(s[0], s[causal_axis]) + s[1:causal_axis] + s[causal_axis + 1 :] for s in shapes]
    dtypes = [leaf.dtype for leaf in leaves]
    sizes = [int(np.prod(m[len(lead) :], dtype=np.int64)) for m in moved]

    def ravel(t):
        flat = []
        for leaf in jax.tree.leaves(t):
            if causal_axis is not None:
                leaf = jnp.moveaxis(leaf, causal_axis, 1)
            flat.append(jnp.reshape(leaf, lead + (-1,)).astype(dtype))
        return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=-1)

    def unravel(arr):
        parts = [arr] if len(sizes) == 1 else jnp.split(arr, np.cumsum(sizes)[:-1], axis=-1)
        leaves_out = []
        for part, moved_shape, dt in zip(parts, moved, dtypes, strict=True):
            leaf = part.reshape(moved_shape)
            if causal_axis is not None:
                leaf = jnp.moveaxis(leaf, 1, causal_axis)
            leaves_out.append(leaf.astype(dt))
        return jax.tree.unflatten(treedef, leaves_out)

    return ravel(tree), ravel, unravel


def residual_norms(z: Array, fz: Array) -> tuple[Array, Array]:
    """Per-example ``(||f(z) - z||, ||f(z) - z|| / (||f(z)|| + 1e-8))`` of ``[B, D]`` inputs."""
    abs_res = jnp.linalg.norm(fz - z, axis=1)
    rel_res = abs_res / (jnp.linalg.norm(fz, axis=1) + REL_EPS)
    return abs_res, rel_res


# The working arrays are [B, D] (ordinary) or [B, T, D] (causal). The helpers below take
# inner products over D, and in the causal case prefix sums over T, so every method is
# written once for both; for [B, D] they are exactly the plain per-example products.


def _prefix(x: Array, causal: bool) -> Array:
    """Cumulative sum over positions (axis 1) if ``causal``: entry t sums entries <= t only."""
    return jnp.cumsum(x, axis=1) if causal else x


def pdot(a: Array, b: Array) -> Array:
    """Per-example ``[B]`` inner products of ``[B, D]`` arrays, or prefix inner products
    ``[B, T]``, ``sum_{s<=t} a_s . b_s``, of ``[B, T, D]`` arrays."""
    return _prefix(jnp.einsum("b...d,b...d->b...", a, b, precision=PRECISION), a.ndim == 3)


def pcoeffs(buffer: Array, x: Array) -> Array:
    """:func:`pdot` of each of the m rows of ``buffer`` (``[B, m, D]`` or ``[B, m, T, D]``)
    with ``x`` -> ``[B, m]`` or ``[B, T, m]``."""
    return _prefix(jnp.einsum("bm...d,b...d->b...m", buffer, x, precision=PRECISION), x.ndim == 3)


def combine(coeffs: Array, buffer: Array) -> Array:
    """``sum_i coeffs[b, (t,) i] * buffer[b, i, (t)]`` -> like one buffer row, ``[B, (T,) D]``."""
    return jnp.einsum("b...m,bm...d->b...d", coeffs, buffer, precision=PRECISION)


def prefix_residuals(z: Array, fz: Array) -> tuple[Array, Array]:
    """:func:`residual_norms` of ``[B, D]`` inputs, or ``[B, T]`` prefix residuals of
    ``[B, T, D]`` inputs (the norms over positions <= t)."""
    if z.ndim == 2:
        return residual_norms(z, fz)
    diff = fz - z
    abs_res = jnp.sqrt(pdot(diff, diff))
    rel_res = abs_res / (jnp.sqrt(pdot(fz, fz)) + REL_EPS)
    return abs_res, rel_res


def _checked_f(f, z0, ravel, unravel):
    """``f`` on working arrays, checking at trace time that it keeps z's structure."""
    in_struct = jax.tree.structure(z0)
    in_shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(z0)]

    def f_flat(zmat):
        out = f(unravel(zmat))
        out_shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(out)]
        if jax.tree.structure(out) != in_struct or out_shapes != in_shapes:
            raise ValueError(
                "f must map z to an output of the same structure and shapes; "
                f"z0 has {in_struct} with shapes {in_shapes}, f(z0) has "
                f"{jax.tree.structure(out)} with shapes {out_shapes}"
            )
        return ravel(out)

    return f_flat


def stop_test(tol: float, stop_mode: str, causal: bool) -> tuple[Callable, Callable]:
    """The loops' shared stopping rule, as ``(measure, whole)``.

    ``measure(z, fz) -> (abs_res, rel_res, metric, finite, met)``: per example ``[B]``
    (causal: per position, the prefix residuals ``[B, T]``), ``metric`` the stop-mode
    residual, ``met`` finite and below ``tol`` (causal: for every prefix up to t, so the
    stopped positions are a prefix). ``whole(x)``: a per-position ``[B, T]`` quantity as the
    whole example's ``[B]`` (its last prefix); the identity otherwise.
    """
    use_rel = stop_mode == "rel"

    def measure(z, fz):
        abs_res, rel_res = prefix_residuals(z, fz)
        metric = rel_res if use_rel else abs_res
        finite = jnp.isfinite(metric) & jnp.isfinite(abs_res)
        met = finite & ((jax.lax.cummax(metric, axis=1) if causal else metric) < tol)
        return abs_res, rel_res, metric, finite, met

    def whole(x):
        return x[:, -1] if causal else x

    return measure, whole


class _Loop(NamedTuple):
    """The loop's carry: ``z``-like arrays ``[B, D]`` (causal: ``[B, T, D]``), per-example
    ones ``[B]`` (causal: per position, ``[B, T]``)."""

    k: Array  # updates made so far
    z: Array  # current iterate
    fz: Array  # f(z)
    method_state: Any
    stopped: Array  # converged or failed: frozen from now on
    best_z: Array  # lowest-residual iterate (causal: last finite iterate)
    best_metric: Array  # its stop-mode residual
    best_abs: Array
    best_rel: Array
    best_step: Array
    nonfinite: Array
    abs_trace: Array  # [max_steps + 1, B] of the whole example
    rel_trace: Array
    snaps: Array  # [len(snapshots), *best_z.shape]: best_z after each snapshot's step count


def solve(
    method: Method,
    f: Callable,
    z0: PyTree,
    max_steps: int,
    tol: float,
    stop_mode: str,
    step_limit: Array | int | None = None,
    causal_axis: int | None = None,
    precision: str | None = None,
    early_exit: bool = True,
    snapshots: tuple[int, ...] = (),
) -> SolverResult:
    """Runs ``method`` on ``z = f(z)`` from ``z0`` with the shared bookkeeping (see module doc).

    ``step_limit`` (optional, may be a traced int scalar) lowers the step limit below the
    static ``max_steps`` without recompiling; traces keep ``max_steps + 1`` rows.
    ``causal_axis`` (optional): solve causally along this axis of every leaf (module doc).
    ``precision`` (optional): matmul precision of f's evaluations (:func:`precision_scope`);
    the loop's own products are always float32 (:data:`PRECISION`).
    ``early_exit`` (default True): the loop ends once every example has stopped or the
    step limit is reached. False: it runs exactly ``max_steps`` steps, a trip count XLA
    knows at compile time, so a GPU never copies the loop's predicate to the host (it
    does so every step otherwise); steps past that point change nothing (every example is
    frozen, trace rows are NaN as if not run), but f still runs: ``f_evals`` is then
    ``max_steps + 1``. Every other field of the result is the same as with early exit.
    ``snapshots`` (optional): increasing step counts k; the result's ``snapshots`` then holds,
    for each, the iterate this solve returns with ``step_limit=k`` (one extra copy of z each).
    """
    validate(max_steps, tol, stop_mode)
    snapshots = check_snapshots(snapshots, max_steps)
    if not isinstance(early_exit, bool):
        raise ValueError(f"early_exit must be True or False, got {early_exit!r}")
    f = at_precision(f, precision)
    limit = max_steps if step_limit is None else jnp.clip(jnp.asarray(step_limit, jnp.int32), 0, max_steps)
    dtype = working_dtype([leaf.dtype for leaf in jax.tree.leaves(z0)])
    z0_mat, ravel, unravel = ravel_positions(z0, dtype, causal_axis)
    f_mat = conv_layout.on_cpu(_checked_f(f, z0, ravel, unravel))  # fast convolutions in the loop
    batch = z0_mat.shape[0]
    use_rel = stop_mode == "rel"
    causal = causal_axis is not None

    measure, whole = stop_test(tol, stop_mode, causal)

    fz0 = f_mat(z0_mat)
    abs0, rel0, metric0, finite0, met0 = measure(z0_mat, fz0)
    nan_trace = jnp.full((max_steps + 1, batch), jnp.nan, dtype)
    state = _Loop(
        k=jnp.int32(0),
        z=z0_mat,
        fz=fz0,
        method_state=method.init(z0_mat, fz0),
        stopped=met0 | ~finite0,
        best_z=z0_mat,
        best_metric=jnp.where(finite0, metric0, jnp.inf),
        best_abs=abs0,
        best_rel=rel0,
        best_step=jnp.zeros(metric0.shape, jnp.int32),
        nonfinite=~finite0,
        abs_trace=nan_trace.at[0].set(whole(abs0)),
        rel_trace=nan_trace.at[0].set(whole(rel0)),
        snaps=jnp.zeros((len(snapshots),) + z0_mat.shape, dtype),
    )
    snap_steps = jnp.asarray(snapshots, jnp.int32).reshape((-1,) + (1,) * z0_mat.ndim)

    def cond(s: _Loop):
        return (s.k < limit) & ~jnp.all(s.stopped)

    def body(s: _Loop):
        # Without early exit, a step the early-exit loop would not run freezes everything.
        ran = True if early_exit else cond(s)
        stopped = s.stopped if early_exit else s.stopped | ~ran
        z_prop, method_state = method.step(s.method_state, s.z, s.fz)
        frozen = stopped[..., None]
        z = jnp.where(frozen, s.z, z_prop)
        fz = jnp.where(frozen, s.fz, f_mat(z))
        abs_res, rel_res, metric, finite, met = measure(z, fz)
        k = s.k + 1
        active = ~stopped
        failed = active & ~finite
        # Causal: always the newest finite iterate (see module doc); else the lowest residual,
        # and in rel mode never one with a larger absolute residual than z0's unless it met
        # tol: the relative residual of z0 = 0 is exactly 1, so without this an iterate far
        # from the fixed point (||f(z) - z|| 100x z0's, ||f(z)|| larger still) could replace z0.
        better = metric < s.best_metric
        if use_rel:
            better = better & ((abs_res <= abs0) | (metric < tol))
        improved = active & finite if causal else active & finite & better
        keep = improved[..., None]
        # Met NaN/Inf: the example (causal: the position and every later one) stops, and the
        # solve returns its best iterate, which is finite. Ordinary solves leave the
        # non-finite z in the carry: it never leaves the example's own rows (f and the
        # methods are per example), and its proposals are discarded. Causal solves go back to
        # the previous iterate (the last finite one, also what they return), with f(z) = z:
        # f mixes positions, and a NaN at a later position can reach earlier ones through
        # products with zero weights (0 * NaN = NaN, e.g. masked attention), which the
        # stopped positions must not do. Selects, not a `cond`: on a GPU a branch would copy
        # its predicate to the host every step.
        if causal:
            back = failed[..., None]
            z = jnp.where(back, s.z, z)
            fz = jnp.where(back, z, fz)  # z, not s.z: s.z's buffer is then free (no copy of it)
        best_z = jnp.where(keep, z, s.best_z)
        return _Loop(
            k=k,
            z=z,
            fz=fz,
            method_state=method_state,
            stopped=s.stopped | failed | met,
            best_z=best_z,
            best_metric=jnp.where(improved, metric, s.best_metric),
            best_abs=jnp.where(improved, abs_res, s.best_abs),
            best_rel=jnp.where(improved, rel_res, s.best_rel),
            best_step=jnp.where(improved, k, s.best_step),
            nonfinite=s.nonfinite | failed,
            abs_trace=s.abs_trace.at[k].set(row(ran, abs_res)),
            rel_trace=s.rel_trace.at[k].set(row(ran, rel_res)),
            snaps=jnp.where(snap_steps == k, best_z[None], s.snaps),
        )

    def row(ran, residuals):  # a trace row: NaN for a step the early-exit loop would not run
        return whole(residuals) if early_exit else jnp.where(ran, whole(residuals), jnp.nan)

    if early_exit:
        s = jax.lax.while_loop(cond, body, state)
    else:
        s = jax.lax.fori_loop(0, max_steps, lambda _, s: body(s), state)
    # A snapshot the loop never reached (every example stopped, or the step limit came first)
    # is the final iterate: the solve limited to that many steps returns it too.
    snaps = jnp.where(snap_steps > s.k, s.best_z[None], s.snaps)
    # Causal: the last position's prefix covers the whole example; it is the last to stop.
    return SolverResult(
        z=unravel(s.best_z),
        n_steps=whole(s.best_step),
        abs_residual=whole(s.best_abs),
        rel_residual=whole(s.best_rel),
        abs_trace=s.abs_trace,
        rel_trace=s.rel_trace,
        converged=(jnp.max(s.best_metric, axis=1) if causal else s.best_metric) < tol,
        nonfinite=jnp.any(s.nonfinite, axis=1) if causal else s.nonfinite,
        f_evals=s.k + 1,
        snapshots=tuple(unravel(snap) for snap in snaps),
    )
