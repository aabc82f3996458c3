"""Multiscale deep equilibrium model (MDEQ, Bai, Koltun & Kolter 2020) in Flax Linen.

The equilibrium is a :class:`deq_jax.linen.DEQ` layer around :class:`MDEQCell` (per-branch
residual blocks, then multi-resolution fusion), so the model is built like any user's
DEQ. ``model.apply(variables, images, ...)`` returns a :class:`~deq_jax.models.ModelOutput`
(logits, z*, the cell input x, the layer's :class:`deq_jax.DEQStats`); its keyword
arguments choose the solvers, the step budget, pretraining (``unroll=k``) and the JR term.
The pieces are also methods usable with ``model.apply(variables, ..., method=...)``:

* :meth:`MDEQ.inject`: images ``[B, H, W, C_in]`` -> the cell's input ``x`` (stem
  features for the highest-resolution branch, plus the variational-dropout masks,
  drawn once per forward pass so every solver step sees the same mask);
* :meth:`MDEQ.initial_state`: ``x`` -> ``z0``, a tuple of zero feature maps, one per
  branch: ``[B, H / 2^i, W / 2^i, channels[i]]``;
* :meth:`MDEQ.cell`: ``f(x, z) -> z``, one application of the weight-tied cell;
* :meth:`MDEQ.head`: ``z -> logits [B, num_classes]``.

Normalization is GroupNorm throughout (no batch statistics: examples stay independent,
which per-example solver stopping needs, and there is no mutable state to shard). Where
the official code (``locuslab/deq``, ``MDEQ-Vision/lib/models/mdeq_core.py`` and
``mdeq.py``) uses BatchNorm (stem, injection conv, classification head), GroupNorm with
the same groups stands in for it.

Sizes (:data:`SIZES`): ``digits`` (ours, the Quickstart), and the official
``tiny`` (CIFAR-10 TINY), ``cifar`` (CIFAR-10 LARGE) and ``small`` (ImageNet SMALL)
widths; an :class:`MDEQSize` says every width and which official details it uses.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deq_jax.linen import DEQ, WNConv
from deq_jax.models.output import ModelOutput

Array = jax.Array


STEM_STRIDES = {1: (1, 1), 2: (2, 1), 4: (2, 2)}  # stem_stride -> strides of the two stem convs
HEADS = ("conv", "bottleneck")


@dataclasses.dataclass(frozen=True)
class MDEQSize:
    """Widths of an MDEQ, and which of the official architecture's details it uses.

    The defaults of the last five fields keep the original deq_jax model (the ``digits``
    size); the official sizes set them as ``MDEQ-Vision``'s yaml files do.

    Attributes:
      channels: per-branch channels of the equilibrium state, highest resolution first;
        branch i works at ``1 / 2^i`` of the stem's resolution.
      expand: the residual block's inner width is ``expand * channels[i]``.
      head_channels: per-branch widths of the classification head (the official
        ``HEAD_CHANNELS``; with ``head="bottleneck"`` each branch leaves the head's
        bottleneck with ``4 * head_channels[i]`` channels, as in the official code).
      final_channels: width of the head's last 1x1 conv before pooling.
      num_groups: GroupNorm groups of the cell (must divide every cell width).
      stem_stride: total stride of the two 3x3 stem convs: 1 (both stride 1), 2 (the
        first has stride 2) or 4 (both have stride 2: 224 -> 56, the official
        ``DOWNSAMPLE_TIMES: 2`` of ImageNet).
      inject_conv: a 1x1 conv + GroupNorm + ReLU between the stem and the cell (the
        official ``stage0``, used when there are more than 2 branches or a strided stem).
      post_fuse_groups: GroupNorm groups after each branch's fusion 1x1 conv; 0 means
        ``num_groups`` (the official code uses ``num_groups // 2``).
      post_fuse_affine: whether that GroupNorm has a scale and bias (the official
        ``POST_GN_AFFINE``, false in every ``*_reg.yaml``).
      head: ``"conv"`` (per branch a 1x1 conv + ReLU, no normalization) or
        ``"bottleneck"`` (the official head: a bottleneck block per branch with 4x
        expansion, stride-2 3x3 convs + norm + ReLU between resolutions, 1x1 conv +
        norm + ReLU to ``final_channels``). The head's GroupNorms use
        ``gcd(width, num_groups)`` groups, since head widths such as 28 are not
        multiples of 8.
    """

    channels: tuple[int, ...]
    expand: int
    head_channels: tuple[int, ...]
    final_channels: int
    num_groups: int
    stem_stride: int = 1
    inject_conv: bool = False
    post_fuse_groups: int = 0
    post_fuse_affine: bool = True
    head: str = "conv"

    def __post_init__(self):
        if any(c <= 0 for c in self.channels):
            raise ValueError(f"channels must be positive, got {self.channels}")
        if len(self.channels) < 1 or len(self.head_channels) != len(self.channels):
            raise ValueError(f"need one head width per branch, got {self.channels} and {self.head_channels}")
        widths = list(self.channels) + [c * self.expand for c in self.channels]
        bad = [w for w in widths if w % self.num_groups]
        if bad:
            raise ValueError(f"num_groups={self.num_groups} must divide every cell width; it does not divide {bad}")
        if self.stem_stride not in STEM_STRIDES:
            raise ValueError(f"stem_stride must be one of {sorted(STEM_STRIDES)}, got {self.stem_stride}")
        if self.post_fuse_groups < 0 or any(c % self.fuse_groups for c in self.channels):
            raise ValueError(
                f"post_fuse_groups={self.post_fuse_groups} must be 0 (= num_groups) or divide every branch width "
                f"{self.channels}"
            )
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")

    @property
    def fuse_groups(self) -> int:
        """GroupNorm groups after the fusion's 1x1 convs."""
        return self.post_fuse_groups or self.num_groups


# Official widths: MDEQ-Vision/experiments/{cifar,imagenet}/cls_mdeq_*.yaml (locuslab/deq),
# NUM_CHANNELS, EXPANSION_FACTOR, HEAD_CHANNELS, FINAL_CHANSIZE, NUM_GROUPS, DOWNSAMPLE_TIMES,
# POST_GN_AFFINE; the post-fusion GroupNorm has NUM_GROUPS // 2 groups (mdeq_core.py).
_OFFICIAL = dict(expand=5, num_groups=8, post_fuse_groups=4, post_fuse_affine=False, head="bottleneck")

SIZES = {
    # 8x8 digits: branches at 8x8 and 4x4 (ours; the Quickstart).
    "digits": MDEQSize(channels=(16, 32), expand=2, head_channels=(16, 32), final_channels=128, num_groups=4),
    # CIFAR-10 TINY (cls_mdeq_TINY.yaml): 2 branches of 24 channels, no injection conv.
    "tiny": MDEQSize(channels=(24, 24), head_channels=(8, 16), final_channels=200, **_OFFICIAL),
    # CIFAR-10 LARGE (cls_mdeq_LARGE_reg.yaml, the paper's CIFAR-10 model): 4 branches.
    "cifar": MDEQSize(
        channels=(32, 64, 128, 256), head_channels=(14, 28, 56, 112), final_channels=1680, inject_conv=True,
        **_OFFICIAL,
    ),
    # ImageNet SMALL (cls_mdeq_SMALL_reg.yaml): 4 branches, two stride-2 stem convs
    # (224x224 images -> branches at 56/28/14/7).
    "small": MDEQSize(
        channels=(32, 64, 128, 256), head_channels=(28, 56, 112, 224), final_channels=2048, stem_stride=4,
        inject_conv=True, **_OFFICIAL,
    ),
}


def get_size(size: str | MDEQSize) -> MDEQSize:
    if isinstance(size, MDEQSize):
        return size
    if size not in SIZES:
        raise ValueError(f"unknown MDEQ size {size!r}; choose one of {sorted(SIZES)}")
    return SIZES[size]


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
    chain of stride-2 3x3 convs (+GN, ReLU between). Then ReLU -> 1x1 conv -> GN with
    ``post_groups`` groups (0: ``num_groups``), with or without scale and bias.
    """

    channels: tuple[int, ...]
    num_groups: int
    post_groups: int = 0  # 0: num_groups
    post_affine: bool = True

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
            post_norm = nn.GroupNorm(
                self.post_groups or self.num_groups, use_scale=self.post_affine, use_bias=self.post_affine
            )
            out.append(post_norm(WNConv(c_i, kernel_size=1)(nn.relu(total))))
        return tuple(out)


def _head_norm(width: int, num_groups: int, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm of a head width: ``gcd(width, num_groups)`` groups (head widths need not divide)."""
    return nn.GroupNorm(math.gcd(width, num_groups), use_scale=affine, use_bias=affine)


class Bottleneck(nn.Module):
    """The official head's block: 1x1 -> 3x3 -> 1x1 (``4 * planes`` out), norms without
    scale and bias, + a 1x1 conv + norm shortcut when the width changes, ReLU.

    ``[B, H, W, C] -> [B, H, W, 4 * planes]``.
    """

    planes: int
    num_groups: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p, out_width = self.planes, 4 * self.planes
        h = nn.relu(_head_norm(p, self.num_groups, False)(nn.Conv(p, (1, 1), use_bias=False)(x)))
        h = nn.relu(_head_norm(p, self.num_groups, False)(nn.Conv(p, (3, 3), use_bias=False)(h)))
        h = _head_norm(out_width, self.num_groups, False)(nn.Conv(out_width, (1, 1), use_bias=False)(h))
        shortcut = x
        if x.shape[-1] != out_width:
            shortcut = _head_norm(out_width, self.num_groups)(nn.Conv(out_width, (1, 1), use_bias=False)(x))
        return nn.relu(h + shortcut)


class MDEQCell(nn.Module):
    """The weight-tied MDEQ cell ``(x, z) -> z``: a residual block per branch (the stem
    features injected into the first, each with its dropout mask ``x["masks"][i]``),
    then multi-resolution fusion. z is a tuple of ``[B, H / 2^i, W / 2^i, channels[i]]``."""

    spec: MDEQSize

    def setup(self):
        s = self.spec
        self.blocks = [ResidualBlock(c, s.expand, s.num_groups) for c in s.channels]
        self.fuse = Fuse(s.channels, s.num_groups, s.post_fuse_groups, s.post_fuse_affine)

    def __call__(self, x: dict[str, Any], z: tuple[Array, ...]) -> tuple[Array, ...]:
        blocks = [
            block(z_i, x["features"] if i == 0 else None, mask)
            for i, (block, z_i, mask) in enumerate(zip(self.blocks, z, x["masks"], strict=True))
        ]
        return self.fuse(tuple(blocks))


class MDEQ(nn.Module):
    """Multiscale DEQ classifier (see module doc for the methods).

    Attributes:
      size: a name in :data:`SIZES` or an :class:`MDEQSize`.
      num_classes: output classes.
      dropout: variational dropout rate inside the cell (mask fixed for a forward pass).
      compute_dtype: None, or a dtype (e.g. ``jnp.bfloat16``) to evaluate the cell in;
        parameters, the solver and the rest of the model stay float32.
    """

    size: str | MDEQSize = "digits"
    num_classes: int = 10
    dropout: float = 0.0
    compute_dtype: Any = None

    def setup(self):
        s = get_size(self.size)
        self.spec = s
        self.stem_convs = [
            nn.Conv(s.channels[0], (3, 3), strides=stride, use_bias=False) for stride in STEM_STRIDES[s.stem_stride]
        ]
        self.stem_norms = [nn.GroupNorm(s.num_groups), nn.GroupNorm(s.num_groups)]
        if s.inject_conv:
            self.inject_proj = nn.Conv(s.channels[0], (1, 1), use_bias=False)
            self.inject_norm = nn.GroupNorm(s.num_groups)
        self.deq = DEQ(MDEQCell(s), compute_dtype=self.compute_dtype)
        if s.head == "bottleneck":
            widths = [4 * h for h in s.head_channels]
            self.head_proj = [Bottleneck(h, s.num_groups) for h in s.head_channels]
            self.head_down = [nn.Conv(w, (3, 3), strides=2) for w in widths[1:]]
            self.head_down_norms = [_head_norm(w, s.num_groups) for w in widths[1:]]
            self.head_final_norm = _head_norm(s.final_channels, s.num_groups)
        else:
            self.head_proj = [nn.Conv(h, (1, 1)) for h in s.head_channels]
            self.head_down = [nn.Conv(h, (3, 3), strides=2) for h in s.head_channels[1:]]
        self.head_final = nn.Conv(s.final_channels, (1, 1))
        self.classifier = nn.Dense(self.num_classes)

    def inject(self, images: Array, dropout_keys: Array | None = None) -> dict[str, Any]:
        """Images ``[B, H, W, C_in]`` -> ``{"features": [B, H', W', channels[0]], "masks": tuple}``.

        ``H' = H / stem_stride`` (rounded up); H' must be divisible by ``2^(branches - 1)``. The
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
        if s.inject_conv:
            h = nn.relu(self.inject_norm(self.inject_proj(h)))
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
        return self.deq.cell(x, z)

    def head(self, z: tuple[Array, ...]) -> Array:
        """Equilibrium state -> logits ``[B, num_classes]``.

        Each branch is widened (``head``: a 1x1 conv or a bottleneck), the highest
        resolution is carried down branch by branch with stride-2 3x3 convs and summed
        in, then a 1x1 conv to ``final_channels``, global average pooling, a dense layer.
        """
        if self.spec.head == "bottleneck":
            y = self.head_proj[0](z[0])
            downs = zip(self.head_down, self.head_down_norms, strict=True)
            for proj, (down, norm), z_i in zip(self.head_proj[1:], downs, z[1:], strict=True):
                y = proj(z_i) + nn.relu(norm(down(y)))
            y = nn.relu(self.head_final_norm(self.head_final(y)))
        else:
            y = nn.relu(self.head_proj[0](z[0]))
            for proj, down, z_i in zip(self.head_proj[1:], self.head_down, z[1:], strict=True):
                y = nn.relu(proj(z_i)) + nn.relu(down(y))
            y = nn.relu(self.head_final(y))
        return self.classifier(jnp.mean(y, axis=(1, 2)))

    def __call__(self, images: Array, dropout_keys: Array | None = None, **layer_args) -> ModelOutput:
        """Images ``[B, H, W, C_in]`` -> logits through the equilibrium (or ``unroll`` cells).

        ``dropout_keys``: see :meth:`inject`. ``layer_args`` go to the
        :class:`deq_jax.linen.DEQ` layer: ``unroll``, ``step_limit``, ``probe``, ``jr_keys``,
        ``jr_if``, ``jr_probes``, ``jr_mode``, ``forward``, ``backward``, ``correction`` (``model.init(key, images,
        unroll=1)`` initializes without a solve).
        """
        x = self.inject(images, dropout_keys)
        z, stats = self.deq(x, self.initial_state(x), **layer_args)
        corrections = None if stats.states is None else tuple((self.head(s), None) for s in stats.states[:-1])
        return ModelOutput(self.head(z), z, x, stats, corrections=corrections)
