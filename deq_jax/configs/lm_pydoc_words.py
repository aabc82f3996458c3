"""Word-level DEQ-Transformer on the embedded pydoc corpus: adaptive embeddings/softmax and
segment memory, the WikiText-103 model's parts at CPU scale (no download).

``pydoc_words``: the pydoc topics text split into words and punctuation, a
frequency-sorted vocabulary of 2048 types with ``<unk>`` (``deq_jax.data.text``). Adaptive
clusters [0, 256), [256, 1024), [1024, 2048) of widths 128, 64, 32 (``div_val`` 2); each
64-token segment attends to the 64 equilibrium states before it (``--config.model.mem_len=0``
trains the same model without memory). Pre-LN, causal Anderson forward, JR γ 1 on 35% of
steps, as ``lm_pydoc``.
"""

from deq_jax.train.config import default_config


def get_config():
    c = default_config()
    c.data.name = "pydoc_words"
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.d_ff = 512
    c.model.pre_ln = True
    c.model.dropout = 0.0
    c.model.mem_len = 64
    c.model.cutoffs = "256,1024"
    c.model.div_val = 2
    c.train.seq_len = 64
    c.train.batch_size = 16
    c.train.num_steps = 1000
    c.train.pretrain_steps = 200
    c.train.pretrain_layers = 2
    c.train.log_every = 25
    c.train.eval_every = 500
    c.train.checkpoint_every = 250
    c.forward.solver = "anderson"
    c.forward.max_steps = 12
    c.forward.random_lower = 2
    c.backward.max_steps = 12
    c.jr.gamma = 1.0
    c.jr.prob = 0.35
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.05
    c.eval.batch_size = 16
    c.eval.max_steps = 30
    c.eval.budgets = "2,4,8,12"
    c.eval.jac_probes = 2
    return c
