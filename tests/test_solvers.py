"""Solvers against independent truths: linear fixed points solved by jnp.linalg.solve."""

import functools
import importlib

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from deq_jax import solvers

SOLVER_NAMES = sorted(solvers.SOLVERS)


def f_evals(name: str, steps: int) -> int:
    """f evaluations of a solve that ran ``steps`` steps: the reversible iteration evaluates f
    twice a step, the others once; one more for z0."""
    return (2 if name == "reversible" else 1) * steps + 1


def _affine_problem(key, batch, dim, radius):
    """f(z) = z A + c with spectral norm(A) = radius; the fixed point solves z (I - A) = c."""
    ka, kc = jax.random.split(key)
    a = jax.random.normal(ka, (dim, dim))
    a = radius * a / jnp.linalg.norm(a, 2)
    c = jax.random.normal(kc, (batch, dim))
    z_star = jnp.linalg.solve((jnp.eye(dim) - a).T, c.T).T
    return a, c, z_star


class ConvergenceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(name=SOLVER_NAMES, shape=[(6, 16), (3, 4, 4, 2)])
    def test_reaches_tol_on_contractive_affine_map(self, name, shape):
        batch, dim = shape[0], int(np.prod(shape[1:]))
        a, c, z_star = _affine_problem(jax.random.PRNGKey(0), batch, dim, 0.7)

        def f(z):
            return (z.reshape(batch, dim) @ a + c).reshape(shape)

        solve = self.variant(lambda z0: solvers.get(name)(f, z0, max_steps=80, tol=1e-5))
        result = solve(jnp.zeros(shape))
        chex.assert_shape(result.z, shape)
        chex.assert_shape([result.n_steps, result.abs_residual, result.rel_residual], (batch,))
        chex.assert_shape([result.abs_trace, result.rel_trace], (81, batch))
        assert bool(jnp.all(result.converged)), result.rel_residual
        assert not bool(jnp.any(result.nonfinite))
        assert float(jnp.max(result.rel_residual)) < 1e-5
        np.testing.assert_allclose(result.z.reshape(batch, dim), z_star, atol=1e-4)
        # The reported residuals are those of the returned iterate. f evaluated again here
        # may round differently from f inside the solver's compiled loop (another summation
        # order, as on GPUs), and ||f(z) - z|| at convergence is a difference of nearly equal
        # numbers: the two agree to a few float32 ulps of ||f(z)||, not to a relative 1e-3.
        fz = f(result.z).reshape(batch, -1)
        abs_res, rel_res = solvers.residual_norms(result.z.reshape(batch, -1), fz)
        fz_norm = np.linalg.norm(fz, axis=1)
        rounding = 4 * np.sqrt(dim) * np.finfo(np.float32).eps * fz_norm
        np.testing.assert_array_less(np.abs(result.abs_residual - abs_res), 1e-3 * abs_res + rounding)
        np.testing.assert_array_less(np.abs(result.rel_residual - rel_res), 1e-3 * rel_res + rounding / fz_norm)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_abs_stop_mode(name):
    a, c, z_star = _affine_problem(jax.random.PRNGKey(1), 4, 8, 0.5)
    result = solvers.get(name)(lambda z: z @ a + c, jnp.zeros((4, 8)), max_steps=60, tol=1e-5, stop_mode="abs")
    assert bool(jnp.all(result.abs_residual < 1e-5))
    np.testing.assert_allclose(result.z, z_star, atol=1e-4)


