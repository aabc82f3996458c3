"""Word-level DEQ-Transformer on the embedded pydoc corpus: adaptive embeddings/softmax and
segment memory, the WikiText-103 model's parts at CPU scale (no download).

``pydoc_words``: the pydoc topics text split into words and punctuation, a
frequency-sorted vocabulary of 2048 types with ``<unk>`` (``deq_jax.data.text``). Adaptive
clusters [0, 256), [256, 1024), [1024, 2048) of widths 128, 64, 32 (``div_val`` 2); each
64-token segment attends to the 64 equilibrium states before it (``--config.model.mem_len=0``
trains the same model without memory). Otherwise ``lm_pydoc``'s model and training, pre-LN,
1000 steps.
"""

from deq_jax.configs import lm_pydoc


def get_config():
    c = lm_pydoc.get_config()
    c.data.name = "pydoc_words"
    c.model.pre_ln = True
    c.model.mem_len = 64
    c.model.cutoffs = "256,1024"
    c.model.div_val = 2
    c.train.num_steps = 1000
    c.eval.batch_size = 16
    c.eval.budgets = "2,4,8,12"
    return c
