"""Convolutions in the layout XLA's CPU backend runs fast, also inside solver loops.

XLA's CPU backend runs a convolution with its fast (Eigen) kernels only in the layout
input ``[N, spatial..., C]``, kernel ``[spatial..., I, O]``, output ``[N, spatial..., C]``.
A pass rewrites other layouts into that one with transposes, but it visits the entry
computation only (``xla::cpu::ConvCanonicalization``): a convolution in another layout
inside a while loop falls back to a naive loop nest. The transposed convolution of a
VJP has its kernel as ``[spatial..., O, I]``, so every step of an adjoint solve of a
convolutional cell ran it (7x slower than the same VJP outside a loop on the benchmark's
conv cell), as does a forward solve of a cell written in NCHW.

:func:`canonical_convolutions` re-traces a function and puts every convolution in that
layout itself (transposes of its operands and result, which XLA folds or makes cheap);
everything else is evaluated as it was. Values are those of the original function up
to the convolutions' summation order. The solvers apply it to ``f`` on CPU only
(:func:`on_cpu`, in ``base.solve``), as does the power iteration of
``deq_jax.spectral_radius`` to its VJPs; on other backends their compilers choose
convolution layouts themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.extend.core as jex
from jax import lax

_CONV = jex.primitives.conv_general_dilated_p
_JIT = jex.primitives.jit_p


def _canonical_dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    """``[N, spatial..., C]``, ``[spatial..., I, O]``, ``[N, spatial..., C]`` for ``ndim`` axes."""
    spatial = tuple(range(1, ndim - 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim - 1) + spatial,
        rhs_spec=(ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
        out_spec=(0, ndim - 1) + spatial,
    )


def is_canonical(dimension_numbers: lax.ConvDimensionNumbers) -> bool:
    """Whether a convolution's layout is the one XLA's CPU backend runs fast."""
    return tuple(dimension_numbers) == tuple(_canonical_dimension_numbers(len(dimension_numbers.lhs_spec)))


def _canonical_conv(lhs, rhs, *, dimension_numbers, **params):
    """The convolution ``conv_general_dilated_p`` computes, in the canonical layout."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    lhs = lax.transpose(lhs, (lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],))
    rhs = lax.transpose(rhs, tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0]))
    out = _CONV.bind(lhs, rhs, dimension_numbers=_canonical_dimension_numbers(lhs.ndim), **params)
    # out is [N, spatial..., C]; axis out_spec[j] of the result is canonical axis order[j].
    order = (0, out.ndim - 1) + tuple(range(1, out.ndim - 1))
    permutation = [0] * out.ndim
    for position, axis in zip(out_spec, order):
        permutation[position] = axis
    return lax.transpose(out, tuple(permutation))


def _eval(jaxpr: jex.Jaxpr, consts, *args):
    """Evaluates ``jaxpr`` with every convolution in the canonical layout (inside nested
    ``jit``s too; other higher-order primitives are bound as they are)."""
    env = {}

    def read(var):
        return var.val if isinstance(var, jex.Literal) else env[var]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(var) for var in eqn.invars]
        if eqn.primitive is _CONV and not is_canonical(eqn.params["dimension_numbers"]):
            outvals = [_canonical_conv(*invals, **eqn.params)]
        elif eqn.primitive is _JIT:
            inner = eqn.params["jaxpr"]
            outvals = _eval(inner.jaxpr, inner.consts, *invals)
        else:  # as jax.core.eval_jaxpr does
            with eqn.ctx.manager:
                outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        for var, value in zip(eqn.outvars, outvals, strict=True):
            env[var] = value
    return [read(var) for var in jaxpr.outvars]


def canonical_convolutions(f: Callable) -> Callable:
    """``f`` (a function of one pytree of arrays) with its convolutions in the layout XLA's
    CPU backend runs fast (module doc): ``f`` traced once to a jaxpr, which is then
    evaluated with every other convolution rewritten."""

    def f_canonical(z):
        closed, out_shape = jax.make_jaxpr(f, return_shape=True)(z)
        out = _eval(closed.jaxpr, closed.consts, *jax.tree.leaves(z))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return f_canonical


def on_cpu(f: Callable) -> Callable:
    """:func:`canonical_convolutions` of ``f`` when JAX's default backend is the CPU,
    ``f`` itself otherwise."""
    return canonical_convolutions(f) if jax.default_backend() == "cpu" else f
