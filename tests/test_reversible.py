"""Reversible DEQs (deq_jax.Reversible): the reverse pass's gradient is the exact gradient of
the coupled iteration, at a memory that does not grow with the number of steps."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq_jax
from deq_jax.train import objective
from deq_jax.train.config import resolve


def _cell(params, x, z):
    return jnp.tanh(z @ params["w"] + x * params["scale"])


def _problem(batch=4, dim=6, dtype=jnp.float64):
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w": (0.8 * jax.random.normal(k1, (dim, dim)) / np.sqrt(dim)).astype(dtype),
              "scale": jnp.linspace(0.5, 1.5, batch)[:, None].astype(dtype)}
    x = jax.random.normal(k2, (batch, dim)).astype(dtype)
    return params, x


def _unrolled(params, x, z0, beta, steps):
    """The coupled iteration written out, each example for its own number of steps; plain
    backpropagation through it is the truth."""
    outs = []
    for b, n in enumerate(steps):
        p = {"w": params["w"], "scale": params["scale"][b:b + 1]}
        y = z = z0[b:b + 1]
        for _ in range(int(n)):
            y = (1 - beta) * y + beta * _cell(p, x[b:b + 1], z)
            z = (1 - beta) * z + beta * _cell(p, x[b:b + 1], y)
        outs.append(z)
    return jnp.concatenate(outs)


@pytest.mark.parametrize("beta", [0.5, 0.8, 1.2])
def test_the_gradient_is_backpropagation_through_the_same_coupled_iteration_in_float64(beta):
    """To 1e-10 in float64, with examples stopping after different numbers of steps (tol met
    per example, 5-16 steps), for the parameters, the input and z0. (Rebuilding a step
    amplifies rounding: 1.7x a step at beta 0.5, 4.6x at 0.8 and 2.5x at 1.2 on this map, so
    past ~30 steps even float64 loses digits; docs/guides/reversible.md has the table.)"""
    with jax.enable_x64(True):
        params, x = _problem()
        z0 = 0.1 * jnp.ones_like(x)
        target = jnp.linspace(-1.0, 1.0, x.shape[1])
        # Limits within what float64 reverses (|1 - beta|^(-2n) eps_64 <= 1e-3; more warns).
        forward = deq_jax.SolverConfig("reversible", max_steps=20 if beta == 0.5 else 8, tol=1e-3,
                                       options={"beta": beta})
        _, result = deq_jax.fixed_point(_cell, params, x, z0, forward=forward, backward=deq_jax.Reversible())
        steps = np.asarray(result.n_steps)
        assert len(set(steps.tolist())) > 1 and steps.max() < forward.max_steps, steps  # each stops on its own

        def loss(solve):
            return lambda p, xx, zz: jnp.sum((solve(p, xx, zz) - target) ** 2 * jnp.arange(1, 7))

        reversible = loss(lambda p, xx, zz: deq_jax.fixed_point(
            _cell, p, xx, zz, forward=forward, backward=deq_jax.Reversible())[0])
        truth = loss(lambda p, xx, zz: _unrolled(p, xx, zz, beta, steps))
        np.testing.assert_allclose(reversible(params, x, z0), truth(params, x, z0), rtol=1e-12)
        got = jax.grad(reversible, argnums=(0, 1, 2))(params, x, z0)
        want = jax.grad(truth, argnums=(0, 1, 2))(params, x, z0)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


def _compiled_temp_bytes(grad_fn, *args) -> int:
    return jax.jit(grad_fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.filterwarnings("ignore:the reversible gradient")  # 100 steps: beyond what float32 reverses
def test_the_gradients_memory_does_not_grow_with_the_number_of_steps():
    """XLA's memory analysis of the compiled gradient: at 10 and at 100 steps the reversible
    gradient needs the same temporary memory but for the residual traces ([steps + 1, B]
    floats, two of them); backpropagation through the unrolled iteration stores every step."""
    batch, dim = 8, 512
    params, x = _problem(batch, dim, jnp.float32)
    z0 = jnp.zeros_like(x)

    def reversible(steps):
        forward = deq_jax.SolverConfig("reversible", max_steps=steps, tol=1e-30, options={"beta": 0.5})
        return lambda p: jnp.sum(deq_jax.fixed_point(_cell, p, x, z0, forward=forward,
                                                     backward=deq_jax.Reversible())[0])

    def unrolled(steps):
        def loss(p):
            def step(carry, _):
                y, z = carry
                y = 0.5 * y + 0.5 * _cell(p, x, z)
                return (y, 0.5 * z + 0.5 * _cell(p, x, y)), None

            (_, z), _ = jax.lax.scan(step, (z0, z0), None, length=steps)
            return jnp.sum(z)
        return loss

    rev = [_compiled_temp_bytes(jax.grad(reversible(n)), params) for n in (10, 100)]
    unr = [_compiled_temp_bytes(jax.grad(unrolled(n)), params) for n in (10, 100)]
    traces = 2 * 90 * batch * 4  # the two residual traces grow by 90 rows of B float32
    assert rev[1] - rev[0] <= traces, rev
    state = batch * dim * 4
    assert unr[1] - unr[0] >= 90 * state, unr  # at least one state per step (it keeps ~4)


def test_float32_rounding_of_the_reverse_pass_stays_small_for_the_documented_range():
    """float32 against float64, beta 0.5, 6 steps of a contraction (within the range where the
    reversal holds, no warning): the gradient agrees to 1e-3 relative."""
    def grads(dtype):
        params, x = _problem(4, 16, dtype)
        forward = deq_jax.SolverConfig("reversible", max_steps=6, tol=1e-30, options={"beta": 0.5})
        loss = lambda p: jnp.sum(deq_jax.fixed_point(  # noqa: E731
            _cell, p, x, jnp.zeros_like(x), forward=forward, backward=deq_jax.Reversible())[0] ** 2)
        return jax.grad(loss)(params)["w"]

    with jax.enable_x64(True):
        exact = grads(jnp.float64)
        rounded = grads(jnp.float32)
        np.testing.assert_allclose(rounded, exact, rtol=0, atol=1e-3 * float(jnp.abs(exact).max()))


def test_the_reversible_gradient_needs_the_reversible_solver():
    params, x = _problem(2, 3, jnp.float32)
    with pytest.raises(ValueError, match="reverses the reversible solver"):
        deq_jax.fixed_point(_cell, params, x, jnp.zeros_like(x), backward=deq_jax.Reversible())
    for beta in (1.0, 0.0, 2.0, "a"):
        with pytest.raises(ValueError, match="beta must be in"):
            deq_jax.solvers.reversible(jnp.cos, jnp.zeros((2, 3)), beta=beta)


def test_the_backward_probe_reports_the_reversed_steps():
    params, x = _problem(4, 6, jnp.float32)
    forward = deq_jax.SolverConfig("reversible", max_steps=6, tol=1e-1, options={"beta": 0.5})

    def loss(p, probe):
        z, result = deq_jax.fixed_point(_cell, p, x, jnp.zeros_like(x), forward=forward,
                                        backward=deq_jax.Reversible(), probe=probe)
        return jnp.sum(z), result

    (_, result), (_, stats) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        params, deq_jax.BackwardStats.zeros(4))
    np.testing.assert_array_equal(stats.n_steps, result.n_steps)
    assert float(stats.vjp_evals[0]) == 2 * int(result.n_steps.max())
    assert len(set(np.asarray(result.n_steps).tolist())) > 1  # examples stop on their own
    # The residuals are the rebuilt z0's error: below REVERSAL_TOL here (few steps), growing
    # with the steps reversed (rounding amplified at each).
    assert float(stats.rel_residual.max()) < deq_jax.deq.REVERSAL_TOL and bool(jnp.all(stats.converged == 1))
    order = np.argsort(np.asarray(result.n_steps))
    assert np.all(np.diff(np.asarray(stats.rel_residual)[order]) > 0)


def test_the_probe_flags_a_reversal_that_rounding_has_broken():
    """float32, beta 0.8, 40 steps: the rebuilt z0 is far off, and the probe says so."""
    params, x = _problem(4, 16, jnp.float32)
    forward = deq_jax.SolverConfig("reversible", max_steps=40, tol=1e-30, options={"beta": 0.8})

    def loss(p, probe):
        return jnp.sum(deq_jax.fixed_point(_cell, p, x, jnp.zeros_like(x), forward=forward,
                                           backward=deq_jax.Reversible(), probe=probe)[0])

    with pytest.warns(UserWarning, match="may not be exact"):
        stats = jax.grad(loss, argnums=1)(params, deq_jax.BackwardStats.zeros(4))
    assert float(stats.rel_residual.min()) > deq_jax.deq.REVERSAL_TOL and not bool(jnp.any(stats.converged == 1))


class LinenCell(nn.Module):
    @nn.compact
    def __call__(self, x, z):
        return jnp.tanh(nn.Dense(z.shape[-1])(z) + x)


class NNXCell(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(6, 6, rngs=rngs)

    def __call__(self, x, z):
        return jnp.tanh(self.linear(z) + x)


class LayersTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_the_linen_and_nnx_layers_accept_the_reversible_mode(self):
        """Their gradient equals the pure function's (the same map, the same reverse pass)."""
        forward = deq_jax.SolverConfig("reversible", max_steps=6, tol=1e-5, options={"beta": 0.5})
        x = jnp.linspace(-1, 1, 24).reshape(4, 6)
        layer = deq_jax.linen.DEQ(LinenCell(), forward=forward, backward=deq_jax.Reversible())
        variables = layer.init(jax.random.key(0), x)

        def linen_loss(v):
            return jnp.sum(layer.apply(v, x)[0] ** 2)

        def pure_loss(cell_params):
            f = lambda p, xx, z: LinenCell().apply({"params": p}, xx, z)  # noqa: E731
            return jnp.sum(deq_jax.fixed_point(f, cell_params, x, jnp.zeros_like(x), forward=forward,
                                               backward=deq_jax.Reversible())[0] ** 2)

        got = self.variant(jax.grad(linen_loss))(variables)["params"]["cell"]
        want = jax.grad(pure_loss)(variables["params"]["cell"])
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)

        model = deq_jax.nnx.DEQ(NNXCell(nnx.Rngs(0)), forward=forward, backward=deq_jax.Reversible())
        grads = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(model)
        assert float(jnp.abs(grads.cell.linear.kernel.get_value()).max()) > 0


