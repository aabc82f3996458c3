"""What every fixed-point solver shares: the result type, residual norms and the loop.

A solver is split in two, after optimistix: a small *method* that proposes the next
iterate from the current one (Broyden, Anderson, plain iteration), and one loop,
written here, that does the bookkeeping every method needs:

* per-example residuals ``||f(z) - z||`` (norm over each example's trailing axes);
* per-example stopping: an example that met ``tol`` stops changing;
* per-example lowest-residual iterate, its step count and residuals;
* residual traces of shape ``[max_steps + 1, B]``;
* non-finite values: a step that produces NaN/Inf for an example never replaces that
  example's best iterate; the example stops and ``nonfinite`` says it happened.

Internally the loop works on a ``[B, D]`` matrix in a *working* dtype of at least
float32 (so norms and Broyden/Anderson products stay in float32 when ``f`` runs in
bfloat16); ``f`` is always called on its own pytree structure and dtypes.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any

STOP_MODES = ("rel", "abs")
# Added to ||f(z)|| in the relative residual so that a zero fixed point has no 0/0.
REL_EPS = 1e-8
# Full precision for the solvers' small products, also on accelerators whose default
# float32 matmul precision is lower (TF32 on NVIDIA GPUs).
PRECISION = jax.lax.Precision.HIGHEST


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


class Method(NamedTuple):
    """A solver's own part: how to propose the next iterate.

    ``init(z, fz) -> state`` and ``step(state, z, fz) -> (z_next, state)``, where
    ``z`` and ``fz = f(z)`` are ``[B, D]`` arrays in the working dtype. The loop
    freezes examples that have stopped, so a method may propose anything for them
    but must keep every example's computation independent of the others.
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
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        raise ValueError("z0 is an empty pytree")
    for leaf in leaves:
        if jnp.ndim(leaf) < 1:
            raise ValueError(
                "every leaf of z0 needs a leading batch axis; got a scalar leaf. "
                "For a single example, add an axis: z0[None]"
            )
    batch = leaves[0].shape[0]
    if any(leaf.shape[0] != batch for leaf in leaves):
        raise ValueError(
            "every leaf of z0 must share the batch size (leading axis); got shapes "
            f"{[leaf.shape for leaf in leaves]}"
        )
    shapes = [leaf.shape for leaf in leaves]
    dtypes = [leaf.dtype for leaf in leaves]
    sizes = [int(np.prod(s[1:], dtype=np.int64)) for s in shapes]

    def ravel(t):
        flat = [jnp.reshape(leaf, (batch, -1)).astype(dtype) for leaf in jax.tree.leaves(t)]
        return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=1)

    def unravel(mat):
        parts = [mat] if len(sizes) == 1 else jnp.split(mat, np.cumsum(sizes)[:-1], axis=1)
        leaves_out = [p.reshape(s).astype(d) for p, s, d in zip(parts, shapes, dtypes, strict=True)]
        return jax.tree.unflatten(treedef, leaves_out)

    return ravel(tree), ravel, unravel


def residual_norms(z: Array, fz: Array) -> tuple[Array, Array]:
    """Per-example ``(||f(z) - z||, ||f(z) - z|| / (||f(z)|| + 1e-8))`` of ``[B, D]`` inputs."""
    abs_res = jnp.linalg.norm(fz - z, axis=1)
    rel_res = abs_res / (jnp.linalg.norm(fz, axis=1) + REL_EPS)
    return abs_res, rel_res


def bdot(a: Array, b: Array) -> Array:
    """Per-example inner product of two ``[B, D]`` arrays -> ``[B]``."""
    return jnp.einsum("bd,bd->b", a, b, precision=PRECISION)


def _checked_f(f, z0, ravel, unravel):
    """``f`` on ``[B, D]`` matrices, checking at trace time that it keeps z's structure."""
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


class _Loop(NamedTuple):
    k: Array  # updates made so far
    z: Array  # current iterate, [B, D]
    fz: Array  # f(z)
    method_state: Any
    stopped: Array  # [B] converged or failed: frozen from now on
    best_z: Array
    best_fz: Array
    best_metric: Array
    best_abs: Array
    best_rel: Array
    best_step: Array
    nonfinite: Array
    abs_trace: Array
    rel_trace: Array


