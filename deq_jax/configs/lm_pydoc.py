"""Character-level DEQ-Transformer on the embedded pydoc corpus, with JR (no download).

Under 10 minutes on 2 CPU cores. ``--config.jr.gamma=0`` trains the same model without JR.
"""

from deq_jax.train.config import default_config


def get_config():
    c = default_config()
    c.data.name = "pydoc"
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.d_ff = 512
    c.model.pre_ln = False
    c.model.dropout = 0.0
    c.train.seq_len = 64
    c.train.batch_size = 16
    c.train.num_steps = 1500
    c.train.pretrain_steps = 200
    c.train.pretrain_layers = 2
    c.train.log_every = 25
    c.train.eval_every = 500
    c.train.checkpoint_every = 250
    c.forward.solver = "anderson"  # causal along the sequence (forward.causal); docs/guides/causal.md
    c.forward.max_steps = 12
    c.forward.random_lower = 2
    c.backward.max_steps = 12
    c.jr.gamma = 1.0
    c.jr.prob = 0.35
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.05
    c.eval.batch_size = 32
    c.eval.max_steps = 30
    c.eval.budgets = "1,2,4,6,8,10,12"
    c.eval.jac_probes = 2
    return c
