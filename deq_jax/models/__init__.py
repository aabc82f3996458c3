"""Flax models whose core is an equilibrium cell inside a :class:`deq_jax.linen.DEQ` layer."""

from deq_jax.models.adaptive import AdaptiveSoftmax
from deq_jax.models.deq_transformer import (
    AttendedMemory,
    DEQTransformer,
    DEQTransformerCell,
    Memory,
    empty_memory,
    update_memory,
)
from deq_jax.models.mdeq import MDEQ, SIZES, MDEQCell, MDEQSize, get_size
from deq_jax.models.output import ModelOutput

__all__ = [
    "AdaptiveSoftmax",
    "AttendedMemory",
    "DEQTransformer",
    "DEQTransformerCell",
    "MDEQ",
    "MDEQCell",
    "MDEQSize",
    "Memory",
    "ModelOutput",
    "SIZES",
    "empty_memory",
    "get_size",
    "update_memory",
]
