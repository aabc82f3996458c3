"""Pure, jitted training and evaluation steps, data parallel over a ``data`` mesh axis.

``train_step(state, inputs, targets) -> (state, metrics)`` is one compiled function per
mode (pretraining: cell unrolled; DEQ: fixed point). Inside, ``shard_map`` gives every
device its shard of the batch and its own solver loop (a slow shard never makes the
others iterate), gradients and metrics are averaged with ``pmean`` over ``data``, and
the optimizer update runs replicated.

All randomness comes from ``(seed, step)``: whether JR applies, the lowered forward
step limit, and one key per example (dropout masks, JR probes). Per-example keys make a
step's result independent of the number of devices.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deq_jax import deq
from deq_jax.train import objective, schedules

Array = jax.Array
DATA = "data"


@flax.struct.dataclass
class TrainState:
    step: Array
    params: Any
    opt_state: Any
    gamma: schedules.GammaState


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes), axis ``data``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(devices, (DATA,))


def check_batch(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"{what} = {batch_size} is not divisible by the {n} devices of the data mesh; "
            f"use a multiple of {n} (e.g. {batch_size - batch_size % n or n})"
        )


def step_randomness(seed: int, step: Array, batch: int, prob: float, max_steps: int, random_lower: int):
    """``(apply_jr, step_limit, example_keys)`` of global step ``step``."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    apply_jr = jax.random.bernoulli(jax.random.fold_in(key, 0), prob)
    lower = jax.random.randint(jax.random.fold_in(key, 1), (), 0, random_lower + 1)
    example_keys = jax.random.split(jax.random.fold_in(key, 2), batch)
    return apply_jr, max_steps - lower, example_keys


def _mean(x):
    return jax.lax.pmean(jnp.mean(x.astype(jnp.float32)), DATA)


