"""The Quickstart default: MDEQ (digits size) on scikit-learn's 8x8 digits, with JR.

500 steps (150 unrolled pretraining, 350 DEQ), JR γ = 4 from the DEQ phase on (the paper's
protocol: no JR while pretraining), p = 0.5. About 1.5 minutes on 2 CPU cores (22 s of
them training, 2026-12-06). Override any key from the command line, e.g.
``--config.jr.gamma=0`` (no JR) or ``--config.jr.schedule=adaptive``.
"""

from deq_jax.train.config import default_config


def get_config():
    c = default_config()  # digits defaults: every key is listed there
    return c
