"""Jacobian norms of a batch map z -> f(z), one value per example.

``fz`` maps a batch ``z`` (pytree of ``[B, ...]`` arrays) to a batch of the same
shapes, examples independent, so J_f is block diagonal and each example b has its own
``d x d`` block J_b (d = size of one example of z).

* :func:`hutchinson_frobenius`: unbiased estimate of ||J_b||_F^2 / d,
  E_eps ||eps^T J_b||^2 = ||J_b||_F^2 for E[eps eps^T] = I; differentiable, so it can
  be a training loss (the paper's Jacobian regularization; its gradient is a second
  order pass through ``jax.vjp``).
* :func:`exact_frobenius`: the same quantity exactly, from d VJPs (small problems).
* :func:`spectral_radius`: power-method estimate of ``max |eigenvalue(J_b)|``.

To regularize a DEQ as the paper does, treat z* as a constant:
``hutchinson_frobenius(lambda z: f(params, x, z), jax.lax.stop_gradient(z_star), key)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from deq_jax.solvers import base, conv_layout

Array = jax.Array
PROBES = ("gaussian", "rademacher")
MODES = ("vjp", "jvp")


def _per_example_sq_norm(tree, batch_axes: int) -> Array:
    """Sum of squares over all axes after the first ``batch_axes``, summed over leaves."""

    def sq(leaf):
        leaf = leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))
        return jnp.sum(jnp.square(leaf), axis=tuple(range(batch_axes, leaf.ndim)))

    return sum(sq(leaf) for leaf in jax.tree.leaves(tree))


def _dim(z) -> int:
    return sum(leaf[0].size for leaf in jax.tree.leaves(z))


def _is_key_batch(key) -> bool:
    """True for a ``[B]`` array of typed PRNG keys (one key per example)."""
    return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1


def _check_key(key) -> None:
    """``ValueError`` for what is not one PRNG key or a ``[B]`` array of typed keys; raw
    ``uint32`` keys of ``jax.random.PRNGKey`` split per example (``[B, 2]``) get the fix."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.ndim > 1:
            raise ValueError(f"JR keys must be one typed key or a [B] array of them, got shape {key.shape}")
        return
    if key.dtype != jnp.uint32 or key.ndim != 1:
        kind = "raw uint32 keys, one per row" if key.dtype == jnp.uint32 and key.ndim == 2 else "not PRNG keys"
        raise ValueError(
            f"JR keys of shape {key.shape} and dtype {key.dtype} are {kind}. Pass typed keys: "
            "jax.random.split(jax.random.key(seed), B) for one per example (jax.random.key, not the "
            "old jax.random.PRNGKey), or jax.random.wrap_key_data(keys) to convert raw ones"
        )


def _draw(key, z, num_probes: int, probe: str):
    """``num_probes`` random pytrees like z, stacked on a new leading axis.

    ``key`` is one PRNG key for the batch, or a ``[B]`` array of typed keys: then
    example b's probes come from ``key[b]`` alone, so they do not depend on the batch
    size or on how the batch is split across devices.
    """
    _check_key(key)
    leaves, treedef = jax.tree.flatten(z)

    def sample(k, shape, dtype):
        if probe == "gaussian":
            return jax.random.normal(k, shape, dtype)
        return jax.random.rademacher(k, shape, dtype)

    out = []
    for i, leaf in enumerate(leaves):
        if _is_key_batch(key):
            if key.shape[0] != leaf.shape[0]:
                raise ValueError(f"got {key.shape[0]} keys for a batch of {leaf.shape[0]} examples")
            per_example = (num_probes,) + leaf.shape[1:]
            keys = jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(key)
            out.append(jax.vmap(lambda k, s=per_example, d=leaf.dtype: sample(k, s, d), out_axes=1)(keys))
        else:
            out.append(sample(jax.random.fold_in(key, i), (num_probes,) + leaf.shape, leaf.dtype))
    return jax.tree.unflatten(treedef, out)


