"""DEQ-Transformer: shapes, causality at the fixed point, pre-/post-LN gradients."""

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import deq_jax
from deq_jax.models import DEQTransformer
from deq_jax.train import objective

B, T, V = 2, 12, 17


def make(pre_ln=True, **kw):
    model = DEQTransformer(V, d_model=32, num_heads=4, d_ff=64, pre_ln=pre_ln, **kw)
    tokens = jax.random.randint(jax.random.key(0), (B, T), 0, V)
    params = model.init(jax.random.key(1), tokens, unroll=1)["params"]
    return model, params, tokens


@pytest.mark.parametrize("pre_ln", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_shapes(pre_ln, tie):
    model, params, tokens = make(pre_ln, tie_embeddings=tie)
    out = objective.forward(model, params, tokens, mode="deq", config=deq_jax.SolverConfig(max_steps=8))
    chex.assert_shape(out.logits, (B, T, V))
    chex.assert_shape(out.z, (B, T, 32))
    assert ("output" in params) != tie


@pytest.mark.parametrize("pre_ln", [False, True])
@pytest.mark.parametrize("name", ["fixed_point_iteration", "anderson"])
def test_causal_at_the_fixed_point(name, pre_ln):
    """Changing the last tokens leaves the logits of earlier positions unchanged.

    Both cells at this initialization are contractions (plain iteration converges), so
    the fixed point is unique; solved to tol 1e-6 by a causal iteration or by Anderson
    (whose updates mix positions), the earlier positions must agree to that tolerance."""
    model, params, tokens = make(pre_ln=pre_ln)
    changed = tokens.at[:, -3:].set((tokens[:, -3:] + 5) % V)
    solver = deq_jax.SolverConfig(name, max_steps=200, tol=1e-6)
    run = jax.jit(lambda t: objective.forward(model, params, t, mode="deq", config=solver))
    a, b = run(tokens), run(changed)
    assert bool(jnp.all(a.result.converged)) and bool(jnp.all(b.result.converged))
    a, b = a.logits, b.logits
    np.testing.assert_allclose(a[:, :-3], b[:, :-3], atol=1e-4, rtol=0)
    assert float(jnp.max(jnp.abs(a[:, -3:] - b[:, -3:]))) > 1e-3  # the changed positions do change


@pytest.mark.parametrize("pre_ln", [True, False])
def test_pre_and_post_ln_both_get_gradients_through_the_fixed_point(pre_ln):
    model, params, tokens = make(pre_ln, dropout=0.1)
    keys = jax.random.split(jax.random.key(2), B)

    @jax.jit
    def loss(p):
        out = objective.forward(model, p, tokens[:, :-1], mode="deq", config=deq_jax.SolverConfig(max_steps=10),
                                backward=deq_jax.SolverConfig(max_steps=10, tol=1e-4), dropout_keys=keys)
        return jnp.mean(objective.cross_entropy(out.logits, tokens[:, 1:]))

    value, grads = jax.value_and_grad(loss)(params)
    assert np.isfinite(float(value))
    norms = jax.tree.map(lambda g: float(jnp.linalg.norm(g)), grads)
    norms |= norms["deq"]["cell"]
    for part in ("attention", "ff_in", "ff_out", "embed"):
        assert max(jax.tree.leaves(norms[part])) > 0, part


def test_bad_tokens_give_a_clear_error():
    model = DEQTransformer(V, d_model=32, num_heads=4, d_ff=64)
    with pytest.raises(ValueError, match="integer tokens"):
        model.init(jax.random.key(0), jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DEQTransformer(V, d_model=30, num_heads=4).init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32))


# --- segment memory -------------------------------------------------------------------

TIGHT = deq_jax.SolverConfig("broyden", max_steps=80, tol=1e-6, causal_axis=1)


