"""Jacobian tools against explicit Jacobians of small maps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deq_jax

B, D = 3, 6


def cell(params, z):
    return jnp.tanh(z @ params["w"] + params["b"])


def make(seed=0):
    kw, kb, kz = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {"w": jax.random.normal(kw, (D, D)) / jnp.sqrt(D), "b": jax.random.normal(kb, (D,))}
    return params, jax.random.normal(kz, (B, D))


def explicit_jacobians(fz, z):
    """[B, D, D]: each example's Jacobian, from jax.jacobian of a single-example map."""
    return jax.vmap(jax.jacobian(lambda zb: fz(zb[None])[0]))(z)


def test_exact_frobenius_matches_explicit_jacobian():
    params, z = make()
    fz = lambda z: cell(params, z)  # noqa: E731
    jac = explicit_jacobians(fz, z)
    expected = jnp.sum(jac**2, axis=(1, 2)) / D
    np.testing.assert_allclose(deq_jax.exact_frobenius(fz, z), expected, rtol=1e-5)
    # A pytree state: the norm is over the concatenated state.
    tree = {"a": z[:, :2], "b": z[:, 2:].reshape(B, 2, 2)}

    def f_tree(t):
        out = fz(jnp.concatenate([t["a"], t["b"].reshape(B, 4)], axis=1))
        return {"a": out[:, :2], "b": out[:, 2:].reshape(B, 2, 2)}

    np.testing.assert_allclose(deq_jax.exact_frobenius(f_tree, tree), expected, rtol=1e-5)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_hutchinson_is_unbiased(probe, mode):
    params, z = make(1)
    fz = lambda z: cell(params, z)  # noqa: E731
    exact = deq_jax.exact_frobenius(fz, z)
    n = 4000
    keys = jax.random.split(jax.random.PRNGKey(2), n)
    samples = jax.jit(jax.vmap(lambda k: deq_jax.hutchinson_frobenius(fz, z, k, probe=probe, mode=mode)))(keys)
    chex.assert_shape(samples, (n, B))
    mean, stderr = samples.mean(0), samples.std(0) / np.sqrt(n)
    assert bool(jnp.all(jnp.abs(mean - exact) < 4 * stderr)), (mean, exact, stderr)
    # More probes per call average the same samples: lower variance, same mean.
    many = deq_jax.hutchinson_frobenius(fz, z, keys[0], num_probes=n, probe=probe, mode=mode)
    assert bool(jnp.all(jnp.abs(many - exact) < 5 * samples.std(0) / np.sqrt(n)))


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_hutchinson_gradient_is_unbiased_for_exact_gradient(mode):
    params, z = make(3)

    def estimate(p, key):
        return jnp.sum(deq_jax.hutchinson_frobenius(lambda zz: cell(p, zz), z, key, mode=mode))

    def exact(p):
        return jnp.sum(deq_jax.exact_frobenius(lambda zz: cell(p, zz), z))

    n = 4000
    keys = jax.random.split(jax.random.PRNGKey(4), n)
    grads = jax.jit(jax.vmap(jax.grad(estimate), in_axes=(None, 0)))(params, keys)
    g_exact = jax.grad(exact)(params)
    for leaf, leaf_exact in zip(jax.tree.leaves(grads), jax.tree.leaves(g_exact), strict=True):
        mean, stderr = leaf.mean(0), leaf.std(0) / np.sqrt(n)
        assert bool(jnp.all(jnp.abs(mean - leaf_exact) < 4.5 * stderr + 1e-6)), (mean, leaf_exact)
        assert float(jnp.max(jnp.abs(leaf_exact))) > 0.01  # a real, non-zero gradient


def test_spectral_radius_matches_eigenvalues():
    params, z = make(5)
    fz = lambda z: cell(params, z)  # noqa: E731
    expected = jnp.max(jnp.abs(jnp.linalg.eigvals(explicit_jacobians(fz, z))), axis=1)
    estimate = deq_jax.spectral_radius(fz, z, jax.random.PRNGKey(6), num_iters=400)
    chex.assert_shape(estimate, (B,))
    np.testing.assert_allclose(estimate, expected, rtol=2e-2)


def test_spectral_radius_with_complex_dominant_pair():
    # A scaled rotation block dominates: eigenvalues 0.8 * exp(+-i 0.7), then 0.3 and 0.1.
    theta = 0.7
    rot = 0.8 * jnp.array([[jnp.cos(theta), -jnp.sin(theta)], [jnp.sin(theta), jnp.cos(theta)]])
    a = jax.scipy.linalg.block_diag(rot, jnp.diag(jnp.array([0.3, 0.1])))
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(7), (4, 4)))
    a = q @ a @ q.T
    z = jnp.zeros((2, 4))
    estimate = deq_jax.spectral_radius(lambda z: z @ a, z, jax.random.PRNGKey(8), num_iters=300)
    np.testing.assert_allclose(estimate, 0.8, rtol=1e-2)


def test_bad_arguments():
    params, z = make()
    fz = lambda z: cell(params, z)  # noqa: E731
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="probe"):
        deq_jax.hutchinson_frobenius(fz, z, key, probe="uniform")
    with pytest.raises(ValueError, match="mode"):
        deq_jax.hutchinson_frobenius(fz, z, key, mode="fwd")
    with pytest.raises(ValueError, match="num_probes"):
        deq_jax.hutchinson_frobenius(fz, z, key, num_probes=0)
    with pytest.raises(ValueError, match="num_iters"):
        deq_jax.spectral_radius(fz, z, key, num_iters=1)


def test_per_example_keys_make_the_estimate_independent_of_batch_split():
    params, z = make(3)
    fz = lambda z: cell(params, z)  # noqa: E731
    keys = jax.random.split(jax.random.key(5), B)
    whole = deq_jax.hutchinson_frobenius(fz, z, keys, num_probes=2)
    parts = [deq_jax.hutchinson_frobenius(fz, z[i : i + 1], keys[i : i + 1], num_probes=2) for i in range(B)]
    np.testing.assert_allclose(whole, jnp.concatenate(parts), rtol=1e-5)
    with pytest.raises(ValueError, match="keys for a batch"):
        deq_jax.hutchinson_frobenius(fz, z, keys[:2])
