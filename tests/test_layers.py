"""The DEQ layers for Flax Linen and NNX, and the pure layer function behind them.

Truths they are checked against: the hand-written ``fixed_point`` path on the same cell
(gradients to float32 precision), gradients backpropagated through 200 iterations of
the contraction, ``hutchinson_frobenius`` on the same cell and probes, and a cell whose
fixed point and gradient are known in closed form (the dropout tests).
"""

import os
import subprocess
import sys
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deq_jax

B, D, DX = 5, 6, 3
FORWARD = deq_jax.SolverConfig("broyden", max_steps=60, tol=1e-6)
BACKWARD = deq_jax.SolverConfig("broyden", max_steps=60, tol=1e-7)
ROOT = Path(__file__).resolve().parents[1]


# --- the same cell in Linen and NNX; the hand-written path --------------------------


class LinenCell(nn.Module):
    """``tanh(z W + b + x U)`` with small W: a contraction with a unique fixed point."""

    @nn.compact
    def __call__(self, x, z):
        return jnp.tanh(nn.Dense(D, kernel_init=nn.initializers.normal(0.25), name="w")(z)
                        + nn.Dense(D, use_bias=False, name="u")(x))


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, inputs, jr_keys=None):
        return deq_jax.linen.DEQ(LinenCell(), forward=FORWARD, backward=BACKWARD, name="deq")(
            inputs, jnp.zeros((inputs.shape[0], D)), jr_keys=jr_keys
        )


