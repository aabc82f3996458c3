"""Pure, jitted training and evaluation steps, data parallel over a ``data`` mesh axis.

``train_step(state, inputs, targets) -> (state, metrics)`` is one compiled function per
mode (pretraining: cell unrolled; DEQ: fixed point). Inside, ``shard_map`` gives every
device its shard of the batch and its own solver loop (a slow shard never makes the
others iterate), gradients and metrics are averaged with ``pmean`` over ``data``, and
the optimizer update runs replicated.

All randomness comes from ``(seed, step)``: whether JR applies, the lowered forward
step limit, and one key per example (dropout masks, JR probes). Per-example keys make a
step's result independent of the number of devices.

Whether a step applies JR (the paper's per-step coin, probability ``jr.prob``) is decided
on the host (:func:`jr_coin`), and a step with the JR term and one without it are two
compiled functions (``make_train_step(..., jr=True/False)``): nothing in a compiled step
decides whether work happens. A ``lax.cond`` on a traced coin would cost a
device-to-host copy of its predicate every step on a GPU and, on CPU, would put the
JR term's convolutions (and their gradients') outside XLA's fast layout (the CPU backend
canonicalizes convolution layouts in the entry computation only, not in a cond's
branches): 2.3x the step time of the digits config.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deq_jax import deq, jacobian
from deq_jax.train import objective, schedules

Array = jax.Array
DATA = "data"


@flax.struct.dataclass
class TrainState:
    """What a train step changes. ``memory``: the segment memory of a model with one
    (``[B, ...]`` leaves, sharded along ``data`` like the batch), else None."""

    step: Array
    params: Any
    opt_state: Any
    gamma: schedules.GammaState
    memory: Any = None


def state_sharding(mesh: Mesh, state: TrainState) -> TrainState:
    """Shardings of a train state: everything replicated but the memory (per example)."""
    replicated = NamedSharding(mesh, P())
    memory = None if state.memory is None else NamedSharding(mesh, P(DATA))
    return TrainState(replicated, replicated, replicated, replicated, memory)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes), axis ``data``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(devices, (DATA,))


def process_rows(sharding: NamedSharding, batch_size: int) -> np.ndarray | None:
    """The rows of a ``[batch_size, ...]`` global batch that this process's devices hold under
    ``sharding`` (ascending), or None when it holds all of them (one process). What a
    process loads: each loads only its share of every batch."""
    held = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        held.update(range(*index[0].indices(batch_size)))
    return None if len(held) == batch_size else np.array(sorted(held), np.int64)


def global_batch(local: np.ndarray, sharding: NamedSharding, rows: np.ndarray | None, batch_size: int) -> Array:
    """The global ``[batch_size, ...]`` array whose rows ``rows`` (None: all) are ``local``:
    each process passes its own share and its devices take their shards from it."""
    local = np.asarray(local)
    shape = (batch_size,) + local.shape[1:]
    if rows is None:
        return jax.make_array_from_callback(shape, sharding, lambda index: local[index])

    def shard(index):
        start, stop, _ = index[0].indices(batch_size)
        return local[(np.searchsorted(rows, np.arange(start, stop)),) + tuple(index[1:])]

    return jax.make_array_from_callback(shape, sharding, shard)


def check_batch(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"{what} = {batch_size} is not divisible by the {n} devices of the data mesh; "
            f"use a multiple of {n} (e.g. {batch_size - batch_size % n or n})"
        )


_JR_COIN_STREAM = 0x4A52  # numpy seed-sequence word of the JR coin (apart from the seed and step)


def jr_coin(c, step: int, mode: str) -> bool:
    """Whether global step ``step`` of ``mode`` applies JR (a host bool, no device work).

    False when the mode's JR weight is 0 (:func:`jr_weight_enabled`) and from
    ``jr.stop_step`` on; otherwise a coin with probability ``jr.prob``, drawn from
    ``(seed, step)`` alone, so a resumed run draws the same coins as an uninterrupted one.
    """
    if not jr_weight_enabled(c, mode):
        return False
    if c.jr.stop_step >= 0 and step >= c.jr.stop_step:
        return False
    entropy = [int(c.seed) % 2**63, int(step), _JR_COIN_STREAM]
    return bool(np.random.default_rng(entropy).random() < c.jr.prob)


def step_randomness(seed: int, step: Array, batch: int, c, apply_jr: bool = False):
    """``(step_limit, example_keys)`` of global step ``step`` under config ``c``.

    ``apply_jr``: whether the step applies JR (static, from :func:`jr_coin`).
    ``step_limit``: the forward limit of a DEQ step, ``forward.max_steps`` changed by the
    rule ``forward.random_lower_rule``: ``"every_step"`` (DEQ-Sequence) lowers it by
    U{0..random_lower} on every step; ``"jr_steps"`` (MDEQ-Vision) changes it by
    U{-random_lower..+1} on steps that apply JR only. ``example_keys``: ``[batch]`` keys.
    """
    key = jax.random.fold_in(jax.random.key(seed), step)
    change_key, r = jax.random.fold_in(key, 1), c.forward.random_lower
    if c.forward.random_lower_rule == "every_step":
        change = -jax.random.randint(change_key, (), 0, r + 1)
    elif apply_jr and r > 0:
        change = jax.random.randint(change_key, (), -r, 2)
    else:
        change = jnp.int32(0)
    example_keys = jax.random.split(jax.random.fold_in(key, 2), batch)
    return (c.forward.max_steps + change).astype(jnp.int32), example_keys


def jr_weight_enabled(c, mode: str) -> bool:
    """Whether JR can apply in ``mode`` at all (static): ``jr.pretrain_gamma > 0`` while
    pretraining (the official default is 0: JR starts with the DEQ phase), and
    ``jr.gamma > 0`` or a schedule that can raise it in DEQ mode."""
    if mode == "unrolled":
        return c.jr.pretrain_gamma > 0
    return c.jr.gamma > 0 or c.jr.schedule != "constant"


def _mean(x):
    return jax.lax.pmean(jnp.mean(x.astype(jnp.float32)), DATA)


def _max(x):
    return jax.lax.pmax(jnp.max(x.astype(jnp.float32)), DATA)


def _count(flags):
    """How many examples of the global batch have the flag."""
    return jax.lax.psum(jnp.sum(flags.astype(jnp.float32)), DATA)


def all_finite(tree) -> Array:
    """True when every element of every leaf of ``tree`` is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def make_train_step(
    model: nn.Module, c, tx: optax.GradientTransformation, lr: Callable, mesh: Mesh, mode: str, *, jr: bool
):
    """The jitted ``train_step(state, inputs, targets) -> (state, metrics)`` of one mode.

    ``mode``: ``"deq"`` or ``"unrolled"`` (pretraining). ``jr``: whether the step adds the
    JR term (the training loop compiles both and picks one per step with :func:`jr_coin`);
    ``ValueError`` if ``jr`` but the mode's JR weight is 0. ``inputs``/``targets`` are the
    global batch (images ``[B, H, W, C]`` and labels ``[B]``, or tokens ``[B, T]`` and
    next tokens ``[B, T]``), sharded (or shardable) along ``data``. ``metrics`` is a dict
    of float32 scalars: loss (task, mean over targets, of z* alone also with fixed-point
    correction, whose weighted sum over the supervised states is what is minimized), accuracy, jr (NaN when not
    applied), gamma (the JR weight of this step: ``jr.pretrain_gamma`` while pretraining),
    lr, jr_applied, step_limit, fwd_steps, fwd_residual, fwd_converged, bwd_steps,
    bwd_residual (per-example means), fwd_nfe and bwd_nfe (f and VJP evaluations of the
    batched solver loops, which run until their slowest example stops; the most over
    devices); the solver ones are NaN in pretraining; fwd_nonfinite and bwd_nonfinite
    (examples of the batch whose solve met NaN/Inf) and skipped (1.0 when the step's loss
    or gradient was not finite: then parameters, optimizer state and gamma stay as they
    were).
    """
    setup = objective.solvers_from_config(c)
    schedule = schedules.from_config(c)
    # The implicit and the reversible gradients report their statistics through a probe.
    reports = isinstance(setup.backward, (deq.SolverConfig, deq.Reversible))
    correction = setup.correction if mode == "deq" else None
    if jr and not jr_weight_enabled(c, mode):
        raise ValueError(f"a {mode!r} train step with jr=True, but the config gives JR no weight in this mode "
                         "(jr.gamma / jr.pretrain_gamma is 0)")
    nan = jnp.float32(jnp.nan)

    def local(params, gamma, step_limit, inputs, targets, keys, memory):
        batch = inputs.shape[0]
        probe = deq.BackwardStats.zeros(batch) if (mode == "deq" and reports) else None

        def loss_fn(params, probe):
            jr_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys) if jr else None
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
                jr_keys=jr_keys,
                jr_probes=c.jr.num_probes,
                jr_mode=c.jr.mode,
                memory=memory,
                targets=targets,
                correction=correction,
            )
            task = jnp.mean(out.nll)
            objective_task = task
            if correction is not None:  # sum_i gamma^(n-1-i) L(z_i), the last z_i = z*
                objective_task = correction.loss(jnp.mean, (*out.correction_nll, out.nll))
            jr_term = jnp.mean(out.jr) if jr else jnp.float32(0.0)
            # The local mean: gradients are averaged over the mesh below (equal shards).
            return objective_task + gamma * jr_term, (task, jr_term, out)

        (_, (task, jr_term, out)), (grads, probe_grad) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            params, probe
        )
        grads = jax.lax.pmean(grads, DATA)
        accuracy = jnp.mean(objective.accuracy_hits(out.logits, targets))
        metrics = {
            "loss": _mean(task),
            "accuracy": _mean(accuracy),
            "jr": _mean(jr_term) if jr else nan,
        }
        if out.result is not None:
            r = out.result
            # An example that did not reach tol counts as using the whole budget.
            steps = jnp.where(r.converged, r.n_steps, step_limit)
            metrics |= {
                "fwd_steps": _mean(steps),
                "fwd_residual": _mean(r.rel_residual),
                "fwd_converged": _mean(r.converged),
                "fwd_nfe": _max(r.f_evals),
                "fwd_nonfinite": _count(r.nonfinite),
            }
        else:
            metrics |= {"fwd_steps": nan, "fwd_residual": nan, "fwd_converged": nan, "fwd_nfe": nan,
                        "fwd_nonfinite": jnp.float32(0.0)}
        if probe_grad is not None:
            metrics |= {
                "bwd_steps": _mean(probe_grad.n_steps),
                "bwd_residual": _mean(probe_grad.rel_residual),
                "bwd_nfe": _max(probe_grad.vjp_evals),
                "bwd_nonfinite": _count(probe_grad.nonfinite),
            }
        elif mode == "deq":
            steps = jnp.float32(setup.backward.steps)
            metrics |= {"bwd_steps": steps, "bwd_residual": nan, "bwd_nfe": steps, "bwd_nonfinite": jnp.float32(0.0)}
        else:
            metrics |= {"bwd_steps": nan, "bwd_residual": nan, "bwd_nfe": nan, "bwd_nonfinite": jnp.float32(0.0)}
        return grads, metrics, out.memory

    sharded_local = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(DATA), P(DATA), P(DATA), P(DATA)),
        out_specs=(P(), P(), P(DATA)),
        check_vma=False,
    )

    def train_step(state: TrainState, inputs: Array, targets: Array):
        step_limit, keys = step_randomness(c.seed, state.step, inputs.shape[0], c, jr)
        if mode != "deq":
            step_limit = jnp.int32(c.forward.max_steps)
            gamma = jnp.float32(c.jr.pretrain_gamma)
        else:
            gamma = state.gamma.gamma
        grads, metrics, memory = sharded_local(
            state.params, gamma, step_limit, inputs, targets, keys, state.memory
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_gamma = schedule.update(
            state.gamma,
            step=state.step,
            fwd_steps=metrics["fwd_steps"],
            fwd_residual=metrics["fwd_residual"],
            in_deq=mode == "deq",
        )
        # A step whose loss or gradient is not finite changes nothing (it is counted as
        # skipped): one NaN example makes every gradient NaN while its loss can stay finite
        # (the solver returns z0 for that example), so the gradient is checked too.
        finite = (
            jnp.isfinite(metrics["loss"])
            & (jnp.isfinite(metrics["jr"]) if jr else True)
            & all_finite(grads)
        )
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        params, opt_state, new_gamma = keep(
            (params, opt_state, new_gamma), (state.params, state.opt_state, state.gamma)
        )
        if memory is not None:  # a skipped step's segment is not context for the next one
            memory = memory._replace(valid=memory.valid & finite)
        metrics |= {
            "skipped": 1.0 - finite.astype(jnp.float32),
            "gamma": gamma,
            "lr": jnp.asarray(lr(state.step), jnp.float32),
            "jr_applied": jnp.float32(jr),
            "step_limit": step_limit.astype(jnp.float32),
            "grad_norm": optax.tree.norm(grads).astype(jnp.float32),
        }
        return TrainState(state.step + 1, params, opt_state, new_gamma, memory), metrics

    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(DATA))
    memory = objective.initial_memory(model, c.train.batch_size)
    states = state_sharding(mesh, TrainState(None, None, None, None, memory))
    return jax.jit(
        train_step,
        in_shardings=(states, data, data),
        out_shardings=(states, replicated),
        donate_argnums=0,
    )


