"""A deep equilibrium layer for Flax Linen: ``z* = cell(x, z*)`` inside your own model::

    class Cell(nn.Module):                      # any module: cell(x, z) -> z
        @nn.compact
        def __call__(self, x, z):
            return nn.tanh(nn.Dense(z.shape[-1])(z) + x)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, inputs, jr_key=None):
            x = nn.Dense(64)(inputs)
            z, stats = deq_jax.linen.DEQ(Cell())(x, jr_keys=jr_key)   # z0 = zeros like x
            return nn.Dense(10)(z), stats

``stats`` is a :class:`deq_jax.DEQStats`: the forward solver's statistics and, when JR
keys are given, the per-example Jacobian term to add to the loss
(``loss + gamma * stats.jr.mean()``).

How it works: the cell's variables are taken out of the module (``Module.unbind``) and
passed to :func:`deq_jax.equilibrium` as the explicit ``params`` of a pure
``f(params, x, z)``, so ``jax.grad`` of the enclosing model reaches them through the
implicit backward pass and nothing differentiable is closed over. Randomness: for each
rng stream in ``rng_streams`` that the call has (e.g. ``rngs={"dropout": key}``), one
key is drawn per call and given to *every* evaluation of the cell, so a dropout mask is
the same at every solver step, in the backward solve and in the JR term (a fixed map has
a fixed point), and a new call (a new training step, a new key) draws new masks.

The cell must not mutate variables (no BatchNorm statistics: use GroupNorm or
LayerNorm, which also keep examples independent, as per-example stopping needs).
"""

from __future__ import annotations

import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from deq_jax import deq
from deq_jax.correction import Correction
from deq_jax.layer import DEQStats, equilibrium
from deq_jax.mixed_precision import in_compute_dtype
from deq_jax.weight_norm import conv, weight_norm

Array = jax.Array
PyTree = Any