def hutchinson_frobenius(
    fz: Callable,
    z,
    key: Array,
    num_probes: int = 1,
    probe: str = "gaussian",
    mode: str = "vjp",
) -> Array:
    """Hutchinson estimate of ``||J_f(z)||_F^2 / d`` per example -> ``[B]``.

    ``mean_m ||eps_m^T J_b||^2 / d`` (``mode="vjp"``, reverse mode) or
    ``mean_m ||J_b eps_m||^2 / d`` (``mode="jvp"``, forward mode), with
    ``num_probes`` Gaussian or Rademacher probes ``eps_m`` per example. ``key``: one
    PRNG key, or a ``[B]`` array of typed keys (``jax.random.key``), one per example.

    Example:
      >>> import jax, jax.numpy as jnp, deq_jax
      >>> w = jnp.array([[0.5, 0.0], [0.0, -0.3]])
      >>> fz = lambda z: z @ w.T                   # J = w: ||J||_F^2 / d = (0.25 + 0.09) / 2
      >>> z = jnp.ones((4, 2))
      >>> estimate = deq_jax.hutchinson_frobenius(fz, z, jax.random.key(0), probe="rademacher")
      >>> [round(v, 4) for v in estimate.tolist()]  # exact here: J is diagonal
      [0.17, 0.17, 0.17, 0.17]
      >>> [round(v, 4) for v in deq_jax.exact_frobenius(fz, z).tolist()]
      [0.17, 0.17, 0.17, 0.17]
    """
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive int, got {num_probes!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    eps = _draw(key, z, num_probes, probe)
    if mode == "vjp":
        _, vjp_fn = jax.vjp(fz, z)
        products = jax.vmap(lambda e: vjp_fn(e)[0])(eps)
    else:
        products = jax.vmap(lambda e: jax.jvp(fz, (z,), (e,))[1])(eps)
    return jnp.mean(_per_example_sq_norm(products, batch_axes=2), axis=0) / _dim(z)


def exact_frobenius(fz: Callable, z) -> Array:
    """Exact ``||J_f(z)||_F^2 / d`` per example -> ``[B]``, from d VJPs (memory d^2 B)."""
    dtype = base.working_dtype([leaf.dtype for leaf in jax.tree.leaves(z)])
    z_mat, ravel, unravel = base.ravel_batch(z, dtype)
    batch, d = z_mat.shape
    _, vjp_fn = jax.vjp(lambda m: ravel(fz(unravel(m))), z_mat)
    basis = jnp.broadcast_to(jnp.eye(d, dtype=dtype)[:, None, :], (d, batch, d))
    rows = jax.vmap(lambda e: vjp_fn(e)[0])(basis)  # [d, B, d]: row i of each J_b
    return jnp.sum(jnp.square(rows), axis=(0, 2)) / d


def spectral_radius(fz: Callable, z, key: Array, num_iters: int = 150) -> Array:
    """Power-method estimate of the spectral radius of each J_b -> ``[B]``.

    Iterates v <- v^T J_b / ||v^T J_b|| and returns the geometric mean of the growth
    factors ||v^T J_b|| over the second half of the iterations. Unlike the Rayleigh
    quotient, this also converges when the dominant eigenvalues are a complex pair.

    Example:
      >>> import jax, jax.numpy as jnp, deq_jax
      >>> w = jnp.array([[0.5, 0.0], [0.0, -0.3]])
      >>> rho = deq_jax.spectral_radius(lambda z: z @ w.T, jnp.ones((4, 2)), jax.random.key(0))
      >>> [round(v, 3) for v in rho.tolist()]
      [0.5, 0.5, 0.5, 0.5]
    """
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 2:
        raise ValueError(f"num_iters must be an int >= 2, got {num_iters!r}")
    _, vjp_fn = jax.vjp(fz, z)
    # Inside the scan, as in a solver loop: convolutions in XLA CPU's fast layout on CPU.
    vjp_in_loop = conv_layout.on_cpu(lambda v: vjp_fn(v)[0])
    v0 = jax.tree.map(lambda e: e[0], _draw(key, z, 1, "gaussian"))

    def normalize(v):
        n = jnp.sqrt(_per_example_sq_norm(v, batch_axes=1))
        scale = jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)
        v = jax.tree.map(lambda leaf: leaf * scale.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype), v)
        return v, n

    def body(v, _):
        w = vjp_in_loop(v)
        w, growth = normalize(w)
        return w, jnp.log(growth)

    v, _ = normalize(v0)
    _, log_growth = jax.lax.scan(body, v, None, length=num_iters)
    return jnp.exp(jnp.mean(log_growth[num_iters // 2 :], axis=0))
