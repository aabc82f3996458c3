"""Training: configs, gamma schedules, pure jitted steps, checkpoints, the loop, plots."""

from deq_jax.train.config import default_config, resolve
from deq_jax.train.loop import train
from deq_jax.train.schedules import GammaState, adaptive, constant, staircase
from deq_jax.train.step import TrainState, make_eval_step, make_mesh, make_train_step

__all__ = [
    "GammaState",
    "TrainState",
    "adaptive",
    "constant",
    "default_config",
    "make_eval_step",
    "make_mesh",
    "make_train_step",
    "resolve",
    "staircase",
    "train",
]
