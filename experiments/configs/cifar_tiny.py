"""CIFAR-10 with the official TINY MDEQ (2 branches x 24 channels), the paper's recipe.

Paper (Table 4, CIFAR-10): batch 96, Adam 1e-3, forward/backward limits 7/8, gamma 0.5,
JR frequency p = 0.05, 1 probe, GroupNorm + weight norm, dropout 0.25, cosine schedule,
3000 pretraining steps with 10 unrolled layers, 50 epochs. Needs a GPU for full length.
"""

from deq_jax.train.config import default_config


def get_config():
    c = default_config()
    c.data.name = "cifar10"
    c.model.size = "tiny"
    c.model.dropout = 0.25
    c.train.batch_size = 96
    c.train.num_steps = 26000  # about 50 epochs of 50k images at batch 96
    c.train.pretrain_steps = 3000
    c.train.pretrain_layers = 10
    c.train.log_every = 100
    c.train.eval_every = 2000
    c.train.checkpoint_every = 1000
    c.forward.max_steps = 7
    c.forward.random_lower = 2
    c.backward.max_steps = 8
    c.jr.gamma = 0.5
    c.jr.prob = 0.05
    c.jr.num_probes = 1
    c.jr.target_steps = 5.0
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 500
    c.eval.batch_size = 500
    c.eval.max_steps = 30
    return c
