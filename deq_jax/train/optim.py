"""The optimizer of a training config: Adam(W) or SGD, cosine schedule with warm-up, clipping."""

from __future__ import annotations

import optax


def learning_rate(c) -> optax.Schedule:
    """Linear warm-up from 0 to ``optim.learning_rate``, then cosine decay to ``min_lr_ratio`` of it."""
    o = c.optim
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.learning_rate,
        warmup_steps=o.warmup_steps,
        decay_steps=max(c.train.num_steps, o.warmup_steps + 1),
        end_value=o.learning_rate * o.min_lr_ratio,
    )


def make_optimizer(c) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, lr_schedule)`` for a resolved config ``c``."""
    o = c.optim
    lr = learning_rate(c)
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    if o.name == "adam":
        parts.append(optax.adamw(lr, weight_decay=o.weight_decay) if o.weight_decay else optax.adam(lr))
    else:
        if o.weight_decay:
            parts.append(optax.add_decayed_weights(o.weight_decay))
        parts.append(optax.sgd(lr, momentum=o.momentum, nesterov=True))
    return optax.chain(*parts), lr
