"""A deep equilibrium layer for Flax NNX: ``z* = cell(x, z*)`` inside your own model::

    class Cell(nnx.Module):                     # any module: cell(x, z) -> z
        def __init__(self, d, rngs):
            self.linear = nnx.Linear(d, d, rngs=rngs)
        def __call__(self, x, z):
            return jnp.tanh(self.linear(z) + x)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Linear(64, 32, rngs=rngs)
            self.deq = deq_jax.nnx.DEQ(Cell(32, rngs))
            self.head = nnx.Linear(32, 10, rngs=rngs)
        def __call__(self, inputs, jr_key=None):
            z, stats = self.deq(self.embed(inputs), jr_keys=jr_key)   # z0 = zeros like x
            return self.head(z), stats

``stats`` is a :class:`deq_jax.DEQStats` (the forward solver's statistics; the
per-example JR term when keys are given).

How it works: on every call the cell is split into its graph and its state
(``nnx.split``: the ``nnx.Param`` variables, then everything else); the state is the
explicit ``params`` of the pure ``f(state, x, z) = nnx.merge(graph, state)(x, z)``
handed to :func:`deq_jax.equilibrium`, so ``nnx.grad`` of the enclosing model reaches
the parameters through the implicit backward pass and nothing differentiable is closed
over. Every evaluation of f starts from the same state, so whatever the cell changes
while it runs is discarded (it must not rely on changing its own state). Randomness:
before the solve each of the cell's rng streams (``nnx.Rngs``; e.g. an ``nnx.Dropout``'s)
draws one key, advancing the stream, and the solve sees the stream reset to that key,
so a dropout mask is the same at every solver step, in the backward solve and in the
JR term, and the next call draws new masks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from deq_jax import deq
from deq_jax.correction import Correction
from deq_jax.layer import DEQStats, equilibrium
from deq_jax.mixed_precision import check_compute_dtype, in_compute_dtype
from deq_jax.weight_norm import conv, weight_norm

Array = jax.Array
PyTree = Any


class DEQ(nnx.Module):
    """Wraps a cell module ``cell(x, z) -> z`` into ``(x, z0) -> (z*, stats)``.

    Args:
      cell: an NNX module called as ``cell(x, z)``, returning z's structure and shapes.
      forward: the forward :class:`~deq_jax.SolverConfig`.
      backward: the backward :class:`~deq_jax.SolverConfig` (implicit), a
        :class:`~deq_jax.Phantom`, or :class:`~deq_jax.Reversible` (with the reversible
        forward solver).
      jr_probes: Hutchinson probes per example of the JR term.
      jr_mode: ``"vjp"`` or ``"jvp"``: how the JR term is estimated (see
        :func:`deq_jax.equilibrium`).
      compute_dtype: None, or a dtype (e.g. ``jnp.bfloat16``) to evaluate the cell in;
        its parameters, z and the solver stay float32 (:mod:`deq_jax.mixed_precision`).
      correction: None, or a :class:`deq_jax.Correction` (fixed-point correction):
        ``stats.states`` then holds the states to supervise, the last being z*.

    Example:
      >>> import jax, jax.numpy as jnp, deq_jax
      >>> from flax import nnx
      >>> class Cell(nnx.Module):
      ...     def __init__(self, d, rngs):
      ...         self.linear = nnx.Linear(d, d, rngs=rngs)
      ...     def __call__(self, x, z):
      ...         return jnp.tanh(self.linear(z) + x)
      >>> layer = deq_jax.nnx.DEQ(Cell(16, nnx.Rngs(0)))
      >>> z, stats = layer(jnp.ones((8, 16)), jr_keys=jax.random.key(1))
      >>> z.shape, stats.jr.shape
      ((8, 16), (8,))
      >>> bool(stats.result.converged.all())
      True
    """

    def __init__(
        self,
        cell: nnx.Module,
        *,
        forward: deq.SolverConfig = deq.DEFAULT_FORWARD,
        backward: deq.SolverConfig | deq.Phantom | deq.Reversible = deq.DEFAULT_BACKWARD,
        jr_probes: int = 1,
        jr_mode: str = "vjp",
        compute_dtype: Any = None,
        correction: Correction | None = None,
    ):
        check_compute_dtype(compute_dtype)
        self.cell = cell
        self.forward = forward
        self.backward = backward
        self.jr_probes = jr_probes
        self.jr_mode = jr_mode
        self.compute_dtype = compute_dtype
        self.correction = correction

    def __call__(
        self,
        x: PyTree,
        z0: PyTree | None = None,
        *,
        step_limit: Array | int | None = None,
        probe: deq.BackwardStats | None = None,
        unroll: int | None = None,
        jr_keys: Array | None = None,
        jr_if: Array | bool | None = None,
        jr_probes: int | None = None,
        jr_mode: str | None = None,
        forward: deq.SolverConfig | None = None,
        backward: deq.SolverConfig | deq.Phantom | deq.Reversible | None = None,
        correction: Correction | None = None,
    ) -> tuple[PyTree, DEQStats]:
        """Solves ``z = cell(x, z)`` from ``z0`` (default: zeros like ``x``).

        Arguments and result as in :meth:`deq_jax.linen.DEQ.__call__`.
        """
        if z0 is None:
            z0 = jax.tree.map(jnp.zeros_like, x)
        f, theta = self.cell_function()
        return equilibrium(
            f,
            theta,
            x,
            z0,
            forward=forward or self.forward,
            backward=backward or self.backward,
            step_limit=step_limit,
            probe=probe,
            unroll=unroll,
            jr_keys=jr_keys,
            jr_probes=jr_probes or self.jr_probes,
            jr_mode=jr_mode or self.jr_mode,
            jr_if=jr_if,
            correction=correction or self.correction,
        )

    def cell_function(self):
        """``(f, theta)``: the pure ``f(theta, x, z) = cell(x, z)`` (in ``compute_dtype``) and its explicit input
        ``theta = (params, rest)``, the cell's state with every rng stream set to a key
        drawn now (each stream advances by one draw)."""
        _check_stateless(self.cell)
        streams = [node for _, node in nnx.iter_graph(self.cell) if isinstance(node, nnx.RngStream)]
        saved = [(s.key.get_value(), s.count.get_value()) for s in streams]
        draws = [s() for s in streams]  # advances the live streams: the next call draws anew
        advanced = [s.count.get_value() for s in streams]
        for s, key in zip(streams, draws, strict=True):
            s.key.set_value(key)
            s.count.set_value(jnp.zeros_like(s.count.get_value()))
        graph, params, rest = nnx.split(self.cell, nnx.Param, ...)
        for s, (key, _), count in zip(streams, saved, advanced, strict=True):
            s.key.set_value(key)
            s.count.set_value(count)

        def f(theta, x, z):
            # Fresh Variables at the caller's trace level (f runs inside solver loops,
            # where the cell may update its copy, e.g. an rng count).
            return nnx.merge(graph, *jax.tree.map(lambda leaf: leaf, theta))(x, z)

        return in_compute_dtype(f, self.compute_dtype), (params, rest)


def _check_stateless(cell: nnx.Module) -> None:
    """``ValueError`` for a cell holding a BatchNorm in training mode: its statistics couple the
    examples and its running averages would be updated by every solver step (the layer
    discards them, so they would silently never change)."""
    for path, node in nnx.iter_graph(cell):
        if isinstance(node, nnx.BatchNorm) and not node.use_running_average:
            where = "/".join(map(str, path)) or "the cell"
            raise ValueError(
                f"the cell's BatchNorm at {where!r} is in training mode (use_running_average=False). A DEQ cell must "
                "be a fixed map: batch statistics couple the examples (each is solved, and stops, on its own) and "
                "running averages updated at every solver step are discarded by the solve. Use nnx.LayerNorm or "
                "nnx.GroupNorm, or put the BatchNorm in evaluation mode (use_running_average=True, or .eval())."
            )


class WNLinear(nnx.Module):
    """Weight-normalized dense layer (NNX): ``y = x @ w + b`` with ``w = g * v / ||v||`` per
    output unit (:func:`deq_jax.weight_norm.weight_norm`); the same parameters and
    initialization as :class:`deq_jax.linen.WNDense`.

    Args:
      in_features, out_features: input and output sizes.
      rngs: draws ``v`` (LeCun normal); ``g`` starts at ones, ``b`` at zeros.
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.v = nnx.Param(jax.nn.initializers.lecun_normal()(rngs.params(), (in_features, out_features)))
        self.g = nnx.Param(jnp.ones((out_features,)))
        self.b = nnx.Param(jnp.zeros((out_features,)))

    def __call__(self, x: Array) -> Array:
        w = weight_norm(self.v[...], self.g[...], (0,))
        return x @ w.astype(x.dtype) + self.b[...].astype(x.dtype)


class WNConv(nnx.Module):
    """Weight-normalized 2-D convolution without bias (NNX; NHWC, "SAME" padding):
    ``w = g * v / ||v||`` per output channel; as :class:`deq_jax.linen.WNConv`.

    Args:
      in_features, out_features: input and output channels.
      kernel_size, strides: square kernel side and stride.
      rngs: draws ``v`` (LeCun normal); ``g`` starts at ones.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, strides: int = 1, *,
                 rngs: nnx.Rngs):
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.v = nnx.Param(jax.nn.initializers.lecun_normal()(rngs.params(), shape))
        self.g = nnx.Param(jnp.ones((out_features,)))
        self.strides = strides

    def __call__(self, x: Array) -> Array:
        return conv(x, weight_norm(self.v[...], self.g[...], (0, 1, 2)), self.strides)
