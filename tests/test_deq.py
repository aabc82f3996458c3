"""The implicit layer against finite differences and gradients unrolled to convergence."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import deq_jax

B, D = 3, 5
TIGHT = deq_jax.SolverConfig("broyden", max_steps=200, tol=1e-13, options={"memory": 40})


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def cell(params, x, z):
    """A contractive tanh cell: z -> tanh(z W + x U + b)."""
    return jnp.tanh(z @ params["w"] + x @ params["u"] + params["b"])


def make_problem(seed=0, dtype=jnp.float64):
    kw, ku, kb, kx, kg = jax.random.split(jax.random.PRNGKey(seed), 5)
    w = jax.random.normal(kw, (D, D), dtype)
    params = {
        "w": 0.6 * w / jnp.linalg.norm(w, 2),
        "u": jax.random.normal(ku, (4, D), dtype),
        "b": 0.1 * jax.random.normal(kb, (D,), dtype),
    }
    x = jax.random.normal(kx, (B, 4), dtype)
    weights = jax.random.normal(kg, (B, D), dtype)
    return params, x, weights


def implicit_loss(params, x, weights, backward=TIGHT):
    z, _ = deq_jax.fixed_point(cell, params, x, jnp.zeros((B, D), x.dtype), forward=TIGHT, backward=backward)
    return jnp.sum(weights * jnp.sin(z))


def iterate(f, params, x, z0, n):
    """n weight-tied applications of f, differentiated normally: the reference for
    converged solves. A rolled scan, because deq_jax.unrolled unrolls fully (fast for a few
    pretraining layers) and 300 unrolled layers take about a minute to compile."""
    return jax.lax.scan(lambda z, _: (f(params, x, z), None), z0, None, length=n)[0]


def unrolled_loss(params, x, weights, n=300):
    z = iterate(cell, params, x, jnp.zeros((B, D), x.dtype), n)
    return jnp.sum(weights * jnp.sin(z))


@pytest.mark.parametrize("backward_solver", ["broyden", "anderson", "fixed_point_iteration"])
def test_implicit_gradient_matches_finite_differences(x64, backward_solver):
    params, x, weights = make_problem()
    backward = deq_jax.SolverConfig(backward_solver, max_steps=300, tol=1e-13)
    check_grads(lambda p, xx: implicit_loss(p, xx, weights, backward), (params, x), order=1, modes=["rev"])


def test_implicit_gradient_matches_unrolled_gradient(x64):
    params, x, weights = make_problem(1)
    g_implicit = jax.grad(implicit_loss, argnums=(0, 1))(params, x, weights)
    g_unrolled = jax.grad(unrolled_loss, argnums=(0, 1))(params, x, weights)
    chex.assert_trees_all_close(g_implicit, g_unrolled, rtol=1e-9, atol=1e-11)
    # The forward solution is the unrolled one too.
    z, result = deq_jax.fixed_point(cell, params, x, jnp.zeros((B, D)), forward=TIGHT)
    np.testing.assert_allclose(z, iterate(cell, params, x, jnp.zeros((B, D)), 300), atol=1e-12)
    assert bool(jnp.all(result.converged))


def test_pytree_params_and_state(x64):
    params, x, weights = make_problem(2)

    def cell2(p, x, z):
        h = jnp.tanh(z["a"] @ p["w"] + x @ p["u"] + p["b"])
        return {"a": h, "s": 0.5 * z["s"] + jnp.sum(h, axis=1, keepdims=True)}

    def loss(p, solve):
        z0 = {"a": jnp.zeros((B, D)), "s": jnp.zeros((B, 1))}
        if solve:
            z, _ = deq_jax.fixed_point(cell2, p, x, z0, forward=TIGHT, backward=TIGHT)
        else:
            z = iterate(cell2, p, x, z0, 300)
        return jnp.sum(weights * z["a"]) + jnp.sum(z["s"] ** 2)

    chex.assert_trees_all_close(jax.grad(loss)(params, True), jax.grad(loss)(params, False), rtol=1e-9, atol=1e-11)


def test_phantom_many_steps_approaches_implicit(x64):
    params, x, weights = make_problem(3)
    g_implicit = jax.grad(implicit_loss)(params, x, weights)
    errors = []
    for steps in (1, 5, 40):
        g = jax.grad(implicit_loss)(params, x, weights, deq_jax.Phantom(steps=steps, damping=0.2))
        diff = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), g, g_implicit)
        errors.append(max(jax.tree.leaves(diff)))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6


def test_phantom_one_step_is_jacobian_free_backprop(x64):
    params, x, weights = make_problem(4)
    g = jax.grad(implicit_loss, argnums=(0, 1))(params, x, weights, deq_jax.Phantom(steps=1))
    # By hand: dL/dz* at z*, pushed through one f application only (no (I - J)^-1).
    z_star, _ = deq_jax.fixed_point(cell, params, x, jnp.zeros((B, D)), forward=TIGHT)
    dl_dz = weights * jnp.cos(z_star)
    _, vjp = jax.vjp(lambda p, xx: cell(p, xx, z_star), params, x)
    chex.assert_trees_all_close(g, vjp(dl_dz), rtol=1e-12, atol=1e-14)


def test_backward_stats_through_probe(x64):
    params, x, weights = make_problem(5)
    backward = deq_jax.SolverConfig("broyden", max_steps=50, tol=1e-8)

    def loss(p, probe):
        z, _ = deq_jax.fixed_point(cell, p, x, jnp.zeros((B, D)), forward=TIGHT, backward=backward, probe=probe)
        return jnp.sum(weights * jnp.sin(z))

    g_params, stats = jax.grad(loss, argnums=(0, 1))(params, deq_jax.BackwardStats.zeros(B))
    assert isinstance(stats, deq_jax.BackwardStats)
    chex.assert_shape(list(stats), (B,))
    assert bool(jnp.all(stats.n_steps >= 1)) and bool(jnp.all(stats.converged == 1.0))
    assert bool(jnp.all(stats.rel_residual < 1e-8))
    # adjoint_solve is the same backward pass, with its full result.
    z_star, _ = deq_jax.fixed_point(cell, params, x, jnp.zeros((B, D)), forward=TIGHT)
    (d_params, _), adjoint = deq_jax.adjoint_solve(cell, params, x, z_star, weights * jnp.cos(z_star), backward)
    chex.assert_trees_all_close(d_params, g_params, rtol=1e-10)
    np.testing.assert_array_equal(adjoint.n_steps, stats.n_steps)
    # The probe leaves the gradient unchanged.
    chex.assert_trees_all_close(g_params, jax.grad(implicit_loss)(params, x, weights, backward), rtol=1e-12)


def test_phantom_stats_through_probe():
    params, x, weights = make_problem(6, jnp.float32)

    def loss(p, probe):
        z, _ = deq_jax.fixed_point(cell, p, x, jnp.zeros((B, D)), backward=deq_jax.Phantom(3), probe=probe)
        return jnp.sum(z)

    stats = jax.grad(loss, argnums=1)(params, deq_jax.BackwardStats.zeros(B))
    np.testing.assert_array_equal(stats.n_steps, 3.0)
    assert bool(jnp.all(jnp.isnan(stats.rel_residual)))


def test_gradient_through_result_z_and_wrt_z0(x64):
    params, x, weights = make_problem(7)

    def via_result(p, z0):
        _, result = deq_jax.fixed_point(cell, p, x, z0, forward=TIGHT, backward=TIGHT)
        return jnp.sum(weights * jnp.sin(result.z))

    g_params, g_z0 = jax.grad(via_result, argnums=(0, 1))(params, jnp.ones((B, D)))
    chex.assert_trees_all_close(g_params, jax.grad(implicit_loss)(params, x, weights), rtol=1e-9)
    np.testing.assert_array_equal(g_z0, 0.0)


def test_jit_does_not_retrace_and_vmap_works():
    params, x, weights = make_problem(8, jnp.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grad_fn(p, xx):
        return jax.grad(implicit_loss)(p, xx, weights, deq_jax.SolverConfig(max_steps=40, tol=1e-5))

    g1 = grad_fn(params, x)
    g2 = grad_fn(jax.tree.map(lambda a: 0.9 * a, params), x + 1.0)  # new values, no retrace
    assert not bool(jnp.allclose(g1["w"], g2["w"]))

    # vmap over a leading axis of parameter sets.
    stacked = jax.tree.map(lambda *a: jnp.stack(a), params, jax.tree.map(lambda a: 0.5 * a, params))
    solve = jax.vmap(lambda p: deq_jax.fixed_point(cell, p, x, jnp.zeros((B, D)))[0])
    zs = jax.jit(solve)(stacked)
    for i, p in enumerate([params, jax.tree.map(lambda a: 0.5 * a, params)]):
        np.testing.assert_allclose(zs[i], deq_jax.fixed_point(cell, p, x, jnp.zeros((B, D)))[0], atol=1e-5)
    vgrad = jax.jit(jax.vmap(lambda p: jax.grad(implicit_loss)(p, x, weights)))(stacked)
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a[0], vgrad), jax.grad(implicit_loss)(params, x, weights), rtol=1e-4, atol=1e-5
    )


def test_unrolled_is_repeated_application():
    params, x, _ = make_problem(9, jnp.float32)
    z = jnp.zeros((B, D))
    for _ in range(4):
        z = cell(params, x, z)
    np.testing.assert_allclose(deq_jax.unrolled(cell, params, x, jnp.zeros((B, D)), 4), z, rtol=1e-6)


def test_bad_configuration_gives_clear_errors():
    params, x, _ = make_problem(10, jnp.float32)
    with pytest.raises(ValueError, match="unknown solver"):
        deq_jax.SolverConfig("newton")
    with pytest.raises(ValueError, match="max_steps"):
        deq_jax.SolverConfig(max_steps=0)
    with pytest.raises(ValueError, match="tol"):
        deq_jax.SolverConfig(tol=-1.0)
    with pytest.raises(ValueError, match="stop_mode"):
        deq_jax.SolverConfig(stop_mode="l2")
    with pytest.raises(ValueError, match="steps"):
        deq_jax.Phantom(steps=0)
    with pytest.raises(ValueError, match="backward must be"):
        deq_jax.fixed_point(cell, params, x, jnp.zeros((B, D)), backward="implicit")
    with pytest.raises(ValueError, match="same structure and shapes"):
        deq_jax.fixed_point(lambda p, x, z: cell(p, x, z)[:, :-1], params, x, jnp.zeros((B, D)))
    with pytest.raises(ValueError, match="num_layers"):
        deq_jax.unrolled(cell, params, x, jnp.zeros((B, D)), 0)
    # Solver options travel to the solver; configs are hashable (static arguments).
    config = deq_jax.SolverConfig("anderson", options={"memory": 3, "mixing": 0.5})
    assert hash(config) == hash(deq_jax.SolverConfig("anderson", options={"mixing": 0.5, "memory": 3}))
    with pytest.raises(TypeError, match="unexpected keyword"):
        deq_jax.fixed_point(cell, params, x, jnp.zeros((B, D)), forward=deq_jax.SolverConfig(options={"memry": 3}))


def test_precision_reaches_the_forward_and_the_backward_solve():
    """``SolverConfig(precision=...)`` sets the precision of f in the forward solve and of its
    VJPs in the backward solve (and of the final parameter VJP), whatever the global default
    (here bfloat16 passes, as TF32 is on GPUs); None keeps the global default."""
    from test_solvers import _dot_precisions

    params, x, weights = make_problem(dtype=jnp.float32)
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)

    def grad_precisions(precision):
        config = deq_jax.SolverConfig("anderson", max_steps=5, tol=1e-4, precision=precision)

        def loss(p):
            z, _ = deq_jax.fixed_point(cell, p, x, jnp.zeros((B, D)), forward=config, backward=config)
            return jnp.sum(weights * z)

        with jax.default_matmul_precision("bfloat16"):
            return _dot_precisions(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)

    assert grad_precisions("highest") == {highest}
    assert grad_precisions(None) != {highest}
