"""Solver and Jacobian measurements of a trained checkpoint, shared by the reproduction scripts.

    c, task, template = open_run("runs/a")
    fn = make_measure(task, c, steps=12, jacobian=True)
    m = measure(fn, params, task, batches=1)   # per-example numpy arrays

For each example of the first ``batches`` evaluation batches (at most ``max_examples``):

* ``forward``: the relative residual ||f(z)-z|| / ||f(z)|| after each of ``steps`` steps
  of the run's forward solver from the model's z0 (tolerance too small to stop early),
  ``[steps + 1, N]``;
* ``backward``: the relative residual of the implicit backward solve u = u J_f(z*) + g
  at that solution, g = d loss / d z* (the cotangent training uses), from u = g,
  ``[steps + 1, N]``;
* with ``jacobian=True``: ``frobenius`` ``[N]``, the Hutchinson estimate of
  ||J_f(z)||_F^2 / d with ``probes`` Gaussian probes, and ``spectral_radius`` ``[N]``,
  rho(J_f(z)) by the power method (``power_iters`` vector-Jacobian products), both at
  the ``steps``-step iterate z;
* with ``converged_steps=K`` (and ``jacobian=True``): the same two at a *converged*
  fixed point, from a second forward solve of at most K steps with tolerance
  ``converged_tol`` (Broyden/Anderson memory K by default, so no secant pair is ever
  dropped): ``converged_frobenius``, ``converged_spectral_radius``, and what that solve
  reached, ``converged_residual`` (relative residual of the iterate used) and
  ``converged_steps`` ``[N]``.

``memory`` sets the solvers' memory (Broyden's secant pairs, Anderson's m; default: the
solver's own, 20 for Broyden) for the recorded forward and backward solves: a control for
effects of a full memory ring (pairs start to be dropped after ``memory`` steps).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import deq_jax
from deq_jax.train import objective

NEVER = 1e-12  # a tolerance no solver reaches: every step is recorded


WITH_MEMORY = ("broyden", "anderson")  # solvers with a ``memory`` option


def _with_memory(solver: deq_jax.SolverConfig, memory: int | None) -> deq_jax.SolverConfig:
    if memory is None:
        return solver
    if solver.name not in WITH_MEMORY:
        raise ValueError(f"memory={memory} given, but the {solver.name} solver has no memory")
    return dataclasses.replace(solver, options={**dict(solver.options), "memory": int(memory)})


def make_measure(task, c, steps: int, *, jacobian: bool = False, probes: int = 8, power_iters: int = 100,
                 memory: int | None = None, converged_steps: int = 0, converged_tol: float = 1e-6,
                 converged_memory: int | None = None):
    """Jitted ``(params, inputs, targets, weights, key) -> dict`` of per-example arrays (see module doc).

    ``memory``: the recorded solves' memory (default: the solver's). ``converged_steps``
    (needs ``jacobian``): also measure the Jacobian at a fixed point solved to
    ``converged_tol`` within that many steps, with memory ``converged_memory`` (default
    ``converged_steps``). Runs of the same model and solvers share one function
    (compiled once).
    """
    if converged_steps and not jacobian:
        raise ValueError("converged_steps measures the Jacobian: pass jacobian=True")
    # The run's forward solver (causal for text models unless the run turned it off).
    run_forward = objective.solvers_from_config(c).forward
    forward = _with_memory(dataclasses.replace(run_forward, max_steps=steps, tol=NEVER), memory)
    backward = _with_memory(deq_jax.SolverConfig(c.backward.solver, steps, NEVER, c.backward.stop_mode), memory)
    converged = None
    if converged_steps:
        converged = dataclasses.replace(run_forward, max_steps=converged_steps, tol=converged_tol)
        if converged.name in WITH_MEMORY:
            converged = _with_memory(converged, converged_memory or converged_steps)
    return _make(task.model, forward, backward, jacobian, probes, power_iters, converged)


@functools.lru_cache(maxsize=8)
def _make(model, forward, backward, jacobian, probes, power_iters, converged=None):
    f = objective.cell_fn(model)

    @jax.jit
    def fn(params, inputs, targets, weights, key):
        out = objective.forward(model, params, inputs, mode="deq", config=forward)
        z = jax.lax.stop_gradient(out.z)

        def loss(z):
            logits = model.apply({"params": params}, z, method="head")
            return jnp.sum(objective.cross_entropy(logits, targets) * weights) / jnp.sum(weights)

        _, adj = deq_jax.adjoint_solve(f, params, out.x, z, jax.grad(loss)(z), backward)
        result = {"forward": out.result.rel_trace, "backward": adj.rel_trace}
        if jacobian:
            probe_key, power_key = jax.random.split(key)
            keys = jax.random.split(probe_key, inputs.shape[0])
            result["frobenius"] = objective.jacobian_penalty(model, params, out.x, z, keys, probes)
            result["spectral_radius"] = deq_jax.spectral_radius(
                lambda zz: f(params, out.x, zz), z, power_key, power_iters
            )
        if jacobian and converged is not None:
            # Same probes and power-method start as at the recorded iterate.
            far = objective.forward(model, params, inputs, mode="deq", config=converged)
            zc = jax.lax.stop_gradient(far.z)
            result["converged_residual"] = far.result.rel_residual
            result["converged_steps"] = far.result.n_steps
            result["converged_frobenius"] = objective.jacobian_penalty(model, params, out.x, zc, keys, probes)
            result["converged_spectral_radius"] = deq_jax.spectral_radius(
                lambda zz: f(params, out.x, zz), zc, power_key, power_iters
            )
        return result

    return fn


def measure(fn, params, task, batches: int | None = 1, max_examples: int | None = None, seed: int = 0) -> dict:
    """``fn`` (from :func:`make_measure`) on the first ``batches`` batches (``None``: all) of
    the task's evaluation split, cut to at most ``max_examples`` examples in all; padding
    examples dropped. Traces are ``[steps + 1, N]``, an example that stopped early
    keeping its last residual; the rest ``[N]``."""
    parts, left = [], max_examples if max_examples is not None else float("inf")
    for i, batch in enumerate(task.eval_sets[task.eval_split]()):
        if (batches is not None and i == batches) or left <= 0:
            break
        inputs, targets, weights = (np.asarray(a)[: int(min(left, len(a)))] for a in batch)
        out = jax.device_get(fn(params, inputs, targets, weights, jax.random.key(seed + i)))
        real = weights.reshape(len(weights), -1).max(axis=1) > 0
        parts.append({k: np.asarray(v)[..., real] for k, v in out.items()})
        left -= len(inputs)
    if not parts:
        raise ValueError(f"the {task.eval_split} split of {task.name} has no batches")
    result = {k: np.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}
    for key in ("forward", "backward"):
        result[key] = carry_forward(result[key])
    return result


def carry_forward(trace: np.ndarray) -> np.ndarray:
    """An example that stopped (NaN after its last step) keeps its last residual."""
    out = trace.copy()
    for t in range(1, len(out)):
        out[t] = np.where(np.isnan(out[t]), out[t - 1], out[t])
    return out
