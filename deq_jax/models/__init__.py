"""Flax models whose core is an equilibrium cell."""

from deq_jax.models.deq_transformer import DEQTransformer
from deq_jax.models.mdeq import MDEQ, SIZES, MDEQSize, get_size

__all__ = ["DEQTransformer", "MDEQ", "MDEQSize", "SIZES", "get_size"]
