"""The DEQ forward pass of a model and the training objective (task loss + gamma * JR).

Works for the models of :mod:`deq_jax.models`: a call ``model(inputs, dropout_keys, ...)``
through their :class:`deq_jax.linen.DEQ` layer returning a
:class:`~deq_jax.models.ModelOutput`, and a ``cell(x, z) -> z`` method for quantities of
the same map outside the forward pass (the evaluation's spectral radius).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from deq_jax import deq, layer
from deq_jax.correction import Correction
from deq_jax.data.text import TEXT_DATA
from deq_jax.models.deq_transformer import empty_memory
from deq_jax.solvers import base

Array = jax.Array


class Solvers(NamedTuple):
    """The solver set-up of a run (static: hashable)."""

    forward: deq.SolverConfig
    backward: deq.SolverConfig | deq.Phantom | deq.Reversible
    eval_forward: deq.SolverConfig
    pretrain_layers: int
    correction: Correction | None = None  # fixed-point correction of DEQ training steps


def solvers_from_config(c) -> Solvers:
    """The run's solvers. Text models solve causally along the sequence (axis 1 of the
    ``[B, T, D]`` state) when ``forward.causal`` is set, in training, evaluation and
    sampling alike; the backward (adjoint) solve needs no causality."""
    f, b = c.forward, c.backward
    causal_axis = 1 if (f.causal and c.data.name in TEXT_DATA) else None
    # The MDEQ rule of random step limits may raise the limit by one (traced step_limit).
    headroom = 1 if (f.random_lower_rule == "jr_steps" and f.random_lower > 0) else 0
    solver_options = {"beta": f.beta} if f.solver == "reversible" else {}
    forward = deq.SolverConfig(
        f.solver, f.max_steps + headroom, f.tol, f.stop_mode, causal_axis=causal_axis, precision=f.precision,
        options={"early_exit": f.early_exit, **solver_options},
    )
    if b.mode == "implicit":
        backward = deq.SolverConfig(
            b.solver, b.max_steps, b.tol, b.stop_mode, precision=b.precision, options={"early_exit": b.early_exit}
        )
    elif b.mode == "reversible":
        backward = deq.Reversible(precision=b.precision)
    else:
        backward = deq.Phantom(b.phantom_steps, b.phantom_damping)
    eval_forward = deq.SolverConfig(
        f.solver, c.eval.max_steps, f.tol, f.stop_mode, causal_axis=causal_axis, precision=f.precision,
        options=solver_options,
    )
    n = c.correction.n_states
    correction = Correction(n, c.correction.gamma) if n > 1 else None
    return Solvers(forward, backward, eval_forward, c.train.pretrain_layers, correction)


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
    jr: Array | None  # [B] JR term when jr_keys were given
    memory: Any = None  # the next segment's memory (models with one)
    nll: Array | None = None  # -log p(target), shaped like the targets, when targets were given
    correction_nll: tuple | None = None  # with fixed-point correction: nll of each supervised state before z*


def initial_memory(model: nn.Module, batch: int):
    """The empty segment memory of ``batch`` streams for a model with ``mem_len > 0``, else None."""
    mem_len = getattr(model, "mem_len", 0)
    return empty_memory(batch, mem_len, model.d_model) if mem_len else None


def forward(
    model: nn.Module,
    params,
    inputs: Array,
    *,
    mode: str,
    config: deq.SolverConfig | None = None,
    backward: deq.SolverConfig | deq.Phantom | deq.Reversible = deq.DEFAULT_BACKWARD,
    num_layers: int = 1,
    step_limit: Array | int | None = None,
    probe: deq.BackwardStats | None = None,
    dropout_keys: Array | None = None,
    jr_keys: Array | None = None,
    jr_probes: int = 1,
    jr_mode: str = "vjp",
    memory: Any = None,
    targets: Array | None = None,
    correction: Correction | None = None,
) -> Forward:
    """Inputs -> logits through the equilibrium (``mode="deq"``) or k unrolled cells
    (``"unrolled"``), with the ``[B]`` JR term when ``jr_keys`` are given (``jr_probes``
    probes per example, estimated by ``jr_mode``; see :func:`deq_jax.equilibrium`);
    ``memory``: the segment memory of a model with one; ``targets``: also return each
    target's negative log-likelihood (``nll``; a model with adaptive softmax then forms no
    full distribution and ``logits`` is None); ``correction``: fixed-point correction
    (needs ``targets``; ``correction_nll`` is then the nll of each supervised state before z*)."""
    if mode not in ("deq", "unrolled"):
        raise ValueError(f"mode must be 'deq' or 'unrolled', got {mode!r}")
    extra = {} if memory is None else {"memory": memory}
    if targets is not None and getattr(model, "adaptive", False):
        extra["targets"] = targets
    if correction is not None:
        if targets is None:
            raise ValueError("fixed-point correction needs the targets")
        extra["correction"] = correction
    out = model.apply(
        {"params": params},
        inputs,
        dropout_keys,
        **extra,
        unroll=num_layers if mode == "unrolled" else None,
        forward=config,
        backward=backward,
        step_limit=step_limit,
        probe=probe,
        jr_keys=jr_keys,
        jr_probes=jr_probes,
        jr_mode=jr_mode,
    )
    nll = correction_nll = None
    if targets is not None:
        nll = _nll(out.logits, out.target_log_prob, targets)
    if out.corrections is not None:
        correction_nll = tuple(_nll(logits, log_p, targets) for logits, log_p in out.corrections)
    return Forward(out.logits, out.z, out.x, out.stats.result, out.stats.jr, out.memory, nll, correction_nll)


def _nll(logits: Array | None, target_log_prob: Array | None, targets: Array) -> Array:
    return -target_log_prob if target_log_prob is not None else cross_entropy(logits, targets)


def jacobian_penalty(model, params, x, z, keys: Array, num_probes: int) -> Array:
    """``[B]`` Hutchinson estimate of ``||J_f(z)||_F^2 / d`` at a constant z (the paper's JR),
    for a z the forward pass has already returned."""
    return layer.jacobian_term(cell_fn(model), params, x, z, keys, num_probes)


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Softmax cross-entropy in float32, shaped like ``labels`` (``[B]`` or ``[B, T]``)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def accuracy_hits(logits: Array | None, labels: Array, k: int = 1) -> Array:
    """:func:`top_k_hits`, or NaN where there are no logits (adaptive softmax: accuracy is
    not measured, the full distribution is never formed in training and evaluation)."""
    if logits is None:
        return jnp.full(labels.shape, jnp.nan, jnp.float32)
    return top_k_hits(logits, labels, k)


def top_k_hits(logits: Array, labels: Array, k: int) -> Array:
    """1.0 where the label is among the ``k`` highest logits (ties in its favour), else 0.0;
    shaped like ``labels`` (``[B]`` or ``[B, T]``)."""
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)
    return (jnp.sum(logits > label_logit, axis=-1) < k).astype(jnp.float32)
