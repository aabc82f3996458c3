"""Character-level DEQ-Transformer on tiny_shakespeare (TFDS, prepared beforehand), with JR.

Prepare once (internet): ``tfds build tiny_shakespeare --file_format array_record``; pass
``--config.data.data_dir`` if it is not under ~/tensorflow_datasets. About 1M training
characters; sized for a GPU (tens of minutes), slow but possible on CPU.
"""

from deq_jax.configs import lm_pydoc


def get_config():
    c = lm_pydoc.get_config()
    c.data.name = "tiny_shakespeare"
    c.model.d_model = 256
    c.model.num_heads = 8
    c.model.d_ff = 1024
    c.model.dropout = 0.1
    c.train.seq_len = 128
    c.train.batch_size = 32
    c.train.num_steps = 20000
    c.train.pretrain_steps = 1000
    c.train.log_every = 100
    c.train.eval_every = 2000
    c.train.checkpoint_every = 1000
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 500
    c.eval.batch_size = 32
    c.eval.budgets = "all"
    return c
