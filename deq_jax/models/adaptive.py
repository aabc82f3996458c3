"""Adaptive input embeddings (Baevski & Auli 2019) and adaptive softmax (Grave et al. 2017)
in Flax Linen, as the official DEQ-Transformer (locuslab/deq, ``DEQ-Sequence``) uses them
on WikiText-103.

The vocabulary is sorted by frequency (id 0 the most frequent). ``cutoffs`` split it into
clusters ``[0, c_1), [c_1, c_2), ..., [c_K, vocab_size)``: cluster 0 is the *head* (the
shortlist), clusters ``1..K`` are the *tails*. Cluster ``i`` has width
``d_i = d_model // div_val**i`` (floor division, as the official code). WT103:
``vocab_size=267735, d_model=700, cutoffs=(20000, 40000, 200000), div_val=4`` gives
widths 700, 175, 43, 10.

One module, :class:`AdaptiveSoftmax`, owns every parameter and offers three methods, so
the input and output sides share parameters without a parent module:

* :meth:`AdaptiveSoftmax.embed`: tokens ``[B, T]`` int -> ``[B, T, d_model]``;
* :meth:`AdaptiveSoftmax.log_prob` (also ``__call__``): ``h [B, T, d_model]``, targets
  ``[B, T]`` -> ``log p(target | h)`` ``[B, T]``, in token order;
* :meth:`AdaptiveSoftmax.log_probs`: ``h`` -> the full distribution ``[B, T, vocab_size]``.

Call them with ``model.apply(variables, tokens, method="embed")`` etc.; every parameter is
created in ``setup``, so ``model.init`` through any method creates all of them.

Parameters (names in the ``params`` collection)
-----------------------------------------------
* ``table_i`` ``[n_i, d_i]``: the embedding table of cluster ``i``. It is **also** the
  output weight of cluster ``i`` (always tied, one parameter, one gradient): the logits
  of cluster ``i`` are ``proj_out_i(h) @ table_i.T + bias_i``.
* ``bias_i`` ``[n_i]``: output bias of cluster ``i`` (not tied; the embedding has none).
* ``in_proj_i`` ``[d_i, d_model]`` (only when ``div_val > 1``): input projection,
  ``embed = table_i[t] @ in_proj_i``.
* ``out_proj_0`` ``[d_0, d_model]`` (only when ``div_val > 1``): head output projection,
  ``h @ out_proj_0.T``; never tied (as the official ``tie_projs[0] = False``).
* ``out_proj_i``, ``i >= 1`` (only when ``div_val > 1`` and not ``tie_projections``): tail
  output projections. With ``tie_projections`` the tails use ``in_proj_i`` (transposed)
  instead: one array, one gradient. (The official PyTorch code shares only the storage,
  so two Parameter objects, two Adam states, and ``model.parameters()`` counts them twice;
  Transformer-XL ties the module, as here.)
* ``cluster_weight`` ``[K, d_0]``, ``cluster_bias`` ``[K]`` (only when ``K > 0``): the
  head's cluster logits.

Projections exist iff ``div_val > 1`` (the official code, with ``d_embed == d_model``): with
``div_val == 1`` every width is ``d_model`` and a ``d_model x d_model`` projection would be
redundant, so with no cutoffs and ``div_val == 1`` this is a plain tied embedding +
full softmax. (The official ``div_val == 1`` path keeps one ``[vocab, d]`` table sliced by
cluster; the per-cluster tables here hold the same numbers.)

Head layout and cluster-column order
------------------------------------
The head has ``n_0 + K`` logits, all computed from the projected hidden state
``h0 = h @ out_proj_0.T`` (as the official code, which appends ``cluster_weight`` to the
head weight): ``[h0 @ table_0.T + bias_0, h0 @ cluster_weight.T + cluster_bias]``.
**Column ``n_0 + i - 1`` (``cluster_weight`` row ``i - 1``) is cluster ``i``** (clean
order). The official code uses column ``-i`` for cluster ``i`` (row ``K - i``): to load
official weights, reverse the rows of ``cluster_weight`` and ``cluster_bias``.

``log p(t) = log_softmax(head)[t]`` for ``t`` in the head, and
``log_softmax(head)[n_0 + i - 1] + log_softmax(tail_i)[t - c_i]`` for ``t`` in tail ``i``.

Static shapes
-------------
Nothing depends on the data: :meth:`embed` looks every token up in every cluster (indices
clipped into range) and selects with ``jnp.where``; :meth:`log_prob` computes every
tail's logits for every position and selects by the target's cluster (the official code
computes a tail only for the rows whose target falls in it, which needs boolean
indexing). The cost is ``K + 1`` projections per token and dense ``[..., n_i]`` logits
for every tail (WT103: ``[B, T, 160000]`` for the largest), so chunk the positions if
memory is short. Out-of-range tokens/targets are clipped, not checked.

Numerics
--------
Matmuls run in ``h``'s dtype (parameters are cast to it, like the other models here) and
accumulate into float32 (``preferred_element_type``); logits, biases, ``logsumexp`` and
``log_softmax`` are float32 whatever ``h``'s dtype (bfloat16 ``h`` -> float32 log-probs;
float64 ``h`` under x64 -> float64). ``precision`` (default ``None``, the backend's
default, fine for training) is passed to every matmul; the tests set
``jax.lax.Precision.HIGHEST`` so that their exact comparisons would also hold on
GPU/TPU, where the default may use TF32/bfloat16 passes.

Embedding scale
---------------
:meth:`embed` multiplies by ``sqrt(d_model)`` after the projection, as the official
``AdaptiveEmbedding`` (``emb_scale = d_proj ** 0.5``); ``scale_embedding=False`` turns it off.

Initialisation
--------------
Official: tables, projections and ``cluster_weight`` N(0, ``init_std`` = 0.01), biases 0
(the official ``init_std = proj_init_std = 0.01``). Not the Flax defaults: with a
unit-variance table tied to the output, the initial logits would be ``O(sqrt(d))``.

Counting parameters
-------------------
:func:`param_count` gives the count from the configuration alone (every array counted
once); it equals the size of ``jax.eval_shape(model.init, ...)``'s tree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def cluster_layout(
    vocab_size: int, d_model: int, cutoffs: Sequence[int] = (), div_val: int = 1
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate a configuration; return ``(bounds, widths)``: ``bounds = (0, *cutoffs,
    vocab_size)`` (cluster ``i`` is ``[bounds[i], bounds[i+1])``) and
    ``widths[i] = d_model // div_val**i``. Raises ``ValueError`` on a bad configuration."""
    cutoffs = tuple(cutoffs)
    for name, v in (("vocab_size", vocab_size), ("d_model", d_model), ("div_val", div_val)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if d_model < 1:
        raise ValueError(f"d_model must be >= 1, got {d_model}")
    if div_val < 1:
        raise ValueError(f"div_val must be >= 1, got {div_val}")
    for c in cutoffs:
        if isinstance(c, bool) or not isinstance(c, int):
            raise ValueError(f"cutoffs must be ints, got {cutoffs!r}")
        if c <= 0:
            raise ValueError(f"cutoffs must be > 0 (cluster 0 would be empty), got {cutoffs!r}")
        if c >= vocab_size:
            raise ValueError(
                f"cutoffs must be < vocab_size={vocab_size} (the last cluster would be empty), got {cutoffs!r}"
            )
    if any(b <= a for a, b in zip(cutoffs, cutoffs[1:])):
        raise ValueError(f"cutoffs must be strictly increasing, got {cutoffs!r}")
    widths = tuple(d_model // div_val**i for i in range(len(cutoffs) + 1))
    for i, w in enumerate(widths):
        if w < 1:
            raise ValueError(
                f"cluster {i} would have width d_model // div_val**{i} = {d_model} // {div_val**i} = 0; "
                "use a smaller div_val, a larger d_model or fewer cutoffs"
            )
    return (0, *cutoffs, vocab_size), widths


def param_count(
    vocab_size: int, d_model: int, cutoffs: Sequence[int] = (), div_val: int = 1, tie_projections: bool = True
) -> dict[str, int]:
    """Parameter count of :class:`AdaptiveSoftmax` by group (each array counted once):
    ``tables``, ``in_projs``, ``out_projs``, ``biases``, ``clusters`` and ``total``."""
    bounds, widths = cluster_layout(vocab_size, d_model, cutoffs, div_val)
    sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    k = len(sizes) - 1
    proj = div_val > 1
    counts = {
        "tables": sum(n * d for n, d in zip(sizes, widths)),
        "in_projs": sum(d * d_model for d in widths) if proj else 0,
        "out_projs": (
            (widths[0] * d_model + (0 if tie_projections else sum(d * d_model for d in widths[1:]))) if proj else 0
        ),
        "biases": vocab_size,
        "clusters": k * widths[0] + k,
    }
    counts["total"] = sum(counts.values())
    return counts


class AdaptiveSoftmax(nn.Module):
    """Adaptive input embedding + adaptive log-softmax with tied tables (see the module
    docstring for the parameters, head layout, numerics and initialisation).

    Attributes:
      vocab_size: number of tokens (ids sorted by decreasing frequency).
      d_model: hidden size of the model (input of the softmax, output of ``embed``).
      cutoffs: strictly increasing cluster boundaries in ``(0, vocab_size)``; ``()``: one
        cluster (full softmax).
      div_val: cluster ``i`` has width ``d_model // div_val**i``; projections iff ``> 1``.
      tie_projections: tail (``i >= 1``) output projections are the input projections.
      init_std: std of the normal init of tables, projections and ``cluster_weight``.
      scale_embedding: multiply ``embed``'s output by ``sqrt(d_model)``.
      dtype: dtype of ``embed``'s computation/output (``None``: ``param_dtype``).
      param_dtype: parameter dtype.
      precision: matmul precision (``None``: backend default).
    """

    vocab_size: int
    d_model: int
    cutoffs: tuple[int, ...] = ()
    div_val: int = 1
    tie_projections: bool = True
    init_std: float = 0.01
    scale_embedding: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    def __post_init__(self):
        cluster_layout(self.vocab_size, self.d_model, self.cutoffs, self.div_val)  # fail at construction
        super().__post_init__()

    def setup(self):
        bounds, widths = cluster_layout(self.vocab_size, self.d_model, self.cutoffs, self.div_val)
        self.bounds, self.widths = bounds, widths
        k = len(widths) - 1
        normal = nn.initializers.normal(self.init_std)
        zeros = nn.initializers.zeros
        pd = self.param_dtype
        self.tables = [
            self.param(f"table_{i}", normal, (bounds[i + 1] - bounds[i], widths[i]), pd) for i in range(k + 1)
        ]
        self.biases = [self.param(f"bias_{i}", zeros, (bounds[i + 1] - bounds[i],), pd) for i in range(k + 1)]
        if self.div_val > 1:
            self.in_projs = [self.param(f"in_proj_{i}", normal, (widths[i], self.d_model), pd) for i in range(k + 1)]
            out = [self.param("out_proj_0", normal, (widths[0], self.d_model), pd)]
            for i in range(1, k + 1):
                tied = self.tie_projections
                out.append(
                    self.in_projs[i] if tied else self.param(f"out_proj_{i}", normal, (widths[i], self.d_model), pd)
                )
            self.out_projs = out
        else:
            self.in_projs = self.out_projs = [None] * (k + 1)
        if k > 0:
            self.cluster_weight = self.param("cluster_weight", normal, (k, widths[0]), pd)
            self.cluster_bias = self.param("cluster_bias", zeros, (k,), pd)

    # ------------------------------------------------------------------ helpers
    def _cluster_of(self, tokens: Array) -> Array:
        """Cluster index (0..K) of every token."""
        c = jnp.zeros(tokens.shape, jnp.int32)
        for cut in self.bounds[1:-1]:
            c = c + (tokens >= cut).astype(jnp.int32)
        return c

    def _local(self, tokens: Array, i: int) -> Array:
        """Index of ``tokens`` inside cluster ``i``, clipped into range (garbage outside)."""
        return jnp.clip(tokens - self.bounds[i], 0, self.bounds[i + 1] - self.bounds[i] - 1)

    def _logits(self, h: Array, weight: Array, bias: Array, proj: Array | None) -> Array:
        """``(h @ proj.T) @ weight.T + bias`` in float32 (or wider) from ``h`` ``[..., d_model]``."""
        cdt = h.dtype
        odt = jnp.promote_types(cdt, jnp.float32)
        if proj is not None:
            h = jnp.einsum(
                "...m,dm->...d", h, proj.astype(cdt), precision=self.precision, preferred_element_type=odt
            ).astype(cdt)
        logits = jnp.einsum(
            "...d,vd->...v", h, weight.astype(cdt), precision=self.precision, preferred_element_type=odt
        )
        return logits + bias.astype(odt)

    def _head_logits(self, h: Array) -> Array:
        """Head logits ``[..., n_0 + K]``: shortlist then clusters 1..K."""
        w, b = self.tables[0], self.biases[0]
        if len(self.widths) > 1:
            w = jnp.concatenate([w, self.cluster_weight], axis=0)
            b = jnp.concatenate([b, self.cluster_bias], axis=0)
        return self._logits(h, w, b, self.out_projs[0])

    def _check_h(self, h: Array) -> None:
        if h.shape[-1] != self.d_model:
            raise ValueError(f"h must end in d_model={self.d_model}, got shape {h.shape}")

    # ------------------------------------------------------------------ API
    def embed(self, tokens: Array) -> Array:
        """Adaptive input embedding: ``tokens`` ``[...]`` int -> ``[..., d_model]``:
        ``table_i[t - c_i] @ in_proj_i`` for ``t`` in cluster ``i`` (no projection when
        ``div_val == 1``), times ``sqrt(d_model)`` when ``scale_embedding``."""
        dt = self.dtype or self.param_dtype
        tokens = jnp.asarray(tokens).astype(jnp.int32)
        cluster = self._cluster_of(tokens)[..., None]
        out = None
        for i, (table, proj) in enumerate(zip(self.tables, self.in_projs)):
            e = jnp.take(table.astype(dt), self._local(tokens, i), axis=0)
            if proj is not None:
                e = jnp.einsum("...d,dm->...m", e, proj.astype(dt), precision=self.precision)
            out = e if out is None else jnp.where(cluster == i, e, out)
        if self.scale_embedding:
            out = out * jnp.asarray(math.sqrt(self.d_model), dt)
        return out

    def log_prob(self, h: Array, targets: Array) -> Array:
        """``log p(targets | h)``: ``h`` ``[..., d_model]``, ``targets`` ``[...]`` int ->
        ``[...]`` float32 (float64 for float64 ``h``), in token order. Every tail's logits
        are computed for every position and selected by the target's cluster."""
        self._check_h(h)
        targets = jnp.asarray(targets).astype(jnp.int32)
        n0 = self.bounds[1]
        head = self._head_logits(h)
        head_lp = head - jax.nn.logsumexp(head, axis=-1, keepdims=True)
        take = lambda x, idx: jnp.take_along_axis(x, idx[..., None], axis=-1)[..., 0]  # noqa: E731
        out = take(head_lp, self._local(targets, 0))
        if len(self.widths) > 1:
            cluster = self._cluster_of(targets)
            for i in range(1, len(self.widths)):
                tail = self._logits(h, self.tables[i], self.biases[i], self.out_projs[i])
                tail_lp = take(tail, self._local(targets, i)) - jax.nn.logsumexp(tail, axis=-1)
                out = jnp.where(cluster == i, head_lp[..., n0 + i - 1] + tail_lp, out)
        return out

    def log_probs(self, h: Array) -> Array:
        """Full log-distribution ``[..., vocab_size]`` (float32, or float64 for float64
        ``h``), in token-id order. Materializes ``vocab_size`` entries per position."""
        self._check_h(h)
        n0 = self.bounds[1]
        head_lp = jax.nn.log_softmax(self._head_logits(h), axis=-1)
        parts = [head_lp[..., :n0]]
        for i in range(1, len(self.widths)):
            tail = self._logits(h, self.tables[i], self.biases[i], self.out_projs[i])
            parts.append(head_lp[..., n0 + i - 1 : n0 + i] + jax.nn.log_softmax(tail, axis=-1))
        return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]

    def __call__(self, h: Array, targets: Array) -> Array:
        """Same as :meth:`log_prob`."""
        return self.log_prob(h, targets)
