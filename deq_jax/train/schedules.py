"""Schedules for the Jacobian-regularization weight gamma, as pure ``(init, update)`` pairs.

``state = schedule.init()``; the weight used at training step t is ``state.gamma``;
after the step, ``state = schedule.update(state, step=t, fwd_steps=..., fwd_residual=...)``
gives the weight for step t + 1. All functions are jittable.

* ``constant``: gamma never changes.
* ``staircase`` (the official code's "jac_incremental"): during pretraining gamma is
  ``gamma0``; after it, ``gamma0 + delta * floor((t - pretrain_steps) / every)``.
* ``adaptive`` (ours): a feedback rule on the forward solver. With ``s_t`` the batch
  mean of forward steps (an example that did not reach tol counts as the step limit)
  and ``r_t`` the batch mean relative residual, exponential moving averages
  ``S <- ema S + (1 - ema) s_t`` and ``R <- ema R + (1 - ema) r_t`` (started at the
  targets) drive
      gamma <- min(gamma * up, gamma_max)     if S > target_steps or R > target_residual
      gamma <- max(gamma * down, gamma_min)   if S < (1 - slack) target_steps and R <= target_residual
      gamma unchanged                          otherwise.
  It only moves in DEQ mode (pretraining has no solver), and ignores a step whose
  measurements are not finite. So the penalty grows while
  the solver struggles, which the paper found necessary as ||J|| keeps creeping up,
  and relaxes once the solver is comfortably fast, returning capacity to the task loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class GammaState(NamedTuple):
    """``gamma``: the weight for the next step; ``ema_steps``/``ema_residual``: adaptive's averages."""

    gamma: Array
    ema_steps: Array
    ema_residual: Array


class GammaSchedule(NamedTuple):
    init: Callable[[], GammaState]
    update: Callable[..., GammaState]


def _init(gamma0, target_steps=0.0, target_residual=0.0):
    def init():
        return GammaState(jnp.float32(gamma0), jnp.float32(target_steps), jnp.float32(target_residual))

    return init


def constant(gamma0: float) -> GammaSchedule:
    def update(state, *, step, fwd_steps, fwd_residual, in_deq):
        del step, fwd_steps, fwd_residual, in_deq
        return state

    return GammaSchedule(_init(gamma0), update)


def staircase(gamma0: float, delta: float, every: int, pretrain_steps: int) -> GammaSchedule:
    def update(state, *, step, fwd_steps, fwd_residual, in_deq):
        del fwd_steps, fwd_residual, in_deq
        stairs = jnp.maximum(step + 1 - pretrain_steps, 0) // every
        return state._replace(gamma=jnp.float32(gamma0) + delta * stairs.astype(jnp.float32))

    return GammaSchedule(_init(gamma0), update)


def adaptive(
    gamma0: float,
    *,
    target_steps: float,
    target_residual: float,
    slack: float,
    up: float,
    down: float,
    ema: float,
    gamma_min: float,
    gamma_max: float,
) -> GammaSchedule:
    def update(state, *, step, fwd_steps, fwd_residual, in_deq):
        del step
        # A non-finite measurement (a step with NaN in it) is ignored, not averaged in: one
        # NaN would otherwise stay in the moving average forever.
        measured = jnp.isfinite(fwd_steps) & jnp.isfinite(fwd_residual)
        s = ema * state.ema_steps + (1 - ema) * fwd_steps
        r = ema * state.ema_residual + (1 - ema) * fwd_residual
        over = (s > target_steps) | (r > target_residual)
        under = (s < (1 - slack) * target_steps) & (r <= target_residual)
        gamma = jnp.where(over, jnp.minimum(state.gamma * up, gamma_max), state.gamma)
        gamma = jnp.where(under & ~over, jnp.maximum(state.gamma * down, gamma_min), gamma)
        new = GammaState(gamma.astype(jnp.float32), s.astype(jnp.float32), r.astype(jnp.float32))
        return jax.tree.map(lambda a, b: jnp.where(in_deq & measured, a, b), new, state)

    return GammaSchedule(_init(gamma0, target_steps, target_residual), update)


def from_config(c) -> GammaSchedule:
    """The schedule named by ``c.jr.schedule`` (``c`` a resolved training config)."""
    j = c.jr
    if j.schedule == "constant":
        return constant(j.gamma)
    if j.schedule == "staircase":
        return staircase(j.gamma, j.staircase_delta, j.staircase_every, c.train.pretrain_steps)
    if j.schedule == "adaptive":
        return adaptive(
            j.gamma,
            target_steps=j.target_steps,
            target_residual=j.target_residual,
            slack=j.slack,
            up=j.up,
            down=j.down,
            ema=j.ema,
            gamma_min=j.gamma_min,
            gamma_max=j.gamma_max,
        )
    raise ValueError(f"unknown jr.schedule {j.schedule!r}")
