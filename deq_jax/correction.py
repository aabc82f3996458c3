"""Fixed-point correction: supervise several iterates of the forward solve, not only z*.

From Bai, Geng, Kolter & Koltun's later work on DEQ training ("Deep Equilibrium Optical
Flow Estimation", 2022) and torchdeq's ``n_states`` / ``fp_correction``. The forward solve
records ``n_states`` iterates at uniformly spaced step counts ``k_1 < ... < k_n = K``
(``K``: the solve's step limit), and the loss is

    L_fpc = sum_i gamma^(n - i) * L(head(z_i)),    i = 1..n,

so the last state, z* itself, has weight 1 and earlier ones decay by ``gamma``. The last
state carries the layer's own gradient (implicit, phantom or reversible); each earlier one is
``phantom`` damped applications of f from that iterate, held constant
(``stop_gradient``), differentiated through those applications only (torchdeq's
default: one undamped step). Supervising early iterates asks the cell to reach a good
answer in few steps, which is what a forward budget at test time needs.

    correction = deq_jax.Correction(n_states=3, gamma=0.8)
    z, stats = deq_jax.equilibrium(f, params, x, z0, correction=correction)
    loss = correction.loss(lambda z: task_loss(head(z)), stats.states)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from deq_jax import deq

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Correction:
    """Which iterates are supervised, and with what weights (hashable: a static argument).

    Attributes:
      n_states: how many states are supervised, the last being z* (1: z* only, no
        correction). At most the solve's step limit.
      gamma: weight decay towards earlier states, in (0, 1]: state i of n has weight
        ``gamma ** (n - 1 - i)`` (i from 0).
      phantom: the gradient of each earlier state: damped f applications from the
        (constant) iterate, :class:`deq_jax.Phantom` (default: one step, no damping).
    """

    n_states: int = 2
    gamma: float = 0.8
    phantom: deq.Phantom = deq.Phantom(1, 0.0)

    def __post_init__(self):
        if isinstance(self.n_states, bool) or not isinstance(self.n_states, int) or self.n_states < 1:
            raise ValueError(f"Correction.n_states must be a positive int, got {self.n_states!r}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"Correction.gamma must be in (0, 1], got {self.gamma!r}")
        if not isinstance(self.phantom, deq.Phantom):
            raise ValueError(f"Correction.phantom must be a deq_jax.Phantom, got {self.phantom!r}")

    def steps(self, max_steps: int) -> tuple[int, ...]:
        """The step counts of the supervised states, ``n_states`` of them, the last ``max_steps``
        and the others spaced by ``max_steps // n_states`` below it (torchdeq's indexing):
        ``Correction(3).steps(12) == (4, 8, 12)``, ``Correction(3).steps(10) == (4, 7, 10)``."""
        if self.n_states > max_steps:
            raise ValueError(
                f"Correction.n_states={self.n_states} supervises more states than the solve's {max_steps} steps"
            )
        gap = max_steps // self.n_states
        return tuple(max_steps - (self.n_states - 1 - i) * gap for i in range(self.n_states))

    def weights(self) -> tuple[float, ...]:
        """``gamma ** (n - 1 - i)`` for i = 0..n-1: the last state (z*) has weight 1."""
        return tuple(self.gamma ** (self.n_states - 1 - i) for i in range(self.n_states))

    def loss(self, loss_fn: Callable[[PyTree], Array], states: Sequence[PyTree]) -> Array:
        """``sum_i weights[i] * loss_fn(states[i])`` over the states a layer returned
        (``DEQStats.states``; the last is z*)."""
        if len(states) != self.n_states:
            raise ValueError(f"expected {self.n_states} states (DEQStats.states), got {len(states)}")
        return sum(w * loss_fn(z) for w, z in zip(self.weights(), states, strict=True))


def with_snapshots(forward: deq.SolverConfig, correction: Correction) -> deq.SolverConfig:
    """``forward`` recording the iterates at the correction's steps before the last."""
    snapshots = correction.steps(forward.max_steps)[:-1]
    return dataclasses.replace(forward, options={**dict(forward.options), "snapshots": snapshots})


def supervised_states(
    f: Callable, params: PyTree, x: PyTree, snapshots: Sequence[PyTree], z_star: PyTree, phantom: deq.Phantom
) -> tuple[PyTree, ...]:
    """The states to supervise: for each recorded iterate z_k, ``phantom`` damped applications
    of f from ``stop_gradient(z_k)`` (differentiable in params and x through them), then
    ``z_star`` as it is. Returns ``len(snapshots) + 1`` pytrees shaped like z*."""
    earlier = tuple(
        deq.damped_unroll(f, params, x, jax.lax.stop_gradient(z), phantom.steps, phantom.damping) for z in snapshots
    )
    return earlier + (z_star,)

