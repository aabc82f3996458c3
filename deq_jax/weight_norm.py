"""Weight normalization (Salimans & Kingma, 2016), the reparametrization every cell of the
paper uses: each output unit's weight vector is ``w = g * v / ||v||``, so its norm is ``g``
whatever ``v`` is.

The layers: :class:`deq_jax.linen.WNDense` and :class:`deq_jax.linen.WNConv` (Flax Linen),
:class:`deq_jax.nnx.WNLinear` and :class:`deq_jax.nnx.WNConv` (Flax NNX). ``g`` starts at 1,
so each output unit starts with a unit-norm weight vector, for any fan-in.

Why not spectral normalization too: it bounds each layer's largest singular value, a
per-layer Lipschitz bound that a DEQ does not need (the solver only needs the whole cell's
Jacobian at the fixed point to be tame, which is what Jacobian regularization targets), and
it costs a power iteration per layer per step with state to carry; the paper does not use it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-12  # under the square root: a v of zeros gives w = 0, not NaN


def weight_norm(v: jax.Array, g: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``w = g * v / ||v||``, the norm taken over ``axes`` (every axis but the output one).

    Args:
      v: the direction, e.g. ``[in, out]`` (dense) or ``[kh, kw, in, out]`` (conv).
      g: ``[out]``, the norm of each output unit's weights.
      axes: the axes of ``v`` that make one output unit's weight vector.

    Returns:
      ``w``, shaped like ``v``.
    """
    return v * (g / jnp.sqrt(jnp.sum(jnp.square(v), axis=axes) + EPS))


def conv(x: jax.Array, w: jax.Array, strides: int) -> jax.Array:
    """The WN conv layers' convolution: ``x`` ``[B, H, W, C]``, ``w`` ``[k, k, C, out]``,
    "SAME" padding, square ``strides``, computed in ``x``'s dtype."""
    return jax.lax.conv_general_dilated(x, w.astype(x.dtype), (strides, strides), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
