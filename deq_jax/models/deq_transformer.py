"""Weight-tied DEQ-Transformer language model (Bai et al. 2019/2021) in Flax Linen.

Built like :class:`deq_jax.models.MDEQ`: a :class:`deq_jax.linen.DEQ` layer around
:class:`DEQTransformerCell`; ``model.apply(variables, tokens, ...)`` returns a
:class:`~deq_jax.models.ModelOutput`, and the same four pieces are methods:

* :meth:`DEQTransformer.inject`: tokens ``[B, T]`` int -> ``x = {"injection": [B, T, D],
  "masks": [B, 1, F]}`` (the input injection, added inside every cell application, and the
  variational-dropout mask of the feed-forward hidden layer, fixed across solver steps).
  The embedding is scaled by ``sqrt(d_model)`` so that the injection has unit scale like
  the LayerNorm-ed state: with a small injection the post-LN cell is close to the
  identity in z (spectral radius near 1), and without JR its fixed point drifted out of
  the solver's reach within a few hundred steps (pydoc, 12 Broyden steps);
* :meth:`DEQTransformer.initial_state`: ``x`` -> zeros ``[B, T, D]``;
* :meth:`DEQTransformer.cell`: one weight-tied Transformer block on ``z + injection``:
  causal multi-head self-attention (rotary, i.e. relative, positions) and a feed-forward
  layer, pre-LN or post-LN;
* :meth:`DEQTransformer.head`: LayerNorm, then the tied (embedding transpose) or untied
  output projection -> logits ``[B, T, vocab]``.

Every cell application is causal (position t reads positions <= t only), so a unique
fixed point is causal too; a solver whose updates mix positions (Broyden, Anderson: their
inner products run over the whole sequence) returns it causally up to its tolerance.

Pre-LN here means: each sublayer reads a LayerNorm-ed input, the residual stream is not
normalized inside the block, and one LayerNorm closes the block. Without that closing
norm the cell is f(z) = z + g(z), whose fixed points are the roots of g (a root problem,
not a contraction, with J_f = I + J_g): in our tests the forward solve still converged
but the adjoint solve did not (relative residual 3-5e-2) and the training loss rose.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deq_jax.linen import DEQ, WNDense
from deq_jax.models.adaptive import AdaptiveSoftmax
from deq_jax.models.output import ModelOutput

Array = jax.Array


def rotary(x: Array, positions: Array | None = None) -> Array:
    """Rotary position embedding of ``x`` ``[B, T, H, Dh]`` (Dh even): the pair
    ``(x_i, x_{i + Dh/2})`` at position p is rotated by ``p * 10000^(-2i / Dh)``, so
    ``q . k`` depends on positions only through their difference (relative, any length).
    ``positions``: ``[T]`` (default ``0..T-1``)."""
    t, dh = x.shape[1], x.shape[-1]
    half = dh // 2
    positions = jnp.arange(t) if positions is None else positions
    freq = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[:, None] * freq[None, :]  # [T, Dh/2]
    cos = jnp.cos(angle)[None, :, None, :].astype(x.dtype)
    sin = jnp.sin(angle)[None, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class Memory(NamedTuple):
    """The block inputs ``z* + injection`` of the last ``M`` positions of the stream before
    the current segment (constants: stop-gradient), attended to as extra keys and values.

    Attributes:
      states: ``[B, M, D]``, oldest first; slot ``M - 1`` is the position just before the segment.
      valid: ``[B, M]`` bool; false for slots not yet filled (the start of a stream).
    """

    states: Array
    valid: Array


def empty_memory(batch: int, mem_len: int, d_model: int, dtype=jnp.float32) -> Memory:
    """A memory with no valid slot (the start of every stream)."""
    return Memory(jnp.zeros((batch, mem_len, d_model), dtype), jnp.zeros((batch, mem_len), bool))


def update_memory(memory: Memory, states: Array) -> Memory:
    """The memory after a segment whose block inputs are ``states`` ``[B, T, D]``: the last
    ``M`` positions of ``memory`` followed by the segment (gradients stopped)."""
    m = memory.states.shape[1]
    states = jax.lax.stop_gradient(states).astype(memory.states.dtype)
    joined = jnp.concatenate([memory.states, states], axis=1)[:, -m:]
    valid = jnp.concatenate([memory.valid, jnp.ones(states.shape[:2], bool)], axis=1)[:, -m:]
    return Memory(joined, valid)


class AttendedMemory(NamedTuple):
    """The memory as the attention reads it: its keys and values, computed once per segment
    (outside the solver: they do not depend on z) by :meth:`DEQTransformerCell.attended_memory`.

    Attributes:
      keys: ``[B, M, H, Dh]``, with rotary positions ``0..M-1``.
      values: ``[B, M, H, Dh]``.
      valid: ``[B, M]`` bool, as in :class:`Memory`.
    """

    keys: Array
    values: Array
    valid: Array


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions <= t (and to every
    valid memory slot), with rotary (relative) position information on queries and keys:
    memory slot j sits at position j, segment position t at ``M + t``, so distances across
    the boundary are the distances in the stream.

    ``attention(h, memory)``: ``h`` ``[B, T, D]`` and an optional :class:`AttendedMemory`
    -> ``[B, T, D]``. ``attention(states, project_memory=True)``: the memory's keys and
    values ``[B, M, H, Dh]`` from its states ``[B, M, D]`` (the same projection as h's)."""

    num_heads: int

    @nn.compact
    def __call__(self, h: Array, memory: AttendedMemory | None = None, *, project_memory: bool = False):
        b, t, d = h.shape
        if d % self.num_heads or (d // self.num_heads) % 2:
            raise ValueError(
                f"d_model={d} must be divisible by num_heads={self.num_heads} into an even head width (rotary)"
            )
        head = d // self.num_heads
        qkv = WNDense(3 * d)(h).reshape(b, t, 3, self.num_heads, head)
        if project_memory:
            return rotary(qkv[:, :, 1]), qkv[:, :, 2]
        m = 0 if memory is None else memory.keys.shape[1]
        positions = jnp.arange(m, m + t)
        q, k, v = rotary(qkv[:, :, 0], positions), rotary(qkv[:, :, 1], positions), qkv[:, :, 2]
        if memory is not None:
            k = jnp.concatenate([memory.keys.astype(k.dtype), k], axis=1)
            v = jnp.concatenate([memory.values.astype(v.dtype), v], axis=1)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head).astype(h.dtype)
        allowed = jnp.tril(jnp.ones((t, m + t), bool), k=m)[None]  # query t sees keys <= M + t
        if memory is not None:
            allowed = allowed & jnp.concatenate([memory.valid, jnp.ones((b, t), bool)], axis=1)[:, None, :]
        scores = jnp.where(allowed[:, None], scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(h.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
        return WNDense(d)(out)


class DEQTransformerCell(nn.Module):
    """One weight-tied causal Transformer block on ``z + injection``: ``[B, T, D] -> [B, T, D]``
    (``x = {"injection": [B, T, D], "masks": [B, 1, d_ff]}``, plus ``"memory"``, an
    :class:`AttendedMemory`, when the model has one; see the module doc for pre-LN)."""

    d_model: int
    num_heads: int
    d_ff: int
    pre_ln: bool = True

    def setup(self):
        self.attention = CausalSelfAttention(self.num_heads)
        self.ff_in = WNDense(self.d_ff)
        self.ff_out = WNDense(self.d_model)
        self.norms = [nn.LayerNorm() for _ in range(3 if self.pre_ln else 2)]

    def _feed_forward(self, h: Array, mask: Array) -> Array:
        return self.ff_out(nn.relu(self.ff_in(h)) * mask)

    def __call__(self, x: dict[str, Any], z: Array) -> Array:
        h = z + x["injection"]
        memory = x.get("memory")
        if self.pre_ln:
            h = h + self.attention(self.norms[0](h), memory)
            h = h + self._feed_forward(self.norms[1](h), x["masks"])
            return self.norms[2](h)
        h = self.norms[0](h + self.attention(h, memory))
        return self.norms[1](h + self._feed_forward(h, x["masks"]))

    def attended_memory(self, memory: Memory) -> AttendedMemory:
        """The keys and values the attention reads from ``memory`` (pre-LN: from its
        LayerNorm-ed states, as h is normed): constants of the solve, computed once."""
        states = self.norms[0](memory.states) if self.pre_ln else memory.states
        keys, values = self.attention(states, project_memory=True)
        return AttendedMemory(keys, values, memory.valid)


class DEQTransformer(nn.Module):
    """Character- or word-level DEQ-Transformer LM (see module doc for the methods).

    Attributes:
      vocab_size: number of tokens.
      d_model: width of the equilibrium state.
      num_heads: attention heads.
      d_ff: feed-forward hidden width.
      pre_ln: pre-LayerNorm block (closed by a LayerNorm, see module doc) if True,
        post-LayerNorm otherwise.
      tie_embeddings: output projection is the embedding matrix transposed.
      dropout: variational dropout rate on the feed-forward hidden layer.
      mem_len: segment memory: the block inputs of the last ``mem_len`` positions before
        the segment are attended to (0: none). Only the segment is solved for; the memory
        is a constant input of the cell (see :class:`Memory`).
      cutoffs, div_val: adaptive input embeddings and softmax over a frequency-sorted
        vocabulary (:class:`~deq_jax.models.adaptive.AdaptiveSoftmax`: tables tied,
        tail projections tied) when ``cutoffs`` is not empty or ``div_val > 1``;
        otherwise one embedding table and a full softmax.
      compute_dtype: None, or a dtype (e.g. ``jnp.bfloat16``) to evaluate the cell in;
        parameters, the solver and the rest of the model stay float32.
    """

    vocab_size: int
    d_model: int = 128
    num_heads: int = 4
    d_ff: int = 512
    pre_ln: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    mem_len: int = 0
    cutoffs: tuple[int, ...] = ()
    div_val: int = 1
    compute_dtype: Any = None

    @property
    def adaptive(self) -> bool:
        return bool(self.cutoffs) or self.div_val > 1

    def setup(self):
        if self.adaptive:
            if not self.tie_embeddings:
                raise ValueError("adaptive embeddings/softmax (cutoffs, div_val) are always tied: set tie_embeddings")
            self.softmax = AdaptiveSoftmax(self.vocab_size, self.d_model, tuple(self.cutoffs), self.div_val)
        else:
            self.embed = nn.Embed(self.vocab_size, self.d_model)
        self.inject_proj = nn.Dense(self.d_model)
        self.deq = DEQ(
            DEQTransformerCell(self.d_model, self.num_heads, self.d_ff, self.pre_ln), compute_dtype=self.compute_dtype
        )
        self.final_norm = nn.LayerNorm()
        if not self.tie_embeddings:
            self.output = nn.Dense(self.vocab_size)

    def inject(self, tokens: Array, dropout_keys: Array | None = None, memory: Memory | None = None) -> dict[str, Any]:
        """Tokens ``[B, T]`` -> ``{"injection": [B, T, d_model], "masks": [B, 1, d_ff]}``, plus
        ``"memory"`` when ``mem_len > 0``: the :class:`AttendedMemory` of ``memory`` (of an
        empty one if None), computed here once rather than at every cell application.

        ``injection = Dense(sqrt(d_model) * embed(tokens))`` (unit scale, see module doc)."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"DEQTransformer expects integer tokens [B, T], got {tokens.dtype} {tokens.shape}")
        if self.adaptive:
            embedded = self.softmax.embed(tokens)  # scaled by sqrt(d_model) inside
        else:
            embedded = self.embed(tokens) * jnp.sqrt(jnp.float32(self.d_model))
        injection = self.inject_proj(embedded)
        shape = (1, self.d_ff)
        if dropout_keys is not None and self.dropout > 0:
            keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - self.dropout, shape))(dropout_keys)
            masks = keep.astype(injection.dtype) / (1.0 - self.dropout)
        else:
            masks = jnp.ones((tokens.shape[0],) + shape, injection.dtype)
        x = {"injection": injection, "masks": masks}
        memory = self._memory(tokens.shape[0], memory)
        if memory is not None:
            x["memory"] = self.deq.cell.attended_memory(memory)
        return x

    def _memory(self, batch: int, memory: Memory | None) -> Memory | None:
        """``memory`` checked against this model (an empty one when ``mem_len > 0`` and
        ``memory`` is None)."""
        if not self.mem_len:
            if memory is not None:
                raise ValueError("this DEQTransformer has mem_len 0: it takes no memory")
            return None
        if memory is None:
            return empty_memory(batch, self.mem_len, self.d_model)
        if memory.states.shape != (batch, self.mem_len, self.d_model):
            raise ValueError(
                f"memory states must be [B, mem_len, d_model] = {[batch, self.mem_len, self.d_model]}, "
                f"got {list(memory.states.shape)}"
            )
        return memory

    def initial_state(self, x: dict[str, Any]) -> Array:
        return jnp.zeros_like(x["injection"])

    def cell(self, x: dict[str, Any], z: Array) -> Array:
        """One causal Transformer block on ``z + injection``: ``[B, T, D] -> [B, T, D]``."""
        return self.deq.cell(x, z)

    def head(self, z: Array) -> Array:
        """Equilibrium state ``[B, T, D]`` -> logits ``[B, T, vocab_size]`` (with adaptive
        softmax: the log-probabilities, every token's)."""
        h = self.final_norm(z)
        if self.adaptive:
            return self.softmax.log_probs(h)
        if self.tie_embeddings:
            return self.embed.attend(h)
        return self.output(h)

    def __call__(
        self,
        tokens: Array,
        dropout_keys: Array | None = None,
        memory: Memory | None = None,
        targets: Array | None = None,
        **layer_args,
    ) -> ModelOutput:
        """Tokens ``[B, T]`` -> logits ``[B, T, vocab]`` through the equilibrium (or ``unroll``
        cells); the arguments as in :meth:`deq_jax.models.MDEQ.__call__`, plus ``memory``
        (``mem_len > 0``: the previous segment's; None at the start of a stream) and
        ``targets`` ``[B, T]``: the output's ``target_log_prob`` is then ``log p(target)``,
        and with adaptive softmax no full distribution is formed (``logits`` is None). The
        output's ``memory`` is the one for the next segment."""
        memory = self._memory(tokens.shape[0], memory)
        x = self.inject(tokens, dropout_keys, memory)
        z, stats = self.deq(x, self.initial_state(x), **layer_args)
        new_memory = None if memory is None else update_memory(memory, z + x["injection"])
        logits, target_log_prob = self.readout(z, targets)
        corrections = None if stats.states is None else tuple(self.readout(s, targets) for s in stats.states[:-1])
        return ModelOutput(logits, z, x, stats, new_memory, target_log_prob, corrections)

    def readout(self, z: Array, targets: Array | None) -> tuple[Array | None, Array | None]:
        """``(logits, target_log_prob)`` of a state ``[B, T, d_model]``: logits ``[B, T, vocab]``
        (None with adaptive softmax and targets), ``log p(target)`` ``[B, T]`` (None without targets)."""
        if targets is None:
            return self.head(z), None
        if self.adaptive:
            return None, self.softmax.log_prob(self.final_norm(z), targets)
        logits = self.head(z)
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return logits, jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
