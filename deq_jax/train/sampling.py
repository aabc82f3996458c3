"""Text generation from a trained DEQ-Transformer run.

    c, task, params, step = load_run("runs/lm_pydoc")
    text = generate(task, params, c, "The ", length=200, temperature=0.8, seed=0)

Each new token needs the equilibrium of the whole context window (a DEQ keeps no cache
of past states), solved with the run's trained forward solver and step limit. The
context is the last ``train.seq_len`` tokens, left-aligned in a fixed-size window so
that one compiled function serves every step. With the default causal solver
(``forward.causal``) the padding after the last real token cannot change its logits at
all; an ordinary solver would let it leak in before convergence.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax.train import checkpoint, objective
from deq_jax.train.config import resolve
from deq_jax.train.tasks import Task, make_task


def open_run(run_dir: str | os.PathLike):
    """``(config, task, params_template)`` of a run folder, no parameters loaded.

    ``params_template`` holds ``jax.ShapeDtypeStruct`` leaves, for
    :func:`deq_jax.train.checkpoint.restore_params` (e.g. to load every checkpoint).
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    c = resolve(json.loads(config_path.read_text()))
    task = make_task(c)

    def init():
        sample = jnp.zeros(task.sample_input.shape, task.sample_input.dtype)
        return task.model.init(jax.random.key(0), sample, unroll=1)

    template = jax.eval_shape(init)["params"]
    return c, task, template


def load_run(run_dir: str | os.PathLike, step: int | None = None):
    """``(config, task, params, step)`` of a run folder's newest checkpoint (or ``step``)."""
    c, task, template = open_run(run_dir)
    params, step = checkpoint.restore_params(run_dir, template, step)
    return c, task, params, step


def next_token_logits_fn(task: Task, c):
    """Jitted ``(params, window [1, T] int32, position) -> logits [vocab]`` at ``position``.

    One function per (model, forward solver): repeated :func:`generate` calls on the same
    run compile once.
    """
    forward = objective.solvers_from_config(c).forward
    return _logits_fn(task.model, dataclasses.replace(forward, max_steps=c.forward.max_steps))


@functools.lru_cache(maxsize=8)
def _logits_fn(model, forward):
    @jax.jit
    def logits_at(params, window, position):
        out = objective.forward(model, params, window, mode="deq", config=forward)
        return out.logits[0, position].astype(jnp.float32)

    return logits_at


def generate(task: Task, params, c, prompt: str, *, length: int, temperature: float = 1.0, seed: int = 0) -> str:
    """``length`` tokens sampled after ``prompt``, decoded (the prompt not included).

    ``temperature`` 0 picks the most likely token; otherwise token t is drawn from
    ``softmax(logits / temperature)`` with the key ``fold_in(key(seed), t)``, so the same
    seed gives the same text. Each token is predicted from the last ``train.seq_len``
    tokens alone: a model with segment memory (``model.mem_len``) samples with an empty
    memory.
    """
    if not task.language:
        raise ValueError(f"{task.name} is not a language-modelling run; nothing to sample")
    if length < 0 or temperature < 0:
        raise ValueError(f"length and temperature must be >= 0, got {length} and {temperature}")
    ids = list(task.data.encode(prompt))
    if not ids:
        raise ValueError("the prompt must hold at least one token")
    seq_len = c.train.seq_len
    logits_at = next_token_logits_fn(task, c)
    key = jax.random.key(seed)
    out = []
    for t in range(length):
        context = ids[-seq_len:]
        window = np.zeros((1, seq_len), np.int32)
        window[0, : len(context)] = context
        logits = logits_at(params, window, len(context) - 1)
        if temperature == 0:
            token = int(jnp.argmax(logits))
        else:
            token = int(jax.random.categorical(jax.random.fold_in(key, t), logits / temperature))
        ids.append(token)
        out.append(token)
    return task.data.decode(out)
