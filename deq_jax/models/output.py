"""What the models return: logits and the equilibrium they came from."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from deq_jax.layer import DEQStats


class ModelOutput(NamedTuple):
    """A model's forward pass.

    Attributes:
      logits: ``[B, num_classes]`` (MDEQ) or ``[B, T, vocab]`` (DEQ-Transformer).
      z: the equilibrium state (or the state after ``unroll`` cells), the cell's z structure.
      x: the cell's input (injection and dropout masks), for other quantities of the same
        map (e.g. its spectral radius).
      stats: the DEQ layer's :class:`deq_jax.DEQStats` (forward solver result, JR term).
      memory: the segment memory for the next segment (models with one), else None.
      target_log_prob: ``log p(target)`` per target when the call was given targets
        (language models), else None.
      corrections: with fixed-point correction (``correction=`` in the call), one
        ``(logits, target_log_prob)`` pair per supervised state before z*
        (``stats.states[:-1]``), each read out like ``logits`` and ``target_log_prob``;
        else None.
    """

    logits: jax.Array
    z: Any
    x: Any
    stats: DEQStats
    memory: Any = None
    target_log_prob: Any = None
    corrections: tuple | None = None
