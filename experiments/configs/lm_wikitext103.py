"""Word-level DEQ-Transformer on WikiText-103, following the paper's Table 4 (needs GPUs).

Point ``--config.data.data_dir`` at the folder holding ``wiki.{train,valid,test}.tokens``
(unzipped ``wikitext-103-v1.zip``). From Table 4 and the official scripts: d_model 700,
10 heads of 70, d_inner 48000, segments of 150 tokens, batch 60, forward/backward step
limits 12/12, JR gamma 1.6 -> 2.5 with p = 0.35 and 1 probe, recurrent dropout 0.06,
Adam 2.5e-4 with 16k warm-up steps and cosine decay over 300k steps, 32k pretraining steps
with 2 unrolled layers, weight norm, LayerNorm (pre-LN, the paper's JR model).

Differences from the official model, where the architecture here does not allow it: the
input and output embeddings are one full tied softmax over the ~268k-word vocabulary (no
adaptive embedding/softmax), positions are rotary (not Transformer-XL's relative encoding),
and there is no memory of previous segments (each 150-token window is scored on its own),
so perplexities are not comparable with the paper's.
"""

from deq_jax.train.config import default_config


def get_config():
    c = default_config()
    c.data.name = "wikitext103"
    c.data.data_dir = ""  # required: --config.data.data_dir=/path/to/wikitext-103
    c.model.d_model = 700
    c.model.num_heads = 10
    c.model.d_ff = 48000
    c.model.pre_ln = True
    c.model.tie_embeddings = True
    c.model.dropout = 0.06
    c.train.seq_len = 150
    c.train.batch_size = 60
    c.train.num_steps = 300_000
    c.train.pretrain_steps = 32_000
    c.train.pretrain_layers = 2
    c.train.log_every = 200
    c.train.eval_every = 5000
    c.train.checkpoint_every = 5000
    c.forward.max_steps = 12
    c.forward.random_lower = 2
    c.backward.max_steps = 12
    c.jr.gamma = 1.6
    c.jr.schedule = "staircase"
    c.jr.staircase_delta = 0.1
    c.jr.staircase_every = 29_700  # 9 steps of 0.1 over the 268k DEQ steps: 1.6 -> 2.5
    c.jr.prob = 0.35
    c.jr.num_probes = 1
    c.optim.learning_rate = 2.5e-4
    c.optim.warmup_steps = 16_000
    c.eval.batch_size = 10
    c.eval.max_steps = 30
    c.eval.budgets = "all"
    c.eval.jac_probes = 1
    return c
