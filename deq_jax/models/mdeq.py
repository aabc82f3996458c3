"""Multiscale deep equilibrium model (MDEQ, Bai, Koltun & Kolter 2020) in Flax Linen.

The model is split into the pieces a DEQ needs, each a method usable with
``model.apply(variables, ..., method=...)``:

* :meth:`MDEQ.inject`: images ``[B, H, W, C_in]`` -> the cell's input ``x`` (stem
  features for the highest-resolution branch, plus the variational-dropout masks,
  drawn once per forward pass so every solver step sees the same mask);
* :meth:`MDEQ.initial_state`: ``x`` -> ``z0``, a tuple of zero feature maps, one per
  branch: ``[B, H / 2^i, W / 2^i, channels[i]]``;
* :meth:`MDEQ.cell`: ``f(x, z) -> z``, one application of the weight-tied cell
  (per-branch residual blocks, then multi-resolution fusion);
* :meth:`MDEQ.head`: ``z -> logits [B, num_classes]``.

``deq_jax.train.objective`` ties them together through ``deq_jax.fixed_point`` with
``f(params, x, z) = model.apply({"params": params}, x, z, method=MDEQ.cell)``, so the
parameters reach the implicit layer as an argument, never by closure.

Normalization is GroupNorm throughout (no batch statistics: examples stay independent,
which per-example solver stopping needs, and there is no mutable state to shard).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MDEQSize:
    """Widths of an MDEQ.

    Attributes:
      channels: per-branch channels of the equilibrium state, highest resolution first;
        branch i works at ``1 / 2^i`` of the stem's resolution.
      expand: the residual block's inner width is ``expand * channels[i]``.
      head_channels: per-branch channels of the classification head.
      final_channels: width of the head's last 1x1 conv before pooling.
      num_groups: GroupNorm groups (must divide every width it normalizes).
      stem_stride: 1 or 2; 2 halves the resolution in the stem (large images).
    """

    channels: tuple[int, ...]
    expand: int
    head_channels: tuple[int, ...]
    final_channels: int
    num_groups: int
    stem_stride: int = 1

    def __post_init__(self):
        if any(c <= 0 for c in self.channels):
            raise ValueError(f"channels must be positive, got {self.channels}")
        if len(self.channels) < 1 or len(self.head_channels) != len(self.channels):
            raise ValueError(f"need one head width per branch, got {self.channels} and {self.head_channels}")
        widths = list(self.channels) + [c * self.expand for c in self.channels]
        bad = [w for w in widths if w % self.num_groups]
        if bad:
            raise ValueError(f"num_groups={self.num_groups} must divide every cell width; it does not divide {bad}")


SIZES = {
    # 8x8 digits: branches at 8x8 and 4x4.
    "digits": MDEQSize(channels=(16, 32), expand=2, head_channels=(16, 32), final_channels=128, num_groups=4),
    # The official TINY classification config: 2 branches of 24 channels.
    "tiny": MDEQSize(channels=(24, 24), expand=5, head_channels=(8, 16), final_channels=200, num_groups=4),
    # The paper's CIFAR-10 MDEQ: 4 branches, 28/56/112/224 channels.
    "cifar": MDEQSize(
        channels=(28, 56, 112, 224), expand=5, head_channels=(14, 28, 56, 112), final_channels=1680, num_groups=4
    ),
}


def get_size(size: str | MDEQSize) -> MDEQSize:
    if isinstance(size, MDEQSize):
        return size
    if size not in SIZES:
        raise ValueError(f"unknown MDEQ size {size!r}; choose one of {sorted(SIZES)}")
    return SIZES[size]


class WNConv(nn.Module):
    """Weight-normalized 2-D conv without bias: ``w = g * v / ||v||`` per output channel.

    ``g`` starts at 1, so each output filter starts with unit norm (the variance of a
    LeCun-normal init, for any fan-in).
    """

    features: int
    kernel_size: int = 3
    strides: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        v = self.param("v", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        g = self.param("g", nn.initializers.ones, (self.features,))
        norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=(0, 1, 2)) + 1e-12)
        w = (v * (g / norm)).astype(x.dtype)
        return jax.lax.conv_general_dilated(
            x, w, (self.strides, self.strides), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )


class ResidualBlock(nn.Module):
    """conv -> GN -> ReLU -> dropout -> conv -> GN, + injection, + z, ReLU, GN."""

    channels: int
    expand: int
    num_groups: int

    @nn.compact
    def __call__(self, z: Array, injection: Array | None, mask: Array | None) -> Array:
        h = WNConv(self.channels * self.expand)(z)
        h = nn.relu(nn.GroupNorm(self.num_groups)(h))
        if mask is not None:
            h = h * mask
        h = nn.GroupNorm(self.num_groups)(WNConv(self.channels)(h))
        if injection is not None:
            h = h + injection
        return nn.GroupNorm(self.num_groups)(nn.relu(h + z))


class Fuse(nn.Module):
    """Multi-resolution fusion: every branch receives every other, resampled.

    Lower resolution -> higher: 1x1 conv + GN, nearest upsampling. Higher -> lower: a
    chain of stride-2 3x3 convs (+GN, ReLU between). Then ReLU -> 1x1 conv -> GN.
    """

    channels: tuple[int, ...]
    num_groups: int

    @nn.compact
    def __call__(self, zs: tuple[Array, ...]) -> tuple[Array, ...]:
        out = []
        for i, c_i in enumerate(self.channels):
            total = zs[i]
            for j, z_j in enumerate(zs):
                if j > i:
                    y = nn.GroupNorm(self.num_groups)(WNConv(c_i, kernel_size=1)(z_j))
                    factor = 2 ** (j - i)
                    y = jnp.repeat(jnp.repeat(y, factor, axis=1), factor, axis=2)
                elif j < i:
                    y = z_j
                    for step in range(i - j):
                        last = step == i - j - 1
                        y = WNConv(c_i if last else self.channels[j], strides=2)(y)
                        y = nn.GroupNorm(self.num_groups)(y)
                        if not last:
                            y = nn.relu(y)
                else:
                    continue
                total = total + y
            out.append(nn.GroupNorm(self.num_groups)(WNConv(c_i, kernel_size=1)(nn.relu(total))))
        return tuple(out)


class MDEQ(nn.Module):
    """Multiscale DEQ classifier (see module doc for the methods).

    Attributes:
      size: a name in :data:`SIZES` or an :class:`MDEQSize`.
      num_classes: output classes.
      dropout: variational dropout rate inside the cell (mask fixed for a forward pass).
    """

    size: str | MDEQSize = "digits"
    num_classes: int = 10
    dropout: float = 0.0

    def setup(self):
        s = get_size(self.size)
        self.spec = s
        self.stem_convs = [
            nn.Conv(s.channels[0], (3, 3), strides=s.stem_stride, use_bias=False),
            nn.Conv(s.channels[0], (3, 3), use_bias=False),
        ]
        self.stem_norms = [nn.GroupNorm(s.num_groups), nn.GroupNorm(s.num_groups)]
        self.blocks = [ResidualBlock(c, s.expand, s.num_groups) for c in s.channels]
        self.fuse = Fuse(s.channels, s.num_groups)
        self.head_proj = [nn.Conv(h, (1, 1)) for h in s.head_channels]
        self.head_down = [nn.Conv(h, (3, 3), strides=2) for h in s.head_channels[1:]]
        self.head_final = nn.Conv(s.final_channels, (1, 1))
        self.classifier = nn.Dense(self.num_classes)

    def inject(self, images: Array, dropout_keys: Array | None = None) -> dict[str, Any]:
        """Images ``[B, H, W, C_in]`` -> ``{"features": [B, H', W', channels[0]], "masks": tuple}``.

        ``H' = H / stem_stride``; H' must be divisible by ``2^(branches - 1)``. The
        masks (one per branch, ``[B, 1, 1, expand * channels[i]]``, values 0 or
        ``1 / (1 - dropout)``) are ones unless ``dropout_keys`` (``[B]`` typed PRNG keys,
        one per example: masks then do not depend on how the batch is split across
        devices) is given and ``dropout > 0``.
        """
        if images.ndim != 4:
            raise ValueError(f"MDEQ expects images [B, H, W, C], got shape {images.shape}")
        s = self.spec
        h = images
        for conv, norm in zip(self.stem_convs, self.stem_norms, strict=True):
            h = nn.relu(norm(conv(h)))
        scale = 2 ** (len(s.channels) - 1)
        if h.shape[1] % scale or h.shape[2] % scale:
            raise ValueError(
                f"{len(s.channels)} branches need the stem's output ({h.shape[1]}x{h.shape[2]}) divisible by {scale}"
            )
        batch = images.shape[0]
        masks = []
        for i, c in enumerate(s.channels):
            shape = (1, 1, c * s.expand)
            if dropout_keys is not None and self.dropout > 0:
                keep = jax.vmap(
                    lambda k, i=i, shape=shape: jax.random.bernoulli(
                        jax.random.fold_in(k, i), 1.0 - self.dropout, shape
                    )
                )(dropout_keys)
                masks.append(keep.astype(h.dtype) / (1.0 - self.dropout))
            else:
                masks.append(jnp.ones((batch,) + shape, h.dtype))
        return {"features": h, "masks": tuple(masks)}

    def initial_state(self, x: dict[str, Any]) -> tuple[Array, ...]:
        """Zero feature maps, one per branch, halving the resolution each branch."""
        feats = x["features"]
        b, hh, ww, _ = feats.shape
        return tuple(jnp.zeros((b, hh // 2**i, ww // 2**i, c), feats.dtype) for i, c in enumerate(self.spec.channels))

    def cell(self, x: dict[str, Any], z: tuple[Array, ...]) -> tuple[Array, ...]:
        """One application of the equilibrium cell: ``f(x, z) -> z`` (same shapes as z)."""
        blocks = [
            block(z_i, x["features"] if i == 0 else None, mask)
            for i, (block, z_i, mask) in enumerate(zip(self.blocks, z, x["masks"], strict=True))
        ]
        return self.fuse(tuple(blocks))

    def head(self, z: tuple[Array, ...]) -> Array:
        """Equilibrium state -> logits ``[B, num_classes]``."""
        y = nn.relu(self.head_proj[0](z[0]))
        for proj, down, z_i in zip(self.head_proj[1:], self.head_down, z[1:], strict=True):
            y = nn.relu(proj(z_i)) + nn.relu(down(y))
        y = nn.relu(self.head_final(y))
        return self.classifier(jnp.mean(y, axis=(1, 2)))

    def __call__(self, images: Array) -> Array:
        """One cell application from z0 (used to initialize every parameter)."""
        x = self.inject(images)
        return self.head(self.cell(x, self.initial_state(x)))
