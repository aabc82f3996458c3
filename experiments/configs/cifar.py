"""CIFAR-10 with the paper's larger MDEQ (4 branches, 28/56/112/224 channels)."""

from experiments.configs import cifar_tiny


def get_config():
    c = cifar_tiny.get_config()
    c.model.size = "cifar"
    c.train.batch_size = 128
    c.train.num_steps = 39000  # about 100 epochs
    c.train.pretrain_steps = 3000
    c.train.pretrain_layers = 6
    c.eval.batch_size = 500
    return c