def test_the_training_config_selects_the_reversible_mode_and_checks_it():
    c = resolve({"forward": {"solver": "reversible", "beta": 0.8}, "backward": {"mode": "reversible"}})
    setup = objective.solvers_from_config(c)
    assert setup.backward == deq_jax.Reversible()
    assert setup.forward.name == "reversible" and dict(setup.forward.options)["beta"] == 0.8
    assert dict(setup.eval_forward.options)["beta"] == 0.8
    with pytest.raises(ValueError, match="backward.mode 'reversible' needs forward.solver 'reversible'"):
        resolve({"backward": {"mode": "reversible"}})
    with pytest.raises(ValueError, match="forward.beta"):
        resolve({"forward": {"solver": "reversible", "beta": 1.0}, "backward": {"mode": "reversible"}})


def test_the_mdeq_cell_from_zeros_gets_the_exact_gradient():
    """The MDEQ cell (GroupNorm, ReLU) from z0 = 0 in float64: at zeros its ReLUs sit exactly
    on their kink, so the first step is linearized at the true z0, not at its rebuilt copy
    (off by rounding: the backward pass evaluates f in another compiled program, and a
    derivative flipped there was off by 1e-4 relative)."""
    from deq_jax import data
    from deq_jax.models import MDEQ

    with jax.enable_x64(True):
        model = MDEQ("digits")
        images = jnp.asarray(data.train_batch(data.load_digits(), 0, 1, seed=0)[0], jnp.float64)
        variables = model.init(jax.random.key(0), images, unroll=1)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), variables["params"])
        x = model.apply({"params": params}, images, method="inject")
        z0 = model.apply({"params": params}, x, method="initial_state")
        f = lambda p, xx, z: model.apply({"params": p}, xx, z, method="cell")  # noqa: E731
        beta, steps = 0.5, 2
        forward = deq_jax.SolverConfig("reversible", max_steps=steps, tol=1e-30, options={"beta": beta})

        def reversible(p):
            z, _ = deq_jax.fixed_point(f, p, x, z0, forward=forward, backward=deq_jax.Reversible())
            return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(z))

        def unrolled(p):
            y = z = z0
            for _ in range(steps):
                y = jax.tree.map(lambda a, b: (1 - beta) * a + beta * b, y, f(p, x, z))
                z = jax.tree.map(lambda a, b: (1 - beta) * a + beta * b, z, f(p, x, y))
            return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(z))

        got, want = jax.grad(reversible)(params), jax.grad(unrolled)(params)
        flat = lambda g: jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(g)])  # noqa: E731
        assert float(jnp.linalg.norm(flat(got) - flat(want)) / jnp.linalg.norm(flat(want))) < 1e-10


