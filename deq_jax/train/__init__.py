"""Training: configs, tasks, gamma schedules, pure jitted steps, checkpoints, the loop, plots,
and sampling from language-model runs."""

from deq_jax.train.config import default_config, resolve
from deq_jax.train.loop import describe, train
from deq_jax.train.sampling import generate, load_run, open_run
from deq_jax.train.schedules import GammaState, adaptive, constant, staircase
from deq_jax.train.step import TrainState, make_eval_step, make_mesh, make_train_step
from deq_jax.train.tasks import Task, make_task

__all__ = [
    "GammaState",
    "Task",
    "TrainState",
    "adaptive",
    "constant",
    "default_config",
    "describe",
    "generate",
    "load_run",
    "make_eval_step",
    "make_mesh",
    "make_task",
    "make_train_step",
    "open_run",
    "resolve",
    "staircase",
    "train",
]