# Memory exactly full, or partly empty (the start of a stream).
@pytest.mark.parametrize("pre_ln, first, mem_len", [(True, 6, 6), (True, 4, 8), (False, 6, 6)])
def test_a_segment_with_memory_equals_the_same_tokens_in_one_long_segment(pre_ln, first, mem_len):
    """At convergence the model is causal, so the equilibrium of tokens [first, first + 6)
    attending to the memory of tokens [0, first) is that of the long segment [0, first + 6)
    there: the same logits (rotary positions continue across the boundary)."""
    model, params, _ = make(pre_ln)
    with_memory = DEQTransformer(V, d_model=32, num_heads=4, d_ff=64, pre_ln=pre_ln, mem_len=mem_len)
    tokens = jax.random.randint(jax.random.key(5), (B, first + 6), 0, V)
    long = model.apply({"params": params}, tokens, forward=TIGHT)
    assert bool(long.stats.result.converged.all())
    first_out = with_memory.apply({"params": params}, tokens[:, :first], forward=TIGHT)
    assert first_out.memory.states.shape == (B, mem_len, 32)
    np.testing.assert_array_equal(first_out.memory.valid, np.arange(mem_len)[None].repeat(B, 0) >= mem_len - first)
    second = with_memory.apply({"params": params}, tokens[:, first:], memory=first_out.memory, forward=TIGHT)
    assert bool(second.stats.result.converged.all())
    np.testing.assert_allclose(second.logits, long.logits[:, first:], atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(first_out.logits, long.logits[:, :first], atol=2e-4, rtol=2e-4)
    # Without the memory the second segment's predictions differ (the context matters).
    alone = with_memory.apply({"params": params}, tokens[:, first:], forward=TIGHT)
    assert float(jnp.max(jnp.abs(alone.logits - long.logits[:, first:]))) > 1e-2


def test_memory_gets_no_gradient_and_bad_memory_is_an_error():
    _, params, tokens = make()
    model = DEQTransformer(V, d_model=32, num_heads=4, d_ff=64, mem_len=T)
    memory = model.apply({"params": params}, tokens, unroll=1).memory

    def loss(states):  # one cell application: the memory is a stop-gradient copy in any mode
        out = model.apply({"params": params}, tokens, memory=memory._replace(states=states), unroll=1)
        return jnp.sum(out.memory.states) + 0.0 * jnp.sum(out.logits)

    # The next memory is a stop-gradient copy: it does not carry gradient to the previous one.
    assert float(jnp.max(jnp.abs(jax.grad(loss)(memory.states)))) == 0.0
    with pytest.raises(ValueError, match="mem_len"):
        model.apply({"params": params}, tokens, memory=memory._replace(states=memory.states[:, 1:]))
    with pytest.raises(ValueError, match="mem_len 0"):
        DEQTransformer(V, d_model=32, num_heads=4, d_ff=64).apply({"params": params}, tokens, memory=memory)


def _while_bodies(jaxpr) -> list:
    """The body jaxprs of every while loop in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            found.append(eqn.params["body_jaxpr"].jaxpr)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _while_bodies(sub)
    return found


def _dot_operand_shapes(jaxpr) -> list:
    """The operand shapes of every dot_general in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(tuple(v.aval.shape) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dot_operand_shapes(sub)
    return found


def test_the_memory_is_projected_once_per_segment_not_inside_the_solve():
    """The memory's keys and values are constants of the solve: the forward solve's loop
    projects only the segment's T rows ([B, T, D] inputs), never the M + T rows of memory
    and segment together, and the projection of the M memory rows happens outside it."""
    mem_len = 5
    _, params, tokens = make()
    model = DEQTransformer(V, d_model=32, num_heads=4, d_ff=64, mem_len=mem_len)
    memory = model.apply({"params": params}, tokens, unroll=1).memory
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens, memory=memory).logits)(params).jaxpr
    (body,) = _while_bodies(jaxpr)  # the forward solve
    projections = [shapes for shapes in _dot_operand_shapes(body) if len(shapes[0]) == 3 and shapes[0][2] == 32]
    assert projections and all(shapes[0][:2] == (B, T) for shapes in projections)  # [B, rows, D] @ W: rows = T
    assert any(shapes[0][:2] == (B, mem_len) for shapes in _dot_operand_shapes(jaxpr))  # so outside the loop