def make_eval_step(model: nn.Module, c, mesh: Mesh, with_jacobian: bool):
    """Jitted ``eval_step(params, step_limit, inputs, targets, weights, first_index, memory)
    -> (sums, memory)``.

    Runs the forward solve with ``eval.max_steps`` lowered to ``step_limit`` (traced:
    one compilation for every budget). ``weights`` has the targets' shape (``[B]`` for
    images, ``[B, T]`` for text; 0 marks padding). ``first_index``: the position of the
    batch's first example in the evaluation set. Returns float32 sums over the batch:
    per target ``count, correct, correct5`` (the target among the 5 highest logits),
    ``loss``; per example (one holding any real target)
    ``examples, steps, converged, residual`` (+ with ``with_jacobian``: ``jac``, the
    Hutchinson ``||J_f(z*)||_F^2 / d`` with ``eval.jac_probes`` probes, and ``spectral``,
    the power-method spectral radius of J_f(z*) with ``eval.spectral_iters`` VJPs, if
    not 0); and ``nfe``, the f evaluations of the solver loop (the most over devices).
    Probes and power-method starts come from each example's index in the evaluation set,
    so the numbers do not depend on the number of devices. ``memory``: the segment memory
    of a model with one (the previous batch's, :func:`objective.initial_memory` at the
    start of the set; the returned one is for the next batch), else None.
    """
    setup = objective.solvers_from_config(c)
    f = objective.cell_fn(model)

    def local(params, step_limit, inputs, targets, weights, first_index, memory):
        keys = None
        if with_jacobian:
            batch = inputs.shape[0]
            index = first_index + jax.lax.axis_index(DATA) * batch + jnp.arange(batch)
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(c.seed + 1), i))(index)
        out = objective.forward(
            model, params, inputs, mode="deq", config=setup.eval_forward, step_limit=step_limit,
            jr_keys=keys, jr_probes=c.eval.jac_probes, jr_mode=c.jr.mode, memory=memory, targets=targets,
        )
        r = out.result
        example = (weights.reshape(weights.shape[0], -1).max(axis=1) > 0).astype(jnp.float32)
        sums = {
            "count": weights,
            "correct": objective.accuracy_hits(out.logits, targets) * weights,
            "correct5": objective.accuracy_hits(out.logits, targets, 5) * weights,
            "loss": out.nll * weights,
            "examples": example,
            "steps": jnp.where(r.converged, r.n_steps, step_limit) * example,
            "converged": r.converged * example,
            "residual": r.rel_residual * example,
        }
        if with_jacobian:
            sums["jac"] = out.jr * example
            if c.eval.spectral_iters:
                z = jax.lax.stop_gradient(out.z)
                power_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
                radius = jacobian.spectral_radius(lambda zz: f(params, out.x, zz), z, power_keys, c.eval.spectral_iters)
                sums["spectral"] = radius * example
        totals = {k: jax.lax.psum(_sum_per_example(v), DATA) for k, v in sums.items()}
        return totals | {"nfe": jax.lax.pmax(r.f_evals.astype(jnp.float32), DATA)}, out.memory

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(DATA), P(DATA), P(DATA), P(), P(DATA)),
        out_specs=(P(), P(DATA)),
        check_vma=False,
    )
    replicated = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(DATA))
    return jax.jit(
        sharded,
        in_shardings=(replicated, replicated, data, data, data, replicated, data),
        out_shardings=(replicated, data),
    )


def _sum_per_example(v: Array) -> Array:
    """Sum of a ``[B]`` or ``[B, T]`` array in float32: each example's terms first, then the
    examples (two short sums rather than one long running sum over every token)."""
    v = v.astype(jnp.float32)
    return jnp.sum(jnp.sum(v.reshape(v.shape[0], -1), axis=1))


def init_state(model: nn.Module, c, tx: optax.GradientTransformation, sample_input, mesh: Mesh) -> TrainState:
    """Parameters from ``seed``, optimizer state, gamma schedule state; replicated on the mesh.

    ``sample_input``: ``[1, ...]`` array of the model's input shape and dtype.
    """
    schedule = schedules.from_config(c)

    memory = objective.initial_memory(model, c.train.batch_size)

    @functools.partial(jax.jit, out_shardings=state_sharding(mesh, TrainState(None, None, None, None, memory)))
    def init():
        sample = jnp.zeros(sample_input.shape, sample_input.dtype)
        params = model.init(jax.random.key(c.seed), sample, unroll=1)["params"]
        return TrainState(jnp.int32(0), params, tx.init(params), schedule.init(), memory)

    return init()
