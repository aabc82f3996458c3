"""Flax models whose core is an equilibrium cell."""

from deq_jax.models.mdeq import MDEQ, SIZES, MDEQSize, get_size

__all__ = ["MDEQ", "MDEQSize", "SIZES", "get_size"]
