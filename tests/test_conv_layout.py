"""Convolutions rewritten into the layout XLA's CPU backend runs fast (solvers.conv_layout)."""

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import deq_jax
from deq_jax.solvers import conv_layout

# (input shape, kernel shape, dimension numbers, other arguments)
CASES = [
    ((2, 5, 6, 3), (3, 3, 3, 4), ("NHWC", "HWIO", "NHWC"), {}),
    ((2, 3, 5, 6), (4, 3, 3, 3), ("NCHW", "OIHW", "NCHW"), {}),
    ((2, 5, 6, 3), (3, 3, 4, 3), ("NHWC", "HWOI", "NHWC"), {}),  # a VJP's transposed kernel
    ((2, 3, 5, 6), (3, 3, 3, 4), ("NCHW", "HWIO", "NHWC"), {"window_strides": (2, 1), "rhs_dilation": (1, 2)}),
    ((2, 7, 4), (3, 2, 6), ("NWC", "WIO", "NCW"), {"feature_group_count": 2}),
]


def _convolutions(jaxpr) -> list:
    """The dimension numbers of every convolution in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append(eqn.params["dimension_numbers"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _convolutions(sub)
    return found


def _conv_cell(case, key):
    x_shape, w_shape, dimension_numbers, options = case
    options = dict(options)
    strides = options.pop("window_strides", (1,) * (len(x_shape) - 2))
    w = jax.random.normal(key, w_shape) / np.sqrt(np.prod(w_shape[:-1]))

    def f(z):
        return jnp.tanh(lax.conv_general_dilated(z, w, strides, "SAME", dimension_numbers=dimension_numbers, **options))

    return f, jax.random.normal(jax.random.fold_in(key, 1), x_shape)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c[2]) if isinstance(c, tuple) else None)
def test_rewritten_convolutions_compute_the_same_in_the_canonical_layout(case):
    """f and its VJP (a transposed convolution) give the same values rewritten, and every
    convolution of the rewritten function is in the canonical layout."""
    f, x = _conv_cell(case, jax.random.PRNGKey(0))
    rewritten = conv_layout.canonical_convolutions(f)
    np.testing.assert_allclose(rewritten(x), f(x), rtol=1e-5, atol=1e-6)
    _, vjp = jax.vjp(f, x)
    u = jax.random.normal(jax.random.PRNGKey(2), f(x).shape)
    transposed = conv_layout.canonical_convolutions(lambda v: vjp(v)[0])
    np.testing.assert_allclose(transposed(u), vjp(u)[0], rtol=1e-5, atol=1e-6)
    before = _convolutions(jax.make_jaxpr(f)(x).jaxpr) + _convolutions(jax.make_jaxpr(lambda v: vjp(v)[0])(u).jaxpr)
    assert not all(conv_layout.is_canonical(dn) for dn in before)  # there was something to rewrite
    for fn, arg in ((rewritten, x), (transposed, u)):
        found = _convolutions(jax.make_jaxpr(fn)(arg).jaxpr)
        assert found and all(conv_layout.is_canonical(dn) for dn in found)


def test_convolutions_inside_a_nested_jit_are_rewritten_too():
    f, x = _conv_cell(CASES[1], jax.random.PRNGKey(3))
    nested = lambda z: 2.0 * jax.jit(f)(z)  # noqa: E731
    rewritten = conv_layout.canonical_convolutions(nested)
    np.testing.assert_allclose(rewritten(x), nested(x), rtol=1e-5, atol=1e-6)
    found = _convolutions(jax.make_jaxpr(rewritten)(x).jaxpr)
    assert found and all(conv_layout.is_canonical(dn) for dn in found)


def _nchw_cell(key, channels=4):
    """f(z) = tanh(conv(z, W) + x) on NCHW states, with W scaled to a contraction, and the
    same cell on NHWC states."""
    w = 0.3 * jax.random.normal(key, (channels, channels, 3, 3)) / (3 * np.sqrt(channels))  # OIHW
    x = jax.random.normal(jax.random.fold_in(key, 1), (2, channels, 6, 6))

    def nchw(z):
        return jnp.tanh(lax.conv_general_dilated(z, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")) + x)

    def nhwc(z):
        return jnp.transpose(nchw(jnp.transpose(z, (0, 3, 1, 2))), (0, 2, 3, 1))

    return nchw, nhwc, w, x


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rewrite is applied on CPU only")
def test_solves_on_cpu_run_only_canonical_convolutions_inside_their_loops():
    """A forward solve of an NCHW cell and an adjoint solve (transposed convolutions) of an
    NHWC one compile to canonical convolutions only (XLA's CPU dim_labels b01f_01io->b01f:
    other layouts inside a loop run a naive loop nest), and give the NHWC solve's values."""
    nchw, nhwc, w, x = _nchw_cell(jax.random.PRNGKey(4))
    config = deq_jax.SolverConfig("broyden", max_steps=30, tol=1e-6)
    forward = jax.jit(lambda z0: config.solve(nchw, z0))
    z0 = jnp.zeros(x.shape)
    labels = set(re.findall(r"dim_labels=([\w>-]+)", forward.lower(z0).compile().as_text()))
    assert labels == {"b01f_01io->b01f"}
    np.testing.assert_allclose(
        forward(z0).z, jnp.transpose(config.solve(nhwc, jnp.zeros((2, 6, 6, 4))).z, (0, 3, 1, 2)), rtol=1e-5, atol=1e-6
    )

    def cell(params, _, z):  # NHWC, HWIO: canonical forward, transposed kernel in its VJP
        return jnp.tanh(lax.conv_general_dilated(z, params, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))

    hwio = jnp.transpose(w, (2, 3, 1, 0))
    z_star = jax.random.normal(jax.random.PRNGKey(5), (2, 6, 6, 4))
    adjoint = jax.jit(lambda params, z, g: deq_jax.adjoint_solve(cell, params, None, z, g, config))
    assert set(re.findall(r"dim_labels=([\w>-]+)", adjoint.lower(hwio, z_star, z_star).compile().as_text())) == {
        "b01f_01io->b01f"
    }
    _, result = adjoint(hwio, z_star, z_star)
    _, vjp = jax.vjp(lambda z: cell(hwio, None, z), z_star)
    np.testing.assert_allclose(result.z, vjp(result.z)[0] + z_star, rtol=1e-4, atol=1e-5)  # u = u J + g


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rewrite is applied on CPU only")
def test_the_spectral_radius_power_iteration_runs_only_canonical_convolutions():
    """150 VJPs inside a scan (the evaluation's spectral radius) are transposed convolutions:
    the same rewrite keeps them in XLA CPU's fast layout, with the values unchanged."""
    _, nhwc, _, _ = _nchw_cell(jax.random.PRNGKey(6))
    z = jax.random.normal(jax.random.PRNGKey(7), (2, 6, 6, 4))
    rho = jax.jit(lambda z: deq_jax.spectral_radius(nhwc, z, jax.random.PRNGKey(8)))
    assert set(re.findall(r"dim_labels=([\w>-]+)", rho.lower(z).compile().as_text())) == {"b01f_01io->b01f"}
    jacobian = jax.jacobian(lambda v: nhwc(v[None])[0])
    exact = [float(jnp.max(jnp.abs(jnp.linalg.eigvals(jacobian(z[b]).reshape(144, 144))))) for b in range(2)]
    np.testing.assert_allclose(rho(z), exact, rtol=0.05)
