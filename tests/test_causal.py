"""Causal solving along a sequence axis: every iterate's position t depends only on
positions <= t, through the solver's mixing, its stopping and the returned iterate.

Independent truths: the analytic fixed point of a causal (block lower-triangular) linear
map; and the prefix property itself: solving only the
first t positions must give exactly the values the whole sequence gives there.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from test_solvers import f_evals

import deq_jax
from deq_jax import solvers
from deq_jax.models import DEQTransformer
from deq_jax.train import objective

SOLVER_NAMES = sorted(solvers.SOLVERS)
# Tests here compare with exact references: full float32 matmuls on every platform.
PRECISION = jax.lax.Precision.HIGHEST


def _causal_linear(key, batch, length, dim, radius, rates=None):
    """f(z)_t = sum_{s<=t} z_s A_{st} + c_t, a block lower-triangular map of spectral norm ``radius``.

    ``rates`` (optional, ``[T]``) scales position t's block row, so positions contract at
    different speeds. Returns ``(f, c, z_star)`` with z_star from ``jnp.linalg.solve``."""
    ka, kc = jax.random.split(key)
    n = length * dim
    a = jax.random.normal(ka, (n, n))
    block = np.kron(np.triu(np.ones((length, length))), np.ones((dim, dim)))  # row s feeds column t >= s
    a = a * block
    if rates is not None:
        a = a * np.repeat(np.asarray(rates), dim)[None, :]
    a = radius * a / jnp.linalg.norm(a, 2)
    c = jax.random.normal(kc, (batch, n))
    z_star = jnp.linalg.solve((jnp.eye(n) - a).T, c.T).T.reshape(batch, length, dim)

    def f(z):
        flat = jnp.dot(z.reshape(batch, n), a, precision=PRECISION) + c
        return flat.reshape(batch, length, dim)

    return f, c, z_star


class CausalConvergenceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*SOLVER_NAMES)
    def test_reaches_the_fixed_point_of_a_causal_linear_map(self, name):
        f, _, z_star = _causal_linear(jax.random.key(0), 3, 6, 4, 0.7)
        solve = self.variant(lambda z0: solvers.get(name)(f, z0, max_steps=100, tol=1e-6, causal_axis=1))
        result = solve(jnp.zeros((3, 6, 4)))
        chex.assert_shape(result.z, (3, 6, 4))
        chex.assert_shape([result.n_steps, result.rel_residual, result.converged], (3,))
        assert bool(jnp.all(result.converged)), result.rel_residual
        np.testing.assert_allclose(result.z, z_star, atol=2e-5)
        # The reported residual is the whole example's, at the returned iterate (up to a few
        # float32 ulps of ||f(z)||: f rounds differently inside the compiled loop).
        abs_res, rel_res = solvers.residual_norms(result.z.reshape(3, -1), f(result.z).reshape(3, -1))
        np.testing.assert_allclose(result.rel_residual, rel_res, rtol=1e-3, atol=4 * np.sqrt(24) * 1.2e-7)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("tol", [1e-4, 1e-12])  # 1e-4: positions stop before the budget
def test_a_prefix_alone_gives_the_same_values(name, tol):
    """Solving positions < t alone equals the whole sequence's solve there, bit for bit.

    Position t's contraction rate grows with t, so with tol 1e-4 early positions stop
    (per prefix) well before later ones: the stopping must not look ahead either."""
    length, t = 8, 3
    rates = np.linspace(0.2, 1.0, length)
    f, c, _ = _causal_linear(jax.random.key(1), 2, length, 5, 0.9, rates)
    full = solvers.get(name)(f, jnp.zeros((2, length, 5)), max_steps=25, tol=tol, causal_axis=1)

    def f_prefix(z):  # the same map restricted to the first t positions (it is causal)
        padded = jnp.concatenate([z, jnp.zeros((2, length - t, 5))], axis=1)
        return f(padded)[:, :t]

    prefix = solvers.get(name)(f_prefix, jnp.zeros((2, t, 5)), max_steps=25, tol=tol, causal_axis=1)
    np.testing.assert_array_equal(prefix.z, full.z[:, :t])
    if tol == 1e-4:
        assert bool(jnp.all(full.converged)), full.rel_residual
        assert int(full.f_evals) < f_evals(name, 25)  # tol met before the budget
        assert int(jnp.max(prefix.n_steps)) < int(jnp.max(full.n_steps))  # the prefix stopped earlier


def test_pytree_and_a_later_sequence_axis():
    f, _, z_star = _causal_linear(jax.random.key(3), 2, 5, 6, 0.6)

    def f_tree(z):  # the state as {"a": [B, 4, T], "b": [B, 2, T]} with positions on axis 2
        flat = jnp.concatenate([z["a"], z["b"]], axis=1).transpose(0, 2, 1)
        out = f(flat).transpose(0, 2, 1)
        return {"a": out[:, :4], "b": out[:, 4:]}

    z0 = {"a": jnp.zeros((2, 4, 5)), "b": jnp.zeros((2, 2, 5))}
    result = solvers.anderson(f_tree, z0, max_steps=80, tol=1e-6, causal_axis=2)
    chex.assert_trees_all_equal_shapes(result.z, z0)
    got = jnp.concatenate([result.z["a"], result.z["b"]], axis=1).transpose(0, 2, 1)
    np.testing.assert_allclose(got, z_star, atol=2e-5)


def test_nonfinite_later_position_leaves_earlier_positions_alone():
    """NaN at position 4 onwards: positions >= 4 go back to their last finite iterate and
    stop, positions < 4 converge as if nothing happened (they cannot see position 4)."""
    f, _, z_star = _causal_linear(jax.random.key(4), 2, 6, 3, 0.6)
    bad = jnp.array([False, True])

    def f_nan(z):
        out = f(z)
        poisoned = bad[:, None, None] & (jnp.arange(6)[None, :, None] >= 4) & (jnp.abs(out) > 0.0)
        return jnp.where(poisoned, jnp.nan, out)

    result = solvers.broyden(f_nan, jnp.zeros((2, 6, 3)), max_steps=60, tol=1e-6, causal_axis=1)
    np.testing.assert_array_equal(result.nonfinite, bad)
    assert bool(jnp.all(jnp.isfinite(result.z)))
    np.testing.assert_allclose(result.z[:, :4], z_star[:, :4], atol=2e-5)
    np.testing.assert_array_equal(result.z[1, 4:], 0.0)  # z0: f(z0) was already NaN there
    assert bool(result.converged[0]) and not bool(result.converged[1])


def test_bad_causal_axis_gives_clear_errors():
    f, z0 = (lambda z: 0.5 * z), jnp.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="causal_axis must be None or an int >= 1"):
        solvers.anderson(f, z0, causal_axis=0)
    with pytest.raises(ValueError, match="causal_axis must be None or an int >= 1"):
        deq_jax.SolverConfig("anderson", causal_axis="time")
    with pytest.raises(ValueError, match="causal_axis=3 is not an axis of every leaf"):
        solvers.broyden(f, z0, causal_axis=3)
    with pytest.raises(ValueError, match="same length along causal_axis=1"):
        solvers.broyden(lambda z: z, {"a": jnp.zeros((2, 3)), "b": jnp.zeros((2, 4))}, causal_axis=1)


def test_gradients_through_a_causal_forward_equal_the_non_causal_ones():
    """At convergence the causal and the ordinary forward solve find the same z*, so the
    implicit gradients agree (the adjoint solve is the same)."""
    with jax.enable_x64(True):
        ka, kc = jax.random.split(jax.random.key(5))
        a = 0.5 * jax.random.normal(ka, (4, 4), jnp.float64) / 2.0
        x = jax.random.normal(kc, (2, 5, 4), jnp.float64)

        def cell(params, x, z):  # causal: position t reads the running mean of z up to t
            running = jnp.cumsum(z, axis=1) / jnp.arange(1, 6)[None, :, None]
            return jnp.tanh(running @ params + x)

        def loss(params, causal_axis):
            forward = deq_jax.SolverConfig("broyden", max_steps=60, tol=1e-11, causal_axis=causal_axis)
            backward = deq_jax.SolverConfig("broyden", max_steps=60, tol=1e-11)
            z, _ = deq_jax.fixed_point(cell, params, x, jnp.zeros_like(x), forward=forward, backward=backward)
            return jnp.sum(z**2)

        np.testing.assert_allclose(jax.grad(loss)(a, 1), jax.grad(loss)(a, None), rtol=1e-8, atol=1e-12)


# --- The DEQ-Transformer: budgets 1..12 and the trained/eval budgets ---------------------

B, T, V = 2, 16, 17
BUDGETS = list(range(1, 13)) + [30]


def _transformer(gain: float, pre_ln: bool):
    """A tiny DEQ-Transformer; ``gain`` scales every weight-norm gain (3: far from converged)."""
    model = DEQTransformer(V, d_model=32, num_heads=4, d_ff=64, pre_ln=pre_ln)
    tokens = jax.random.randint(jax.random.key(0), (B, T), 0, V)
    params = model.init(jax.random.key(1), tokens, unroll=1)["params"]
    params = jax.tree_util.tree_map_with_path(lambda path, p: p * gain if path[-1].key == "g" else p, params)
    return model, params, tokens


def _worst_change_before(model, params, tokens, solver: deq_jax.SolverConfig, t: int):
    """Largest change of logits at positions < t, over the budgets, when tokens >= t change;
    also the forward results of the original tokens at each budget."""
    changed = tokens.at[:, t:].set((tokens[:, t:] + 5) % V)
    run = jax.jit(
        lambda toks, limit: objective.forward(model, params, toks, mode="deq", config=solver, step_limit=limit)
    )
    worst, results = 0.0, []
    for budget in BUDGETS:
        a, b = run(tokens, budget), run(changed, budget)
        worst = max(worst, float(jnp.max(jnp.abs(a.logits[:, :t] - b.logits[:, :t]))))
        results.append(a.result)
    return worst, results


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_causal_solvers_never_leak_the_future_at_any_budget(name):
    """Post-LN model with gains x3 (no solver converges in 30 steps): position t's logits
    must not move when only later tokens change, at every budget, for t = 1 and 8."""
    model, params, tokens = _transformer(3.0, pre_ln=False)
    solver = deq_jax.SolverConfig(name, max_steps=30, tol=1e-9, causal_axis=1)
    for t in (1, T // 2):
        worst, results = _worst_change_before(model, params, tokens, solver, t)
        assert worst <= 1e-5, (name, t, worst)
    assert float(jnp.min(results[-1].rel_residual)) > 1e-3  # not converged: the hard case


@pytest.mark.parametrize("name", ["broyden", "anderson", "fixed_point_iteration"])
def test_the_same_solvers_leak_without_causal_mode(name):
    """Without ``causal_axis`` the same solves leak: Broyden and Anderson through their
    whole-sequence inner products, plain iteration through the best-iterate choice (made on
    the whole sequence's residual). So the test above can fail."""
    model, params, tokens = _transformer(3.0, pre_ln=False)
    worst, _ = _worst_change_before(model, params, tokens, deq_jax.SolverConfig(name, max_steps=30, tol=1e-9), T // 2)
    assert worst > 1e-2, (name, worst)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_causal_solvers_stay_causal_when_they_converge_before_the_budget(name):
    """Pre-LN model at its initialization: the solves reach tol 1e-3 within a few steps,
    positions stop per prefix, and earlier logits still do not see later tokens."""
    model, params, tokens = _transformer(1.0, pre_ln=True)
    solver = deq_jax.SolverConfig(name, max_steps=30, tol=1e-3, causal_axis=1)
    worst, results = _worst_change_before(model, params, tokens, solver, T // 2)
    assert worst <= 1e-5, (name, worst)
    at_30 = results[-1]
    assert bool(jnp.all(at_30.converged)) and int(at_30.f_evals) < f_evals(name, 30)  # stopped before the budget


def test_causal_solving_holds_with_segment_memory():
    """With a memory of the positions before the segment (a constant input of the cell),
    position t's logits still do not move at any budget when only later tokens change,
    and they do move when the memory changes (it is attended to)."""
    from deq_jax.models import empty_memory

    _, params, tokens = _transformer(3.0, pre_ln=False)
    model = DEQTransformer(V, d_model=32, num_heads=4, d_ff=64, pre_ln=False, mem_len=8)
    memory = empty_memory(B, 8, 32)
    memory = memory._replace(states=jax.random.normal(jax.random.key(3), memory.states.shape),
                             valid=jnp.ones_like(memory.valid))
    solver = deq_jax.SolverConfig("broyden", max_steps=30, tol=1e-9, causal_axis=1)
    run = jax.jit(lambda toks, mem, limit: objective.forward(model, params, toks, mode="deq", config=solver,
                                                              step_limit=limit, memory=mem).logits)
    t = T // 2
    changed = tokens.at[:, t:].set((tokens[:, t:] + 5) % V)
    for budget in (1, 4, 12, 30):
        a, b = run(tokens, memory, budget), run(changed, memory, budget)
        assert float(jnp.max(jnp.abs(a[:, :t] - b[:, :t]))) <= 1e-5, budget
    other = memory._replace(states=memory.states + 1.0)
    assert float(jnp.max(jnp.abs(run(tokens, other, 12)[:, :1] - run(tokens, memory, 12)[:, :1]))) > 1e-3