class NNXCell(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Linear(D, D, kernel_init=nnx.initializers.normal(0.25), rngs=rngs)
        self.u = nnx.Linear(DX, D, use_bias=False, rngs=rngs)

    def __call__(self, x, z):
        return jnp.tanh(self.w(z) + self.u(x))


def linen_f(p, x, z):
    return LinenCell().apply({"params": p}, x, z)


def nnx_f(graph):
    return lambda state, x, z: nnx.merge(graph, state)(x, z)


def inputs():
    return jax.random.normal(jax.random.key(7), (B, DX))


def loss_of_z(z):
    return jnp.sum(jnp.sin(z) * jnp.arange(1.0, D + 1.0))


def by_hand(f, p, x):
    """The loss through ``deq_jax.fixed_point`` written out by hand."""
    z, _ = deq_jax.fixed_point(f, p, x, jnp.zeros((x.shape[0], D)), forward=FORWARD, backward=BACKWARD)
    return loss_of_z(z)


def unrolled(f, p, x, steps=200):
    """The loss after ``steps`` plain iterations, differentiated through every one."""
    z = jax.lax.scan(lambda z, _: (f(p, x, z), None), jnp.zeros((x.shape[0], D)), None, length=steps)[0]
    return loss_of_z(z)


def close(a, b, tol):
    chex.assert_trees_all_close(a, b, rtol=tol, atol=tol / 10)


class LayerGradientTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_linen_layer_equals_the_hand_written_path_and_the_unrolled_iteration(self):
        model, x = LinenModel(), inputs()
        params = model.init(jax.random.key(0), x)["params"]
        grads = self.variant(jax.grad(lambda p, x: loss_of_z(model.apply({"params": p}, x)[0]), argnums=(0, 1)))
        d_params, d_x = grads(params, x)
        cell = params["LinenCell_0"]  # a cell built in @compact belongs to the enclosing module
        hand = jax.grad(lambda p, x: by_hand(linen_f, p, x), argnums=(0, 1))(cell, x)
        close((d_params["LinenCell_0"], d_x), hand, 1e-5)
        close(hand, jax.grad(lambda p, x: unrolled(linen_f, p, x), argnums=(0, 1))(cell, x), 1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_nnx_layer_equals_the_hand_written_path_and_the_unrolled_iteration(self):
        x = inputs()
        layer = deq_jax.nnx.DEQ(NNXCell(nnx.Rngs(0)), forward=FORWARD, backward=BACKWARD)
        graph, state = nnx.split(layer)

        def loss(state, x):
            z, _ = nnx.merge(graph, state)(x, jnp.zeros((B, D)))
            return loss_of_z(z)

        d_state, d_x = self.variant(jax.grad(loss, argnums=(0, 1)))(state, x)
        cell_graph, cell_state = nnx.split(layer.cell)
        hand = jax.grad(lambda s, x: by_hand(nnx_f(cell_graph), s, x), argnums=(0, 1))(cell_state, x)
        close((nnx.to_pure_dict(d_state)["cell"], d_x), (nnx.to_pure_dict(hand[0]), hand[1]), 1e-5)
        reference = jax.grad(lambda s, x: unrolled(nnx_f(cell_graph), s, x), argnums=(0, 1))(cell_state, x)
        close(nnx.to_pure_dict(hand[0]), nnx.to_pure_dict(reference[0]), 1e-4)
        # nnx.grad of a model holding the layer (the usual NNX way) gives the same.
        model_grads = nnx.grad(lambda m: loss_of_z(m(x, jnp.zeros((B, D)))[0]))(layer)
        close(nnx.to_pure_dict(model_grads)["cell"], nnx.to_pure_dict(d_state)["cell"], 1e-6)


# --- the JR term --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_jr_through_each_layer_equals_hutchinson_on_the_same_cell_and_probes(mode):
    x = inputs()
    keys = jax.random.split(jax.random.key(3), B)

    def hutchinson(f, p, z):
        return deq_jax.hutchinson_frobenius(lambda zz: f(p, x, zz), jax.lax.stop_gradient(z), keys, num_probes=2,
                                            mode=mode)

    # Linen: the value and its gradient with respect to the cell's parameters.
    params = LinenModel().init(jax.random.key(0), x)["params"]

    def linen_jr(p):
        z, stats = deq_jax.linen.DEQ(LinenCell(), forward=FORWARD, backward=BACKWARD, jr_probes=2, jr_mode=mode).apply(
            {"params": {"cell": p}}, x, jnp.zeros((B, D)), jr_keys=keys
        )
        return jnp.mean(stats.jr), z

    cell = params["LinenCell_0"]
    (jr, z), d_jr = jax.value_and_grad(linen_jr, has_aux=True)(cell)
    expected, d_expected = jax.value_and_grad(lambda p: jnp.mean(hutchinson(linen_f, p, z)))(cell)
    np.testing.assert_allclose(jr, expected, rtol=1e-6)
    close(d_jr, d_expected, 1e-5)
    assert float(jnp.linalg.norm(d_jr["w"]["kernel"])) > 0

    # NNX: the same.
    layer = deq_jax.nnx.DEQ(NNXCell(nnx.Rngs(0)), forward=FORWARD, backward=BACKWARD, jr_probes=2, jr_mode=mode)
    (jr, z), d_jr = nnx.value_and_grad(
        lambda m: (lambda z, s: (jnp.mean(s.jr), z))(*m(x, jnp.zeros((B, D)), jr_keys=keys)), has_aux=True
    )(layer)
    cell_graph, cell_state = nnx.split(layer.cell)
    expected, d_expected = jax.value_and_grad(lambda s: jnp.mean(hutchinson(nnx_f(cell_graph), s, z)))(cell_state)
    np.testing.assert_allclose(jr, expected, rtol=1e-6)
    close(nnx.to_pure_dict(d_jr)["cell"], nnx.to_pure_dict(d_expected), 1e-5)


def test_jr_if_false_gives_zeros_and_no_gradient():
    x, keys = inputs(), jax.random.split(jax.random.key(3), B)
    params = {"cell": LinenModel().init(jax.random.key(0), x)["params"]["LinenCell_0"]}

    def jr(p, when):
        _, stats = deq_jax.linen.DEQ(LinenCell(), forward=FORWARD).apply(
            {"params": p}, x, jnp.zeros((B, D)), jr_keys=keys, jr_if=when
        )
        return jnp.mean(stats.jr)

    value, grads = jax.jit(jax.value_and_grad(jr))(params, False)
    assert float(value) == 0.0
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
    assert float(jax.jit(jr)(params, True)) > 0


# --- dropout: one mask per solve, new masks per step ----------------------------------

RATE = 0.5


class LinenDropoutCell(nn.Module):
    """``z = 0.5 z + dropout(x)``: the fixed point is ``2 mask(x) x / (1 - rate)`` for the
    solve's one mask, and ``d sum(z*) / dx = 2 mask / (1 - rate)``."""

    @nn.compact
    def __call__(self, x, z):
        return 0.5 * z + nn.Dropout(RATE, deterministic=False)(x)


class NNXDropoutCell(nnx.Module):
    def __init__(self, rngs):
        self.dropout = nnx.Dropout(RATE, rngs=rngs)

    def __call__(self, x, z):
        return 0.5 * z + self.dropout(x)


def check_one_mask_per_solve(z, d_x, x, stats):
    """z* and its gradient are those of a single mask (one mask for every f evaluation,
    the backward solve included); returns the mask."""
    assert bool(jnp.all(stats.result.converged)), stats.result.rel_residual
    mask = (jnp.abs(z) > 1e-3 * jnp.abs(x)).astype(jnp.float32)
    assert 0 < float(jnp.mean(mask)) < 1
    np.testing.assert_allclose(z, 2 * mask * x / (1 - RATE), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_x, 2 * mask / (1 - RATE), rtol=1e-5, atol=1e-5)
    return mask


def test_linen_dropout_mask_is_fixed_within_a_solve_and_new_with_a_new_key():
    x = jax.random.uniform(jax.random.key(0), (8, 16), minval=1.0, maxval=2.0)
    layer = deq_jax.linen.DEQ(LinenDropoutCell(), forward=FORWARD, backward=BACKWARD)

    @jax.jit
    def step(x, key):
        def loss(x):
            z, stats = layer.apply({}, x, rngs={"dropout": key})
            return jnp.sum(z), (z, stats)

        return jax.grad(loss, has_aux=True)(x)

    masks = []
    for seed in (1, 2):
        d_x, (z, stats) = step(x, jax.random.key(seed))
        masks.append(check_one_mask_per_solve(z, d_x, x, stats))
    assert float(jnp.mean(jnp.abs(masks[0] - masks[1]))) > 0.2


def test_nnx_dropout_mask_is_fixed_within_a_solve_and_new_at_the_next_step():
    x = jax.random.uniform(jax.random.key(0), (8, 16), minval=1.0, maxval=2.0)
    layer = deq_jax.nnx.DEQ(NNXDropoutCell(nnx.Rngs(dropout=5)), forward=FORWARD, backward=BACKWARD)

    @nnx.jit
    def step(layer, x):
        def loss(layer, x):
            z, stats = layer(x)
            return jnp.sum(z), (z, stats)

        return nnx.grad(loss, argnums=1, has_aux=True)(layer, x)

    masks = []
    for _ in range(2):  # the layer's rng stream advances between steps
        d_x, (z, stats) = step(layer, x)
        masks.append(check_one_mask_per_solve(z, d_x, x, stats))
    assert float(jnp.mean(jnp.abs(masks[0] - masks[1]))) > 0.2


# --- under jit on 4 devices, without retracing --------------------------------------

_MULTI_DEVICE = r'''
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, sys.argv[1])
import test_layers as t
import deq_jax

assert jax.device_count() == 4
mesh = Mesh(jax.devices(), ("data",))
data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
traces = {"linen": 0, "nnx": 0}
model = t.LinenModel()
layer = deq_jax.nnx.DEQ(t.NNXCell(nnx.Rngs(0)), forward=t.FORWARD, backward=t.BACKWARD)
graph, nnx_state = nnx.split(layer)


def sgd(params, grads):
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)


def linen_step(params, x, key):
    traces["linen"] += 1

    def loss(p):
        z, stats = model.apply({"params": p}, x, jr_keys=jax.random.split(key, x.shape[0]))
        return t.loss_of_z(z) + jnp.mean(stats.jr), stats.result.n_steps

    (value, steps), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return sgd(params, grads), value, steps


def nnx_step(state, x, key):
    traces["nnx"] += 1
    layer = nnx.merge(graph, state)

    def loss(layer):
        z, stats = layer(x, jnp.zeros((x.shape[0], t.D)), jr_keys=jax.random.split(key, x.shape[0]))
        return t.loss_of_z(z) + jnp.mean(stats.jr), stats.result.n_steps

    (value, steps), grads = nnx.value_and_grad(loss, has_aux=True)(layer)
    nnx.update(layer, sgd(nnx.state(layer, nnx.Param), grads))
    return nnx.state(layer), value, steps


linen_params = model.init(jax.random.key(0), t.inputs())["params"]
for name, step_fn, start in (("linen", linen_step, linen_params), ("nnx", nnx_step, nnx_state)):
    sharded = jax.jit(
        step_fn, in_shardings=(replicated, data, replicated), out_shardings=(replicated, replicated, data)
    )
    single = jax.jit(step_fn)
    runs = {}
    for label, fn in (("4 devices", sharded), ("1 device", single)):
        state, values = start, []
        for i in range(3):  # new values every step
            x = jax.random.normal(jax.random.key(10 + i), (8, t.DX))
            state, value, steps = fn(state, x, jax.random.key(20 + i))
            values.append(float(value))
        runs[label] = (state, values)
        if label == "4 devices":
            assert len(steps.sharding.device_set) == 4, steps.sharding
    assert traces[name] == 2, (name, traces)  # one trace per jitted function, none per step
    np.testing.assert_allclose(runs["4 devices"][1], runs["1 device"][1], rtol=1e-5)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), runs["4 devices"][0], start)
    assert max(jax.tree.leaves(moved)) > 1e-2, moved
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), runs["4 devices"][0], runs["1 device"][0])
    assert max(jax.tree.leaves(diff)) < 1e-5, diff
    print(name, "ok", runs["4 devices"][1])
'''


def test_layers_train_under_jit_on_4_devices_without_retracing():
    """A data-parallel step (batch sharded over 4 simulated CPU devices, parameters
    replicated) of each layer with JR: one trace for three steps of new values, and the
    same losses and parameters as on one device."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _MULTI_DEVICE, str(ROOT / "tests")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "linen ok" in proc.stdout and "nnx ok" in proc.stdout, proc.stdout


# --- mixed precision ------------------------------------------------------------------


class Seen:
    """The (x, z) dtypes a cell was traced with."""

    def __init__(self):
        self.dtypes = set()


class DtypeRecordingCell(nn.Module):
    """LinenCell that records the dtypes it is traced with."""

    seen: Seen

    @nn.compact
    def __call__(self, x, z):
        self.seen.dtypes.add((jnp.dtype(x.dtype).name, jnp.dtype(z.dtype).name))
        return LinenCell(name="inner")(x, z)


def test_bfloat16_cell_keeps_parameters_solver_and_gradients_in_float32():
    """With ``compute_dtype=bfloat16`` the cell runs on bfloat16 inputs (every evaluation:
    solve, backward solve, JR term), while parameters, z*, the solver's residuals and the
    gradients are float32 and agree with the float32 layer to bfloat16 accuracy."""
    x = inputs()
    loose = deq_jax.SolverConfig("broyden", max_steps=40, tol=1e-2)
    seen16, seen32 = Seen(), Seen()

    def model(seen, dtype):
        return deq_jax.linen.DEQ(DtypeRecordingCell(seen), forward=loose, backward=loose, compute_dtype=dtype)

    params = model(seen32, None).init(jax.random.key(0), x, jnp.zeros((B, D)))["params"]
    chex.assert_trees_all_equal_dtypes(params, jax.tree.map(lambda p: p.astype(jnp.float32), params))

    def loss(p, dtype, seen):
        z, stats = model(seen, dtype).apply({"params": p}, x, jnp.zeros((B, D)), jr_keys=jax.random.key(1))
        return loss_of_z(z) + jnp.mean(stats.jr), (z, stats)

    (_, (z16, stats16)), g16 = jax.value_and_grad(loss, has_aux=True)(params, jnp.bfloat16, seen16)
    (_, (z32, _)), g32 = jax.value_and_grad(loss, has_aux=True)(params, None, seen32)
    assert seen16.dtypes == {("bfloat16", "bfloat16")} and seen32.dtypes == {("float32", "float32")}
    assert z16.dtype == jnp.float32 and stats16.result.rel_residual.dtype == jnp.float32
    assert bool(jnp.all(stats16.result.converged))
    chex.assert_trees_all_equal_dtypes(g16, g32)
    np.testing.assert_allclose(z16, z32, atol=3e-2)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-2 * float(jnp.max(jnp.abs(b))))


# --- weight normalization ---------------------------------------------------------------


def _wn_reference(v, g):
    """``w = g * v / ||v||`` per output unit (the last axis), in float64 numpy."""
    v, g = np.asarray(v, np.float64), np.asarray(g, np.float64)
    norm = np.sqrt((v.reshape(-1, v.shape[-1]) ** 2).sum(0))
    return v * (g / norm)


def _wn_grads(v, g, dw):
    """The gradient of L(w(v, g)) from dL/dw (Salimans & Kingma, eq. 3):
    dL/dg = dL/dw . v / ||v||, dL/dv = g / ||v|| dL/dw - g dL/dg / ||v||^2 v."""
    v, g, dw = (np.asarray(a, np.float64) for a in (v, g, dw))
    flat_v, flat_dw = v.reshape(-1, v.shape[-1]), dw.reshape(-1, v.shape[-1])
    norm = np.sqrt((flat_v**2).sum(0))
    dg = (flat_dw * flat_v).sum(0) / norm
    dv = (g / norm) * flat_dw - (g * dg / norm**2) * flat_v
    return dv.reshape(v.shape), dg


def _conv(x, w, strides):
    return jax.lax.conv_general_dilated(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), (strides,) * 2,
                                        "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_weight_normalized_layers_follow_their_definition_and_its_gradient(kind):
    rng = np.random.default_rng(0)
    if kind == "dense":
        x = rng.normal(size=(5, 7)).astype(np.float32)
        linen_layer, shape = deq_jax.linen.WNDense(4), (7, 4)
        nnx_layer = deq_jax.nnx.WNLinear(7, 4, rngs=nnx.Rngs(0))
    else:
        x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
        linen_layer, shape = deq_jax.linen.WNConv(4, kernel_size=3, strides=2), (3, 3, 3, 4)
        nnx_layer = deq_jax.nnx.WNConv(3, 4, kernel_size=3, strides=2, rngs=nnx.Rngs(0))
    v = rng.normal(size=shape).astype(np.float32)
    g = rng.uniform(0.5, 2.0, size=4).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    params = {"v": v, "g": g} | ({"b": b} if kind == "dense" else {})
    assert jax.tree.map(jnp.shape, linen_layer.init(jax.random.key(0), x)["params"]) == jax.tree.map(
        np.shape, params)
    w = _wn_reference(v, g)
    np.testing.assert_allclose(np.sqrt((w.reshape(-1, 4) ** 2).sum(0)), g, rtol=1e-12)  # each unit's norm is g
    want = x @ w + b if kind == "dense" else np.asarray(_conv(x, w, 2))
    np.testing.assert_allclose(linen_layer.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)
    for name, value in params.items():
        getattr(nnx_layer, name).set_value(jnp.asarray(value))
    np.testing.assert_allclose(nnx_layer(x), want, rtol=1e-5, atol=1e-5)

    # The gradient of sum(c * y): dL/dw from the linear map, then the definition's chain rule.
    c = rng.normal(size=np.shape(want)).astype(np.float32)
    if kind == "dense":
        dw = x.T.astype(np.float64) @ c
    else:
        _, pullback = jax.vjp(lambda w: _conv(x, w, 2), jnp.asarray(w, jnp.float32))
        dw = np.asarray(pullback(jnp.asarray(c))[0])
    dv, dg = _wn_grads(v, g, dw)
    got = jax.grad(lambda p: jnp.sum(c * linen_layer.apply({"params": p}, x)))(params)
    np.testing.assert_allclose(got["v"], dv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["g"], dg, rtol=1e-4, atol=1e-5)
    got_nnx = nnx.grad(lambda m: jnp.sum(c * m(x)))(nnx_layer)
    np.testing.assert_allclose(got_nnx.v[...], dv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_nnx.g[...], dg, rtol=1e-4, atol=1e-5)


def test_a_weight_normalized_cell_solves_in_both_layers():
    class LinenCell(nn.Module):
        @nn.compact
        def __call__(self, x, z):
            return jnp.tanh(deq_jax.linen.WNDense(z.shape[-1])(z) * 0.5 + x)

    class NNXCell(nnx.Module):
        def __init__(self, rngs):
            self.dense = deq_jax.nnx.WNLinear(8, 8, rngs=rngs)

        def __call__(self, x, z):
            return jnp.tanh(self.dense(z) * 0.5 + x)

    x = jnp.ones((4, 8))
    layer = deq_jax.linen.DEQ(LinenCell())
    _, stats = layer.apply(layer.init(jax.random.key(0), x), x)
    assert bool(stats.result.converged.all())
    _, stats = deq_jax.nnx.DEQ(NNXCell(nnx.Rngs(0)))(x)
    assert bool(stats.result.converged.all())