def test_a_step_count_beyond_what_float32_can_reverse_is_warned_about():
    """beta 0.5: |1 - beta|^(-2n) eps_32 exceeds 1e-3 from 7 steps on; float64 holds there."""
    params, x = _problem(2, 3, jnp.float32)

    def solve(steps, dtype=jnp.float32):
        forward = deq_jax.SolverConfig("reversible", max_steps=steps, options={"beta": 0.5})
        return deq_jax.fixed_point(_cell, jax.tree.map(lambda a: a.astype(dtype), params), x.astype(dtype),
                                   jnp.zeros(x.shape, dtype), forward=forward, backward=deq_jax.Reversible())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve(6)
        with jax.enable_x64(True):
            solve(12, jnp.float64)
    with pytest.warns(UserWarning, match="It holds within 6 steps at this beta"):
        solve(7)


def test_causal_per_position_stopping_is_reversed_exactly():
    """Causal mode (positions stop per prefix): in float64 the gradient equals backprop through
    the coupled iteration in which each position makes exactly its own number of steps (taken
    from the forward pass) and a stopped position stays as it is."""
    from deq_jax.solvers.reversible import iterate

    with jax.enable_x64(True):
        batch, length, width = 2, 5, 3
        k1, k2 = jax.random.split(jax.random.key(2))
        rates = jnp.linspace(0.1, 0.9, length)[None, :, None]  # later positions contract slower
        params = {"w": 0.9 * jax.random.normal(k1, (width, width)) / np.sqrt(width)}
        x = jax.random.normal(k2, (batch, length, width))

        def f(p, xx, z):  # causal: position t reads positions <= t
            return jnp.tanh(rates * (jnp.cumsum(z, axis=1) / length) @ p["w"] + xx)

        forward = deq_jax.SolverConfig("reversible", max_steps=8, tol=1e-4, causal_axis=1, options={"beta": 1.2})
        z0 = jnp.zeros_like(x)
        _, trajectory = iterate(lambda z: f(params, x, z), z0, beta=1.2, max_steps=8, tol=1e-4, stop_mode="rel",
                                causal_axis=1)
        steps = np.asarray(trajectory.steps)  # [B, T]
        assert len(set(steps.ravel().tolist())) > 1, steps

        def unrolled(p):
            y = z = z0
            for k in range(int(steps.max())):
                active = jnp.asarray(steps > k)[..., None]
                y = jnp.where(active, -0.2 * y + 1.2 * f(p, x, z), y)
                z = jnp.where(active, -0.2 * z + 1.2 * f(p, x, y), z)
            return jnp.sum(jnp.sin(z) * jnp.arange(1, width + 1))

        def reversible(p):
            z, _ = deq_jax.fixed_point(f, p, x, z0, forward=forward, backward=deq_jax.Reversible())
            return jnp.sum(jnp.sin(z) * jnp.arange(1, width + 1))

        np.testing.assert_allclose(reversible(params), unrolled(params), rtol=1e-12)
        np.testing.assert_allclose(jax.grad(reversible)(params)["w"], jax.grad(unrolled)(params)["w"], rtol=1e-10)


