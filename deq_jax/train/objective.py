"""The DEQ forward pass of a model and the training objective (task loss + gamma * JR).

Works for any Flax module with the four methods of :class:`deq_jax.models.MDEQ`:
``inject(inputs, dropout_keys) -> x``, ``initial_state(x) -> z0``, ``cell(x, z) -> z``
and ``head(z) -> logits``. The cell reaches :func:`deq_jax.fixed_point` as
``f(params, x, z)`` with the parameters as an argument.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from deq_jax import deq, jacobian
from deq_jax.data.text import TEXT_DATA
from deq_jax.solvers import base

Array = jax.Array


class Solvers(NamedTuple):
    """The solver set-up of a run (static: hashable)."""

    forward: deq.SolverConfig
    backward: deq.SolverConfig | deq.Phantom
    eval_forward: deq.SolverConfig
    pretrain_layers: int


def solvers_from_config(c) -> Solvers:
    """The run's solvers. Text models solve causally along the sequence (axis 1 of the
    ``[B, T, D]`` state) when ``forward.causal`` is set, in training, evaluation and
    sampling alike; the backward (adjoint) solve needs no causality."""
    f, b = c.forward, c.backward
    causal_axis = 1 if (f.causal and c.data.name in TEXT_DATA) else None
    # The MDEQ rule of random step limits may raise the limit by one (traced step_limit).
    headroom = 1 if (f.random_lower_rule == "jr_steps" and f.random_lower > 0) else 0
    forward = deq.SolverConfig(f.solver, f.max_steps + headroom, f.tol, f.stop_mode, causal_axis=causal_axis)
    if b.mode == "implicit":
        backward = deq.SolverConfig(b.solver, b.max_steps, b.tol, b.stop_mode)
    else:
        backward = deq.Phantom(b.phantom_steps, b.phantom_damping)
    eval_forward = deq.SolverConfig(f.solver, c.eval.max_steps, f.tol, f.stop_mode, causal_axis=causal_axis)
    return Solvers(forward, backward, eval_forward, c.train.pretrain_layers)


def cell_fn(model: nn.Module):
    """``f(params, x, z)``: one application of the model's cell."""

    def f(params, x, z):
        return model.apply({"params": params}, x, z, method="cell")

    return f


class Forward(NamedTuple):
    logits: Array
    z: Any
    x: Any
    result: base.SolverResult | None  # None when unrolled


def forward(
    model: nn.Module,
    params,
    inputs: Array,
    *,
    mode: str,
    config: deq.SolverConfig | None = None,
    backward: deq.SolverConfig | deq.Phantom = deq.DEFAULT_BACKWARD,
    num_layers: int = 1,
    step_limit: Array | int | None = None,
    probe: deq.BackwardStats | None = None,
    dropout_keys: Array | None = None,
) -> Forward:
    """Inputs -> logits through the equilibrium (``mode="deq"``) or k unrolled cells (``"unrolled"``)."""
    variables = {"params": params}
    x = model.apply(variables, inputs, dropout_keys, method="inject")
    z0 = model.apply(variables, x, method="initial_state")
    f = cell_fn(model)
    if mode == "deq":
        z, result = deq.fixed_point(
            f, params, x, z0, forward=config, backward=backward, probe=probe, step_limit=step_limit
        )
    elif mode == "unrolled":
        z, result = deq.unrolled(f, params, x, z0, num_layers), None
    else:
        raise ValueError(f"mode must be 'deq' or 'unrolled', got {mode!r}")
    return Forward(model.apply(variables, z, method="head"), z, x, result)


def jacobian_penalty(model, params, x, z, keys: Array, num_probes: int) -> Array:
    """``[B]`` Hutchinson estimate of ``||J_f(z)||_F^2 / d`` at a constant z (the paper's JR)."""
    f = cell_fn(model)
    return jacobian.hutchinson_frobenius(
        lambda zz: f(params, x, zz), jax.lax.stop_gradient(z), keys, num_probes=num_probes
    )


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Softmax cross-entropy in float32, shaped like ``labels`` (``[B]`` or ``[B, T]``)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def top_k_hits(logits: Array, labels: Array, k: int) -> Array:
    """1.0 where the label is among the ``k`` highest logits (ties in its favour), else 0.0;
    shaped like ``labels`` (``[B]`` or ``[B, T]``)."""
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)
    return (jnp.sum(logits > label_logit, axis=-1) < k).astype(jnp.float32)