def solve(
    method: Method,
    f: Callable,
    z0: PyTree,
    max_steps: int,
    tol: float,
    stop_mode: str,
    step_limit: Array | int | None = None,
) -> SolverResult:
    """Runs ``method`` on ``z = f(z)`` from ``z0`` with the shared bookkeeping (see module doc).

    ``step_limit`` (optional, may be a traced int scalar) lowers the step limit below the
    static ``max_steps`` without recompiling; traces keep ``max_steps + 1`` rows.
    """
    validate(max_steps, tol, stop_mode)
    limit = max_steps if step_limit is None else jnp.clip(jnp.asarray(step_limit, jnp.int32), 0, max_steps)
    dtype = working_dtype([leaf.dtype for leaf in jax.tree.leaves(z0)])
    z0_mat, ravel, unravel = ravel_batch(z0, dtype)
    f_mat = _checked_f(f, z0, ravel, unravel)
    batch = z0_mat.shape[0]
    use_rel = stop_mode == "rel"

    def measure(z, fz):
        abs_res, rel_res = residual_norms(z, fz)
        metric = rel_res if use_rel else abs_res
        finite = jnp.isfinite(metric) & jnp.isfinite(abs_res)
        return abs_res, rel_res, metric, finite

    fz0 = f_mat(z0_mat)
    abs0, rel0, metric0, finite0 = measure(z0_mat, fz0)
    nan_trace = jnp.full((max_steps + 1, batch), jnp.nan, dtype)
    state = _Loop(
        k=jnp.int32(0),
        z=z0_mat,
        fz=fz0,
        method_state=method.init(z0_mat, fz0),
        stopped=(metric0 < tol) | ~finite0,
        best_z=z0_mat,
        best_fz=fz0,
        best_metric=jnp.where(finite0, metric0, jnp.inf),
        best_abs=abs0,
        best_rel=rel0,
        best_step=jnp.zeros((batch,), jnp.int32),
        nonfinite=~finite0,
        abs_trace=nan_trace.at[0].set(abs0),
        rel_trace=nan_trace.at[0].set(rel0),
    )

    def cond(s: _Loop):
        return (s.k < limit) & ~jnp.all(s.stopped)

    def body(s: _Loop):
        z_prop, method_state = method.step(s.method_state, s.z, s.fz)
        frozen = s.stopped[:, None]
        z = jnp.where(frozen, s.z, z_prop)
        fz = jnp.where(frozen, s.fz, f_mat(z))
        abs_res, rel_res, metric, finite = measure(z, fz)
        k = s.k + 1
        active = ~s.stopped
        failed = active & ~finite
        improved = active & finite & (metric < s.best_metric)
        keep = improved[:, None]
        # An example that met NaN/Inf goes back to its best iterate and stops.
        back = failed[:, None]
        return _Loop(
            k=k,
            z=jnp.where(back, s.best_z, z),
            fz=jnp.where(back, s.best_fz, fz),
            method_state=method_state,
            stopped=s.stopped | failed | (finite & (metric < tol)),
            best_z=jnp.where(keep, z, s.best_z),
            best_fz=jnp.where(keep, fz, s.best_fz),
            best_metric=jnp.where(improved, metric, s.best_metric),
            best_abs=jnp.where(improved, abs_res, s.best_abs),
            best_rel=jnp.where(improved, rel_res, s.best_rel),
            best_step=jnp.where(improved, k, s.best_step),
            nonfinite=s.nonfinite | failed,
            abs_trace=s.abs_trace.at[k].set(abs_res),
            rel_trace=s.rel_trace.at[k].set(rel_res),
        )

    s = jax.lax.while_loop(cond, body, state)
    return SolverResult(
        z=unravel(s.best_z),
        n_steps=s.best_step,
        abs_residual=s.best_abs,
        rel_residual=s.best_rel,
        abs_trace=s.abs_trace,
        rel_trace=s.rel_trace,
        converged=s.best_metric < tol,
        nonfinite=s.nonfinite,
        f_evals=s.k + 1,
    )
