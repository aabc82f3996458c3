"""Fixed-point correction (deq_jax.Correction): the recorded iterates, the supervised states,
their weights and gradients, checked against the definition computed independently."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq_jax
from deq_jax import solvers
from deq_jax.train import objective
from deq_jax.train.config import resolve


def _problem(dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(0))
    w = (0.6 * jax.random.normal(k1, (6, 6)) / jnp.sqrt(6.0)).astype(dtype)
    x = jax.random.normal(k2, (4, 6)).astype(dtype)
    return w, x


def _f(w, x, z):
    return jnp.tanh(z @ w + x)


class TestSnapshots(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_a_snapshot_is_the_iterate_a_solve_limited_to_that_many_steps_returns(self):
        """Each snapshot k equals the solve with step_limit=k: every solver, with and without
        early exit, a step limit below the last snapshot (it then holds the final iterate), and
        a pytree state."""
        w, x = _problem()
        f = lambda z: {"a": _f(w, x, z["a"] + z["b"]), "b": 0.1 * z["b"]}  # noqa: E731
        z0 = {"a": jnp.zeros_like(x), "b": jnp.ones_like(x)}
        for name in sorted(solvers.SOLVERS):
            solve = solvers.get(name)
            for early_exit, limit in [(True, None), (False, None), (True, 5)]:
                run = self.variant(lambda z0, limit, snaps, solve=solve, early_exit=early_exit: solve(
                    f, z0, max_steps=10, tol=1e-7, early_exit=early_exit, step_limit=limit, snapshots=snaps),
                    static_argnames="snaps")
                result = run(z0, limit, snaps=(2, 3, 7))
                for k, snapshot in zip((2, 3, 7), result.snapshots, strict=True):
                    expected = solve(f, z0, max_steps=10, tol=1e-7, step_limit=k if limit is None else min(k, limit)).z
                    chex.assert_trees_all_close(snapshot, expected, atol=0, rtol=0)
                # Recording changes nothing else.
                plain = solve(f, z0, max_steps=10, tol=1e-7, early_exit=early_exit, step_limit=limit)
                chex.assert_trees_all_close(result._replace(snapshots=()), plain)


def test_snapshots_once_every_example_has_stopped_are_the_final_iterate():
    result = solvers.broyden(jnp.cos, jnp.zeros((2, 3)), max_steps=30, snapshots=(2, 20))
    assert int(result.n_steps.max()) < 20
    np.testing.assert_array_equal(result.snapshots[1], result.z)


@pytest.mark.parametrize("bad", [(3, 2), (0, 2), (2, 2), (2, 31), (1.5,), 3, (True,)])
def test_bad_snapshots_are_refused(bad):
    with pytest.raises(ValueError, match="snapshots must be increasing step counts"):
        solvers.broyden(jnp.cos, jnp.zeros((2, 3)), max_steps=30, snapshots=bad)


def test_steps_and_weights_follow_torchdeqs_definition():
    assert deq_jax.Correction(3).steps(12) == (4, 8, 12)
    assert deq_jax.Correction(3).steps(10) == (4, 7, 10)
    assert deq_jax.Correction(1).steps(12) == (12,)
    np.testing.assert_allclose(deq_jax.Correction(3, gamma=0.5).weights(), (0.25, 0.5, 1.0))
    with pytest.raises(ValueError, match="more states than the solve's 2 steps"):
        deq_jax.Correction(3).steps(2)
    for bad in [dict(n_states=0), dict(gamma=0.0), dict(gamma=1.5), dict(phantom=1)]:
        with pytest.raises(ValueError, match="Correction"):
            deq_jax.Correction(**bad)


def test_the_corrected_loss_and_its_gradient_are_the_definition():
    """In float64: L_fpc(w) = sum_i gamma^(n-1-i) L(z_i) with z_i = f(w, x, z_{k_i}) (z_{k_i}: the
    solve stopped after k_i steps, a constant) for i < n and z_n = z*, differentiated
    implicitly. The truth: each earlier term's gradient through one explicit application of f,
    and the last one's through 300 unrolled iterations of f from the converged z* (the implicit
    gradient of a converged solve)."""
    with jax.enable_x64(True):
        w, x = _problem(jnp.float64)
        z0 = jnp.zeros_like(x)
        target = jnp.linspace(-1, 1, 6)
        task = lambda z: jnp.sum((z - target) ** 2)  # noqa: E731
        forward = deq_jax.SolverConfig("broyden", max_steps=12, tol=1e-12)
        backward = deq_jax.SolverConfig("broyden", max_steps=50, tol=1e-12)
        correction = deq_jax.Correction(3, gamma=0.7)

        def corrected(w):
            _, stats = deq_jax.equilibrium(_f, w, x, z0, forward=forward, backward=backward, correction=correction)
            return correction.loss(task, stats.states)

        def definition(w):
            total = 0.0
            for k, weight in zip((4, 8), (0.49, 0.7), strict=True):
                z_k = forward.solve(lambda z: _f(w, x, z), z0, step_limit=k).z
                total += weight * task(_f(w, x, jax.lax.stop_gradient(z_k)))
            z_star = jax.lax.stop_gradient(forward.solve(lambda z: _f(w, x, z), z0).z)
            z = z_star
            for _ in range(300):  # a contraction: the unrolled gradient converges to the implicit one
                z = _f(w, x, z)
            return total + task(z)

        np.testing.assert_allclose(corrected(w), definition(w), rtol=1e-10)
        np.testing.assert_allclose(jax.grad(corrected)(w), jax.grad(definition)(w), rtol=1e-8, atol=1e-10)
        # One state is the plain loss.
        one = deq_jax.Correction(1)
        z, stats = deq_jax.equilibrium(_f, w, x, z0, forward=forward, correction=one)
        assert len(stats.states) == 1 and stats.states[0] is z


def test_the_linen_and_nnx_layers_return_the_states_to_supervise():
    from test_reversible import LinenCell, NNXCell

    x = jnp.ones((4, 6))
    correction = deq_jax.Correction(2, gamma=0.5)
    linen_layer = deq_jax.linen.DEQ(LinenCell(), correction=correction)
    variables = linen_layer.init(jax.random.key(0), x)
    nnx_layer = deq_jax.nnx.DEQ(NNXCell(nnx.Rngs(0)), correction=correction)
    for call in [lambda: linen_layer.apply(variables, x), lambda: nnx_layer(x)]:
        z, stats = call()
        assert len(stats.states) == 2 and stats.states[1] is z
        chex.assert_trees_all_equal_shapes(stats.states[0], z)
    # Without a correction there are no states; a call can ask for one.
    _, plain = deq_jax.linen.DEQ(LinenCell()).apply(variables, x)
    assert plain.states is None
    _, asked = deq_jax.linen.DEQ(LinenCell()).apply(variables, x, correction=correction)
    assert len(asked.states) == 2


def test_the_training_config_turns_it_on_and_checks_it():
    c = resolve({"correction": {"n_states": 3}})
    assert objective.solvers_from_config(c).correction == deq_jax.Correction(3, 0.8)
    assert objective.solvers_from_config(resolve({})).correction is None
    for bad in [{"n_states": 0}, {"n_states": 13}, {"gamma": 0.0}]:
        with pytest.raises(ValueError, match="correction"):
            resolve({"correction": bad})


@pytest.mark.parametrize("data", ["digits", "pydoc"])
def test_a_training_step_with_correction_reports_the_same_loss_and_takes_another_step(data):
    """The MDEQ and the DEQ-Transformer: the reported loss is z*'s (the forward pass is the
    same), the gradient is not (the earlier states add their loss)."""
    from test_reversible import first_deq_step

    outcomes = [first_deq_step(data, {"correction": {"n_states": n}}) for n in (1, 3)]
    (loss_plain, grad_plain), (loss_fpc, grad_fpc) = [(m["loss"], m["grad_norm"]) for m in outcomes]
    np.testing.assert_allclose(loss_fpc, loss_plain, rtol=1e-5)
    assert abs(grad_fpc - grad_plain) > 1e-3 * grad_plain