def first_deq_step(data: str, overrides: dict) -> dict:
    """The metrics of the first DEQ-mode train step of a small digits or pydoc run (solver limits
    6, no random lowering) with ``overrides`` (``{group: {key: value}}``)."""
    from deq_jax.train import step as step_lib
    from deq_jax.train.optim import make_optimizer
    from deq_jax.train.tasks import make_task

    c = {"train": {"batch_size": 8, "seq_len": 16, "num_steps": 6, "pretrain_steps": 2},
         "forward": {"max_steps": 6, "random_lower": 0}, "backward": {"max_steps": 6}, "data": {"name": data}}
    if data == "pydoc":
        c["model"] = {"d_model": 32, "num_heads": 4, "d_ff": 64}
    for group, values in overrides.items():
        c.setdefault(group, {}).update(values)
    c = resolve(c)
    task = make_task(c)
    mesh = step_lib.make_mesh()
    tx, lr = make_optimizer(c)
    state = step_lib.init_state(task.model, c, tx, task.sample_input, mesh)
    train_step = step_lib.make_train_step(task.model, c, tx, lr, mesh, "deq", jr=False)
    _, metrics = train_step(state, *task.train_batch(0, None))
    assert float(metrics["skipped"]) == 0
    return {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("data", ["digits", "pydoc"])
def test_a_training_step_in_the_reversible_mode(data):
    """The MDEQ and the (causal) DEQ-Transformer train a step: finite loss and gradient, the
    backward statistics of the reversal (2 VJPs a step, the rebuilt z0's error small)."""
    metrics = first_deq_step(data, {"forward": {"solver": "reversible", "beta": 0.5, "max_steps": 4},
                                    "backward": {"mode": "reversible"}, "jr": {"gamma": 0.0}})
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert metrics["fwd_nfe"] == 9 and metrics["bwd_nfe"] == 8  # 2 f evaluations and 2 VJPs a step
    assert metrics["bwd_residual"] < deq_jax.deq.REVERSAL_TOL