class DEQ(nn.Module):
    """Wraps a cell module ``cell(x, z) -> z`` into ``(x, z0) -> (z*, stats)``.

    Attributes:
      cell: a Linen module called as ``cell(x, z)``, returning z's structure and shapes.
        Its parameters live under this layer's ``cell`` scope when the layer is built in
        ``setup`` (under the enclosing module when the cell is built in ``@compact``).
      forward: the forward :class:`~deq_jax.SolverConfig`.
      backward: the backward :class:`~deq_jax.SolverConfig` (implicit), a
        :class:`~deq_jax.Phantom`, or :class:`~deq_jax.Reversible` (with the reversible
        forward solver).
      rng_streams: rng streams the cell may use (one key per call, fixed within a solve).
      jr_probes: Hutchinson probes per example of the JR term.
      jr_mode: ``"vjp"`` or ``"jvp"``: how the JR term is estimated (see
        :func:`deq_jax.equilibrium`).
      compute_dtype: None, or a dtype (e.g. ``jnp.bfloat16``) to evaluate the cell in;
        its parameters, z and the solver stay float32 (:mod:`deq_jax.mixed_precision`).
      correction: None, or a :class:`deq_jax.Correction` (fixed-point correction):
        ``stats.states`` then holds the states to supervise, the last being z*.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, deq_jax
      >>> class Cell(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, z):
      ...         return nn.tanh(nn.Dense(z.shape[-1])(z) + x)
      >>> layer = deq_jax.linen.DEQ(Cell())
      >>> x = jnp.ones((8, 16))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> z, stats = layer.apply(variables, x, jr_keys=jax.random.key(1))
      >>> z.shape, stats.jr.shape
      ((8, 16), (8,))
      >>> bool(stats.result.converged.all())
      True
    """

    cell: nn.Module
    forward: deq.SolverConfig = deq.DEFAULT_FORWARD
    backward: deq.SolverConfig | deq.Phantom | deq.Reversible = deq.DEFAULT_BACKWARD
    rng_streams: tuple[str, ...] = ("dropout",)
    jr_probes: int = 1
    jr_mode: str = "vjp"
    compute_dtype: Any = None
    correction: Correction | None = None

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

        Args:
          x: the cell's input (pytree; every leaf ``[B, ...]``).
          z0: the initial state (pytree of ``[B, ...]`` leaves).
          step_limit, probe: see :func:`deq_jax.fixed_point`.
          unroll, jr_keys, jr_if: see :func:`deq_jax.equilibrium` (``unroll=k``:
            pretraining through k cell applications; ``jr_keys``: request the JR term).
          jr_probes, jr_mode, forward, backward, correction: override the layer's attributes
            for this call (e.g. a larger step budget at evaluation).

        Returns:
          ``(z, stats)``: z with z0's structure and a :class:`deq_jax.DEQStats`.
        """
        if z0 is None:
            z0 = jax.tree.map(jnp.zeros_like, x)
        if self.is_initializing():
            self.cell(x, z0)  # creates the cell's variables
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
        """``(f, theta)``: the pure ``f(theta, x, z) = cell(x, z)`` (in ``compute_dtype``) and
        its explicit inputs ``theta = (variables, rngs)`` (the cell's variables; one key per
        rng stream the call has, drawn now). Use it for other quantities of the same map, e.g.
        ``deq_jax.spectral_radius(lambda z: f(theta, x, z), z_star, key)``."""
        unbound, variables = self.cell.unbind()
        rngs = {name: self.make_rng(name) for name in self.rng_streams if self.has_rng(name)}

        streams = self.rng_streams

        def f(theta, x, z):
            cell_variables, cell_rngs = theta
            try:
                return unbound.apply(cell_variables, x, z, rngs=cell_rngs or None)
            except flax.errors.InvalidRngError as e:
                raise ValueError(_missing_stream(str(e), streams)) from e
            except flax.errors.ModifyScopeVariableError as e:
                raise ValueError(_mutating_cell(str(e))) from e

        return in_compute_dtype(f, self.compute_dtype), (variables, rngs)


def _missing_stream(message: str, streams: tuple[str, ...]) -> str:
    """What to do when the cell asks for an rng stream that the layer does not pass on."""
    found = re.search(r'PRNG for "([^"]+)"', message)
    name = found.group(1) if found else "?"
    return (f"the cell asks for the rng stream {name!r}, but this DEQ layer passes it only the streams in "
            f"rng_streams={streams!r} (one key per call, fixed within the solve). List it: "
            f"DEQ(cell, rng_streams={(*streams, name)!r}), and give the call rngs={{{name!r}: key}}. "
            f"Flax said: {message.splitlines()[0]}")


def _mutating_cell(message: str) -> str:
    """What to do when the cell updates variables (e.g. BatchNorm's running statistics)."""
    return ("the cell updates its own variables while it runs (e.g. nn.BatchNorm(use_running_average=False) "
            "updating batch_stats). A DEQ cell must be a fixed map: nothing it changes between solver steps, and no "
            "statistics across the batch (each example is solved, and stops, on its own). Use nn.LayerNorm or "
            "nn.GroupNorm, or BatchNorm with use_running_average=True. "
            f"Flax said: {message.splitlines()[0]}")


class WNDense(nn.Module):
    """Weight-normalized dense layer: ``y = x @ w + b`` with ``w = g * v / ||v||`` per output
    unit (:func:`deq_jax.weight_norm.weight_norm`), the paper's cells' layer.

    Attributes:
      features: output units. Parameters: ``v`` ``[in, features]`` (LeCun normal), ``g``
        ``[features]`` (ones), ``b`` ``[features]`` (zeros).
    """

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        v = self.param("v", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        g = self.param("g", nn.initializers.ones, (self.features,))
        b = self.param("b", nn.initializers.zeros, (self.features,))
        return x @ weight_norm(v, g, (0,)).astype(x.dtype) + b.astype(x.dtype)


class WNConv(nn.Module):
    """Weight-normalized 2-D convolution without bias (NHWC, "SAME" padding):
    ``w = g * v / ||v||`` per output channel, the MDEQ's layer.

    Attributes:
      features: output channels. Parameters: ``v`` ``[k, k, in, features]`` (LeCun normal),
        ``g`` ``[features]`` (ones).
      kernel_size, strides: square kernel side and stride.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        v = self.param("v", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        g = self.param("g", nn.initializers.ones, (self.features,))
        return conv(x, weight_norm(v, g, (0, 1, 2)), self.strides)