def test_broyden_converges_where_iteration_diverges():
    # A linear map with spectral radius 1.5: iteration blows up, the fixed point exists.
    dim = 8
    ka, kc = jax.random.split(jax.random.PRNGKey(2))
    a = jax.random.normal(ka, (dim, dim))
    a = 1.5 * a / jnp.max(jnp.abs(jnp.linalg.eigvals(a)))
    c = jax.random.normal(kc, (4, dim))
    z_star = jnp.linalg.solve((jnp.eye(dim) - a).T, c.T).T

    def f(z):
        return z @ a + c

    plain = solvers.fixed_point_iteration(f, jnp.zeros((4, dim)), max_steps=50, tol=1e-6)
    assert not bool(jnp.any(plain.converged))
    assert bool(jnp.all(plain.abs_trace[-1] > 100 * plain.abs_trace[0]))  # diverging
    result = solvers.broyden(f, jnp.zeros((4, dim)), max_steps=50, tol=1e-6, memory=2 * dim)
    assert bool(jnp.all(result.converged)), result.rel_residual
    np.testing.assert_allclose(result.z, z_star, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_per_example_stopping(name):
    # Example 0 is easy (contraction 0.05), example 1 hard (0.95).
    dim = 12
    a, c, _ = _affine_problem(jax.random.PRNGKey(3), 2, dim, 1.0)
    scale = jnp.array([0.05, 0.95])[:, None]

    def f(z):
        return scale * (z @ a) + c

    # The reversible iteration's relaxation sets its pace on easy maps: 1.2 over-relaxes.
    options = {"beta": 1.2} if name == "reversible" else {}
    result = solvers.get(name)(f, jnp.zeros((2, dim)), max_steps=200, tol=1e-6, **options)
    assert bool(jnp.all(result.converged))
    easy, hard = int(result.n_steps[0]), int(result.n_steps[1])
    assert easy < hard / 2, (easy, hard)
    # After converging, the easy example's iterate no longer changes: same residual.
    ran = int(np.max(np.nonzero(~np.isnan(result.abs_trace[:, 1]))))  # the loop's last step
    after = result.abs_trace[easy : ran + 1, 0]
    np.testing.assert_array_equal(after, jnp.full_like(after, after[0]))
    # Examples are independent: the easy one alone gives the same answer.
    alone = solvers.get(name)(lambda z: 0.05 * (z @ a) + c[:1], jnp.zeros((1, dim)), max_steps=200, tol=1e-6,
                              **options)
    assert int(alone.n_steps[0]) == easy
    np.testing.assert_allclose(alone.z[0], result.z[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,memory", [("broyden", 3), ("anderson", 2), ("anderson", 3)])
def test_memory_smaller_than_max_steps(name, memory):
    a, c, z_star = _affine_problem(jax.random.PRNGKey(4), 5, 24, 0.9)
    result = solvers.get(name)(lambda z: z @ a + c, jnp.zeros((5, 24)), max_steps=150, tol=1e-6, memory=memory)
    assert int(result.f_evals) > memory + 1  # the ring buffer wrapped around
    assert bool(jnp.all(result.converged))
    np.testing.assert_allclose(result.z, z_star, atol=1e-4)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_nonfinite_values_are_flagged_and_never_returned(name):
    a, c, _ = _affine_problem(jax.random.PRNGKey(5), 3, 8, 0.5)
    c = c.at[1].multiply(100.0)  # example 1 moves far from 0 ...
    bad = jnp.array([False, True, False])

    def f(z):
        # ... and f is NaN there once ||z|| > 10.
        poisoned = bad[:, None] & (jnp.linalg.norm(z, axis=1, keepdims=True) > 10.0)
        return jnp.where(poisoned, jnp.nan, z @ a + c)

    result = solvers.get(name)(f, jnp.zeros((3, 8)), max_steps=50, tol=1e-5)
    assert bool(jnp.all(jnp.isfinite(result.z)))
    np.testing.assert_array_equal(result.nonfinite, bad)
    np.testing.assert_array_equal(result.converged, ~bad)
    assert bool(jnp.all(jnp.isfinite(result.abs_residual)))


@pytest.mark.parametrize("early_exit", [True, False])
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_an_example_that_met_nan_leaves_the_others_alone(name, early_exit):
    """Ordinary solves keep a failed example's non-finite z in the loop (its own rows only):
    every other example's solve is exactly the solve without it, also when the loop goes on
    evaluating f on the failed example (``early_exit=False``)."""
    a, c, _ = _affine_problem(jax.random.PRNGKey(5), 3, 8, 0.5)
    c = c.at[1].multiply(100.0)
    bad = jnp.array([False, True, False])

    def solve(rows):  # the examples `rows`; f is NaN for example 1 once ||z|| > 10
        def f(z):
            poisoned = bad[rows, None] & (jnp.linalg.norm(z, axis=1, keepdims=True) > 10.0)
            return jnp.where(poisoned, jnp.nan, z @ a + c[rows])

        return solvers.get(name)(f, jnp.zeros((len(rows), 8)), max_steps=40, tol=1e-5, early_exit=early_exit)

    both, alone = solve(np.array([0, 1, 2])), solve(np.array([0, 2]))
    assert bool(both.nonfinite[1]) and not bool(jnp.any(alone.nonfinite))
    np.testing.assert_allclose(both.z[::2], alone.z, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(both.n_steps[::2], alone.n_steps)
    np.testing.assert_allclose(both.abs_trace[:, ::2], alone.abs_trace, rtol=1e-5, atol=1e-7)


def _solve_loop(name, causal):
    """The one ``while`` equation in the jaxpr of a 5-step solve of a tanh cell (batch 3,
    width 8; causal: 4 positions along axis 1)."""
    a, _, _ = _affine_problem(jax.random.PRNGKey(2), 3, 8, 0.5)
    solve = functools.partial(solvers.get(name), lambda z: jnp.tanh(z @ a + 0.5), max_steps=5,
                              causal_axis=1 if causal else None)
    jaxpr = jax.make_jaxpr(solve)(jnp.zeros((3, 4, 8) if causal else (3, 8))).jaxpr
    (loop,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "while"]
    return loop


def _moved_carries(loop) -> list:
    """``(from, to)`` positions of a while loop's carry whose body passes the input at one
    position straight on to another (a move, which XLA's CPU copy insertion pays with a
    copy of the array every step)."""
    body = loop.params["body_jaxpr"].jaxpr
    carry_in = body.invars[loop.params["body_nconsts"]:]
    position = {id(v): i for i, v in enumerate(carry_in)}
    return [(position[id(v)], j) for j, v in enumerate(body.outvars)
            if id(v) in position and position[id(v)] != j]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_no_solver_moves_a_loop_carry_to_another_slot(name, causal):
    """Broyden needs the previous z and g: it keeps them in two-slot rings, written before
    they are read, not in a ``z_prev`` slot that receives the loop's z every step (on XLA's
    CPU backend that move cost two to five copies of z-sized arrays a step, 2 MB each on
    the conv benchmark cell)."""
    assert _moved_carries(_solve_loop(name, causal)) == []


def test_nonfinite_at_start():
    def f(z):
        return jnp.where(jnp.arange(2)[:, None] == 0, jnp.inf, 0.5 * z + 1.0)

    result = solvers.broyden(f, jnp.zeros((2, 3)), max_steps=20, tol=1e-5)
    np.testing.assert_array_equal(result.nonfinite, [True, False])
    np.testing.assert_array_equal(result.converged, [False, True])
    np.testing.assert_array_equal(result.z[0], jnp.zeros(3))  # z0, finite
    np.testing.assert_allclose(result.z[1], 2.0 * jnp.ones(3), atol=1e-4)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_pytree_state(name):
    a, c, z_star = _affine_problem(jax.random.PRNGKey(6), 3, 10, 0.6)

    def f(z):
        flat = jnp.concatenate([z["u"], z["v"].reshape(3, -1)], axis=1) @ a + c
        return {"u": flat[:, :4], "v": flat[:, 4:].reshape(3, 3, 2)}

    z0 = {"u": jnp.zeros((3, 4)), "v": jnp.zeros((3, 3, 2))}
    result = solvers.get(name)(f, z0, max_steps=60, tol=1e-6)
    chex.assert_trees_all_equal_shapes(result.z, z0)
    np.testing.assert_allclose(result.z["u"], z_star[:, :4], atol=1e-4)
    np.testing.assert_allclose(result.z["v"].reshape(3, -1), z_star[:, 4:], atol=1e-4)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_bfloat16_f_keeps_float32_bookkeeping(name):
    a, c, z_star = _affine_problem(jax.random.PRNGKey(7), 4, 16, 0.5)

    def f(z):
        assert z.dtype == jnp.bfloat16  # f always sees its own dtype
        return z @ a.astype(jnp.bfloat16) + c.astype(jnp.bfloat16)

    result = solvers.get(name)(f, jnp.zeros((4, 16), jnp.bfloat16), max_steps=40, tol=2e-2)
    assert result.z.dtype == jnp.bfloat16
    assert result.rel_residual.dtype == jnp.float32
    assert bool(jnp.all(result.converged))
    np.testing.assert_allclose(result.z.astype(jnp.float32), z_star, atol=0.1)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_vmap_matches_separate_solves(name):
    keys = jax.random.split(jax.random.PRNGKey(8), 3)
    problems = [_affine_problem(k, 2, 6, 0.6) for k in keys]
    a = jnp.stack([p[0] for p in problems])
    c = jnp.stack([p[1] for p in problems])

    def solve(a, c):
        return solvers.get(name)(lambda z: z @ a + c, jnp.zeros((2, 6)), max_steps=40, tol=1e-6)

    batched = jax.jit(jax.vmap(solve))(a, c)
    for i, (_, _, z_star) in enumerate(problems):
        np.testing.assert_allclose(batched.z[i], z_star, atol=1e-4)
        single = solve(a[i], c[i])
        np.testing.assert_array_equal(batched.n_steps[i], single.n_steps)


def test_traces_hold_nan_after_the_loop_ends():
    result = solvers.fixed_point_iteration(lambda z: 0.1 * z + 1.0, jnp.zeros((2, 3)), max_steps=30, tol=1e-4)
    n = int(result.f_evals)
    assert n < 31
    assert bool(jnp.all(jnp.isfinite(result.rel_trace[:n])))
    assert bool(jnp.all(jnp.isnan(result.rel_trace[n:])))
    # Plain iteration on a 0.1-contraction: each step shrinks the residual tenfold.
    np.testing.assert_allclose(result.abs_trace[1:n, 0] / result.abs_trace[: n - 1, 0], 0.1, rtol=1e-2)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_bad_input_gives_clear_errors(name):
    solve = solvers.get(name)
    f = lambda z: 0.5 * z  # noqa: E731
    z0 = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="same structure and shapes"):
        solve(lambda z: z[:, :2], z0)
    with pytest.raises(ValueError, match="max_steps"):
        solve(f, z0, max_steps=0)
    with pytest.raises(ValueError, match="tol"):
        solve(f, z0, tol=0.0)
    with pytest.raises(ValueError, match="stop_mode"):
        solve(f, z0, stop_mode="max")
    with pytest.raises(ValueError, match="leading batch axis"):
        solve(f, jnp.zeros(()))
    with pytest.raises(TypeError, match="floating-point"):
        solve(f, jnp.zeros((2, 3), jnp.int32))


def test_unknown_solver_name():
    with pytest.raises(ValueError, match="unknown solver 'newton'.*broyden"):
        solvers.get("newton")


def test_solver_specific_arguments_are_checked():
    f, z0 = (lambda z: 0.5 * z), jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="memory"):
        solvers.broyden(f, z0, memory=0)
    with pytest.raises(ValueError, match="mixing"):
        solvers.anderson(f, z0, mixing=0.0)
    with pytest.raises(ValueError, match="damping"):
        solvers.fixed_point_iteration(f, z0, damping=1.0)


def test_anderson_survives_a_singular_system():
    # f constant: all residuals after the first step are zero, G G^T is all zeros.
    result = solvers.anderson(lambda z: jnp.ones_like(z), jnp.zeros((2, 4)), max_steps=10, tol=1e-6, regularization=0.0)
    assert bool(jnp.all(result.converged))
    np.testing.assert_allclose(result.z, 1.0)
    # A rank-deficient history: an exactly linear 1-D problem embedded in 4-D.
    result = solvers.anderson(lambda z: 0.5 * z + 1.0, jnp.zeros((2, 4)), max_steps=30, tol=1e-6, regularization=0.0)
    assert bool(jnp.all(result.converged)) and not bool(jnp.any(result.nonfinite))
    np.testing.assert_allclose(result.z, 2.0, atol=1e-5)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_traced_step_limit_equals_static_max_steps(name):
    a, c, _ = _affine_problem(jax.random.PRNGKey(4), 3, 8, 0.9)
    solve = solvers.get(name)
    limited = jax.jit(lambda lim: solve(lambda z: z @ a + c, jnp.zeros((3, 8)), max_steps=20, tol=1e-9, step_limit=lim))
    for lim in (1, 4, 7):
        static = solve(lambda z: z @ a + c, jnp.zeros((3, 8)), max_steps=lim, tol=1e-9)
        traced = limited(lim)
        np.testing.assert_array_equal(traced.n_steps, static.n_steps)
        np.testing.assert_allclose(traced.z, static.z, rtol=1e-5, atol=1e-6)
        assert int(traced.f_evals) == f_evals(name, lim)
    # Limits above max_steps are clipped to it.
    assert int(limited(50).f_evals) == f_evals(name, 20)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_without_early_exit_the_result_is_the_same_after_max_steps_steps(name, causal):
    """early_exit=False runs all max_steps steps in a loop whose trip count XLA knows
    (no predicate for a GPU to copy to the host), and returns what the early-exit loop
    returns: examples that converge early, one that does not converge and one that meets
    NaN; with and without a (traced) step limit. Only f_evals differs: max_steps + 1."""
    a, c, _ = _affine_problem(jax.random.PRNGKey(5), 4, 8, 1.0)
    rate = jnp.array([0.2, 0.6, 0.99, 0.6])[:, None]  # fast, slower, not within the limit, NaN
    shape = (4, 3, 8) if causal else (4, 8)

    def f(z):
        mixed = (jnp.cumsum(z, axis=1) / 3.0) @ a if causal else z @ a
        out = jnp.tanh(rate.reshape((4,) + (1,) * (z.ndim - 1)) * mixed + (c[:, None] if causal else c))
        blows_up = (jnp.arange(4) == 3).reshape((4,) + (1,) * (z.ndim - 1)) & (jnp.abs(z) > 0.3)
        return jnp.where(blows_up, jnp.nan, out)

    def solve(early_exit, step_limit=None):
        return jax.jit(lambda z0, lim: solvers.get(name)(
            f, z0, max_steps=25, tol=1e-5, step_limit=lim, causal_axis=1 if causal else None, early_exit=early_exit,
        ))(jnp.zeros(shape), step_limit)

    for limit in (None, 4):
        early, fixed = solve(True, limit), solve(False, limit)
        assert int(fixed.f_evals) == f_evals(name, 25) and int(early.f_evals) <= f_evals(name, limit or 25)
        np.testing.assert_array_equal(fixed.n_steps, early.n_steps)
        np.testing.assert_array_equal(fixed.converged, early.converged)
        np.testing.assert_array_equal(fixed.nonfinite, early.nonfinite)
        for got, want in ((fixed.z, early.z), (fixed.abs_residual, early.abs_residual),
                          (fixed.rel_residual, early.rel_residual), (fixed.rel_trace, early.rel_trace)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # NaN rows in the same places
    assert bool(early.nonfinite[3]) and not bool(early.converged[2])
    early = solve(True)
    assert bool(early.converged[0] & early.converged[1]) and int(jnp.max(early.n_steps[:2])) < 25  # stopped early
    hlo = jax.jit(lambda z0: solvers.get(name)(f, z0, max_steps=25, early_exit=False)).lower(
        jnp.zeros(shape)).compile().as_text()
    assert '"known_trip_count":{"n":"25"}' in hlo
    with pytest.raises(ValueError, match="early_exit"):
        solvers.get(name)(f, jnp.zeros(shape), early_exit="no")


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_solver_keeps_its_dtypes_under_x64(name, dtype):
    """With jax_enable_x64 on, float32 or bfloat16 state must not be promoted to float64
    inside the loop (Anderson's identity matrix once was, and the while loop refused it)."""
    with jax.enable_x64(True):
        a, c, z_star = _affine_problem(jax.random.PRNGKey(9), 3, 8, 0.5)
        a, c = a.astype(dtype), c.astype(dtype)
        result = jax.jit(lambda z0: solvers.get(name)(lambda z: z @ a + c, z0, max_steps=40, tol=2e-2))(
            jnp.zeros((3, 8), dtype)
        )
        assert result.z.dtype == dtype
        assert bool(jnp.all(result.converged))
        np.testing.assert_allclose(np.asarray(result.z, np.float32), np.asarray(z_star, np.float32), atol=0.1)


def _reference_broyden(f, z0, steps, memory):
    """Textbook limited-memory good Broyden in float64 numpy, one example at a time
    (``f(z, b)`` maps example b's ``[D]`` vector): the explicit inverse-Jacobian estimate H
    rebuilt from H = -I with the rank-one corrections H += (s - H y) s^T H / (s^T H y) of
    the last ``memory`` secant pairs; z <- z - H g. Returns ``||g||`` of z0 and of every
    iterate, ``[steps + 1, B]``."""
    norms = []
    for b, z in enumerate(np.asarray(z0, np.float64)):
        g = f(z, b) - z
        pairs, trace = [], [np.linalg.norm(g)]
        h = -np.eye(z.size)
        for _ in range(steps):
            z_next = z - h @ g
            g_next = f(z_next, b) - z_next
            pairs = (pairs + [(z_next - z, g_next - g)])[-memory:]
            z, g = z_next, g_next
            h = -np.eye(z.size)
            for s, y in pairs:
                h = h + np.outer(s - h @ y, s @ h) / (s @ h @ y)
            trace.append(np.linalg.norm(g))
        norms.append(trace)
    return np.array(norms).T


@pytest.mark.parametrize("causal", [False, True])
def test_broyden_is_good_broyden_on_its_last_pairs(causal):
    """Every iterate equals the textbook method's (float64), also long after the memory of
    3 pairs wrapped; in causal mode with one position it is the same method."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        a = rng.normal(size=(6, 6))
        a = 1.1 * a / np.max(np.abs(np.linalg.eigvals(a)))  # plain iteration diverges
        c = rng.normal(size=(2, 6))

        def f_np(z, b):
            return np.tanh(z @ a + c[b])

        ref = _reference_broyden(f_np, np.zeros((2, 6)), 14, 3)
        a_j, c_j = jnp.asarray(a), jnp.asarray(c)
        if causal:
            result = solvers.broyden(
                lambda z: jnp.tanh(z @ a_j + c_j[:, None]), jnp.zeros((2, 1, 6)),
                max_steps=14, tol=1e-300, memory=3, causal_axis=1,
            )
        else:
            result = solvers.broyden(
                lambda z: jnp.tanh(z @ a_j + c_j), jnp.zeros((2, 6)), max_steps=14, tol=1e-300, memory=3
            )
        assert ref[-1].max() < 1e-2 * ref[0].min()  # the reference got somewhere
        np.testing.assert_allclose(result.abs_trace, ref, rtol=1e-9, atol=1e-13)


def _hard_dense(key, batch, width, seed_scale=0.25):
    """f(z) = tanh(z W + x U): W symmetric with spectral radius 1.2 and a small injection
    (U ~ 0.25 N(0, 1/width)), so tanh stays near its linear range and f is no contraction."""
    kw, ku, kx = jax.random.split(key, 3)
    w = jax.random.normal(kw, (width, width))
    w = (w + w.T) / 2
    w = 1.2 * w / jnp.max(jnp.abs(jnp.linalg.eigvalsh(w)))
    c = jax.random.normal(kx, (batch, width)) @ (seed_scale * jax.random.normal(ku, (width, width)) / jnp.sqrt(width))
    return lambda z: jnp.tanh(z @ w + c)


def test_broyden_converges_on_a_hard_map_after_its_memory_wraps():
    """Plain iteration stalls on this map; Broyden with 8 pairs must go on converging after
    its memory wraps (a ring of recursive corrections stalled here at relative residual
    1e-2 after 100 steps: each correction had been formed with pairs it had dropped)."""
    f = _hard_dense(jax.random.PRNGKey(1), 8, 64)
    z0 = jnp.zeros((8, 64))
    plain = solvers.fixed_point_iteration(f, z0, max_steps=100, tol=1e-4)
    assert float(jnp.max(plain.rel_residual)) > 1e-2
    result = jax.jit(lambda z0: solvers.broyden(f, z0, max_steps=60, tol=1e-4, memory=8))(z0)
    assert int(jnp.max(result.n_steps)) > 8  # the memory wrapped
    _, rel = solvers.residual_norms(result.z, f(result.z))
    assert float(jnp.max(rel)) < 1e-4, rel


def test_broyden_restarts_only_the_example_whose_update_overflows():
    """Example 0's small inverse overflowed, so its update is not finite: it restarts (its
    pairs dropped, a plain f step g taken) and then goes on exactly as a Broyden started
    afresh at that point, although its buffers still hold its old (finite) pairs; example
    1's step is exactly what it is without example 0 in the batch."""
    broyden_lib = importlib.import_module("deq_jax.solvers.broyden")  # the module, not the function
    method = broyden_lib._method(memory=3)
    keys = jax.random.split(jax.random.PRNGKey(10), 7)
    c = jax.random.normal(keys[0], (2, 5))
    f = lambda z: jnp.tanh(z) + c  # noqa: E731
    z = jax.random.normal(keys[1], (2, 5))
    state = method.init(z, f(z))
    z = z + 0.1  # as the loop's first step from z0 would
    for _ in range(4):  # four steps fill the memory
        z, state = method.step(state, z, f(z))
    assert bool(jnp.all(state.valid))
    state = state._replace(inv=state.inv.at[0].set(3e38))
    z_next, new = method.step(state, z, f(z))
    assert bool(jnp.all(jnp.isfinite(z_next)))
    np.testing.assert_array_equal(z_next[0], f(z)[0])  # z + g: a plain f step
    assert not bool(jnp.any(new.valid[0])) and bool(jnp.all(new.valid[1]))
    assert bool(jnp.all(jnp.isfinite(new.s))) and bool(jnp.all(jnp.isfinite(new.a)))
    assert float(jnp.max(jnp.abs(new.a[0]))) > 0  # the old pairs are still there
    alone = jax.tree.map(lambda leaf: leaf[1:] if jnp.ndim(leaf) else leaf, state)
    z_alone, new_alone = method.step(alone, z[1:], f(z)[1:])
    np.testing.assert_array_equal(z_next[1:], z_alone)
    np.testing.assert_array_equal(new.a[1:], new_alone.a)
    f0 = lambda z: jnp.tanh(z) + c[:1]  # noqa: E731  (example 0's f)
    fresh, z_fresh = method.init(z[:1], f0(z[:1])), z_next[:1]
    for _ in range(3):
        z_next, new = method.step(new, z_next, f(z_next))
        z_fresh, fresh = method.step(fresh, z_fresh, f0(z_fresh))
        np.testing.assert_allclose(z_next[:1], z_fresh, rtol=1e-6, atol=1e-6)


def _primitives(jaxpr) -> set:
    """The names of the primitives in a (closed) jaxpr, sub-jaxprs included."""
    found = set()
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found |= _primitives(sub)
    return found


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_the_solver_loop_has_no_branch_inside(name, causal):
    """Inside the while loop there is no ``cond``: on a GPU a branch copies its predicate
    to the host and waits for it, every step; the loop's own predicate is the only one."""
    assert "cond" not in _primitives(_solve_loop(name, causal).params["body_jaxpr"].jaxpr)


def test_rel_mode_never_prefers_an_iterate_with_a_larger_absolute_residual_than_z0():
    """Plain iteration of f(z) = 2z + c diverges from z0 = 0: z_k = (2^k - 1) c. Every
    iterate's relative residual (2^k / (2^(k+1) - 1) -> 1/2) is below z0's (exactly 1),
    but its absolute residual 2^k ||c|| is above z0's ||c||: z0 stays the best. An iterate
    that meets tol is taken even so (tol 0.6: z_2 = 3c, relative residual 4/7)."""
    c = jnp.array([[1.0, -2.0, 0.5]])
    f = lambda z: 2.0 * z + c  # noqa: E731
    result = solvers.fixed_point_iteration(f, jnp.zeros((1, 3)), max_steps=10, tol=1e-6)
    assert int(result.n_steps[0]) == 0 and not bool(result.converged[0])
    np.testing.assert_array_equal(result.z, 0.0)
    np.testing.assert_allclose(result.abs_residual, jnp.linalg.norm(c), rtol=1e-6)
    loose = solvers.fixed_point_iteration(f, jnp.zeros((1, 3)), max_steps=10, tol=0.6)
    assert int(loose.n_steps[0]) == 2 and bool(loose.converged[0])
    np.testing.assert_allclose(loose.z, 3.0 * c, rtol=1e-6)
    np.testing.assert_allclose(loose.rel_residual, 4.0 / 7.0, rtol=1e-5)


def _dot_precisions(jaxpr) -> set:
    """The ``precision`` of every dot_general in a (closed) jaxpr, sub-jaxprs included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.add(eqn.params["precision"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found |= _dot_precisions(sub)
    return found


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_precision_option_sets_the_precision_of_f_inside_the_loop(name):
    """Under a low global default (bfloat16 passes, as TF32 is on GPUs), ``precision=
    "highest"`` makes f's matmul inside the while loop full float32; without it f keeps the
    global default. The solvers' own products are float32 in both."""
    a, c, _ = _affine_problem(jax.random.PRNGKey(2), 3, 8, 0.5)
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    low = (jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT)

    def precisions(precision):
        solve = lambda z0: solvers.get(name)(lambda z: z @ a + c, z0, max_steps=5, precision=precision)  # noqa: E731
        with jax.default_matmul_precision("bfloat16"):
            return _dot_precisions(jax.make_jaxpr(solve)(jnp.zeros((3, 8))).jaxpr)

    assert precisions("highest") == {highest}
    # The iterations (plain, reversible) take no products of their own.
    assert precisions(None) == ({low} if name in ("fixed_point_iteration", "reversible") else {highest, low})
    with pytest.raises(ValueError, match="precision must be one of"):
        solvers.get(name)(lambda z: z, jnp.zeros((1, 2)), precision="fp32")