def make_train_step(model: nn.Module, c, tx: optax.GradientTransformation, lr: Callable, mesh: Mesh, mode: str):
    """The jitted ``train_step(state, inputs, targets) -> (state, metrics)`` of one mode.

    ``mode``: ``"deq"`` or ``"unrolled"`` (pretraining). ``inputs``/``targets`` are the
    global batch (images ``[B, H, W, C]`` and labels ``[B]``, or tokens ``[B, T]`` and
    next tokens ``[B, T]``), sharded (or shardable) along ``data``. ``metrics`` is a dict
    of float32 scalars: loss (task, mean over targets), accuracy, jr (NaN when not applied), gamma, lr,
    jr_applied, step_limit, fwd_steps, fwd_residual, fwd_converged, bwd_steps,
    bwd_residual (solver ones NaN in pretraining).
    """
    setup = objective.solvers_from_config(c)
    schedule = schedules.from_config(c)
    implicit = isinstance(setup.backward, deq.SolverConfig)
    gamma_enabled = c.jr.gamma > 0 or c.jr.schedule != "constant"
    nan = jnp.float32(jnp.nan)

    def local(params, gamma, apply_jr, step_limit, inputs, targets, keys):
        batch = inputs.shape[0]
        probe = deq.BackwardStats.zeros(batch) if (mode == "deq" and implicit) else None

        def loss_fn(params, probe):
            out = objective.forward(
                model,
                params,
                inputs,
                mode=mode,
                config=setup.forward,
                backward=setup.backward,
                num_layers=setup.pretrain_layers,
                step_limit=step_limit,
                probe=probe,
                dropout_keys=keys,
            )
            task = jnp.mean(objective.cross_entropy(out.logits, targets))
            if gamma_enabled:
                jr_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
                jr = jax.lax.cond(
                    apply_jr,
                    lambda: jnp.mean(objective.jacobian_penalty(model, params, out.x, out.z, jr_keys, c.jr.num_probes)),
                    lambda: jnp.float32(0.0),
                )
            else:
                jr = jnp.float32(0.0)
            # The local mean: gradients are averaged over the mesh below (equal shards).
            return task + gamma * jr, (task, jr, out)

        (_, (task, jr, out)), (grads, probe_grad) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            params, probe
        )
        grads = jax.lax.pmean(grads, DATA)
        accuracy = jnp.mean((jnp.argmax(out.logits, -1) == targets).astype(jnp.float32))
        metrics = {
            "loss": _mean(task),
            "accuracy": _mean(accuracy),
            "jr": jnp.where(apply_jr & gamma_enabled, _mean(jr), nan),
        }
        if out.result is not None:
            r = out.result
            # An example that did not reach tol counts as using the whole budget.
            steps = jnp.where(r.converged, r.n_steps, step_limit)
            metrics |= {
                "fwd_steps": _mean(steps),
                "fwd_residual": _mean(r.rel_residual),
                "fwd_converged": _mean(r.converged),
            }
        else:
            metrics |= {"fwd_steps": nan, "fwd_residual": nan, "fwd_converged": nan}
        if probe_grad is not None:
            metrics |= {"bwd_steps": _mean(probe_grad.n_steps), "bwd_residual": _mean(probe_grad.rel_residual)}
        elif mode == "deq":
            metrics |= {"bwd_steps": jnp.float32(setup.backward.steps), "bwd_residual": nan}
        else:
            metrics |= {"bwd_steps": nan, "bwd_residual": nan}
        return grads, metrics

    sharded_local = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(), P(DATA), P(DATA), P(DATA)),
        out_specs=(P(), P()),
        check_vma=False,
    )

    def train_step(state: TrainState, inputs: Array, targets: Array):
        apply_jr, step_limit, keys = step_randomness(
            c.seed, state.step, inputs.shape[0], c.jr.prob, c.forward.max_steps, c.forward.random_lower
        )
        if mode != "deq":
            step_limit = jnp.int32(c.forward.max_steps)
        gamma = state.gamma.gamma
        grads, metrics = sharded_local(state.params, gamma, apply_jr, step_limit, inputs, targets, keys)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_gamma = schedule.update(
            state.gamma,
            step=state.step,
            fwd_steps=metrics["fwd_steps"],
            fwd_residual=metrics["fwd_residual"],
            in_deq=mode == "deq",
        )
        metrics |= {
            "gamma": gamma,
            "lr": jnp.asarray(lr(state.step), jnp.float32),
            "jr_applied": apply_jr.astype(jnp.float32) * gamma_enabled,
            "step_limit": step_limit.astype(jnp.float32),
            "grad_norm": optax.tree.norm(grads).astype(jnp.float32),
        }
        return TrainState(state.step + 1, params, opt_state, new_gamma), metrics

    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(DATA))
    return jax.jit(
        train_step,
        in_shardings=(replicated, data, data),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def make_eval_step(model: nn.Module, c, mesh: Mesh, with_jacobian: bool):
    """Jitted ``eval_step(params, step_limit, inputs, targets, weights) -> sums``.

    Runs the forward solve with ``eval.max_steps`` lowered to ``step_limit`` (traced:
    one compilation for every budget). ``weights`` has the targets' shape (``[B]`` for
    images, ``[B, T]`` for text; 0 marks padding). Returns float32 sums over the batch:
    per target ``count, correct, loss``; per example (one holding any real target)
    ``examples, steps, converged, residual`` (+ ``jac`` if ``with_jacobian``: Hutchinson
    ``||J_f(z*)||_F^2 / d`` with ``eval.jac_probes`` probes).
    """
    setup = objective.solvers_from_config(c)

    def local(params, step_limit, inputs, targets, weights):
        out = objective.forward(model, params, inputs, mode="deq", config=setup.eval_forward, step_limit=step_limit)
        r = out.result
        example = (weights.reshape(weights.shape[0], -1).max(axis=1) > 0).astype(jnp.float32)
        sums = {
            "count": weights,
            "correct": (jnp.argmax(out.logits, -1) == targets) * weights,
            "loss": objective.cross_entropy(out.logits, targets) * weights,
            "examples": example,
            "steps": jnp.where(r.converged, r.n_steps, step_limit) * example,
            "converged": r.converged * example,
            "residual": r.rel_residual * example,
        }
        if with_jacobian:
            keys = jax.random.split(jax.random.key(c.seed + 1), inputs.shape[0])
            sums["jac"] = objective.jacobian_penalty(model, params, out.x, out.z, keys, c.eval.jac_probes) * example
        return {k: jax.lax.psum(jnp.sum(v.astype(jnp.float32)), DATA) for k, v in sums.items()}

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(DATA), P(DATA), P(DATA)),
        out_specs=P(),
        check_vma=False,
    )
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(DATA))
    return jax.jit(sharded, in_shardings=(replicated, replicated, data, data, data), out_shardings=replicated)


def init_state(model: nn.Module, c, tx: optax.GradientTransformation, sample_input, mesh: Mesh) -> TrainState:
    """Parameters from ``seed``, optimizer state, gamma schedule state; replicated on the mesh.

    ``sample_input``: ``[1, ...]`` array of the model's input shape and dtype.
    """
    schedule = schedules.from_config(c)

    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
    def init():
        params = model.init(jax.random.key(c.seed), jnp.zeros(sample_input.shape, sample_input.dtype))["params"]
        return TrainState(jnp.int32(0), params, tx.init(params), schedule.init())

    return init()
