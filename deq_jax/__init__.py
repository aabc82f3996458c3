"""deq_jax: deep equilibrium models with Jacobian regularization, in JAX.

The public API is flat:

    import deq_jax
    z_star, result = deq_jax.fixed_point(f, params, x, z0)
    penalty = deq_jax.hutchinson_frobenius(lambda z: f(params, x, z), z_star, key)
    result = deq_jax.solvers.broyden(g, z0)

A DEQ layer inside your own model: :class:`deq_jax.linen.DEQ` (Flax Linen),
:class:`deq_jax.nnx.DEQ` (Flax NNX), or :func:`deq_jax.equilibrium` on a pure
``f(params, x, z)`` (Equinox, plain JAX).
"""

from deq_jax import linen, nnx, solvers, weight_norm
from deq_jax.correction import Correction
from deq_jax.deq import (
    BackwardStats,
    Phantom,
    Reversible,
    SolverConfig,
    adjoint_solve,
    fixed_point,
    unrolled,
)
from deq_jax.jacobian import exact_frobenius, hutchinson_frobenius, spectral_radius
from deq_jax.layer import DEQStats, equilibrium
from deq_jax.solvers import SolverResult

__version__ = "0.3.0"

__all__ = [
    "BackwardStats",
    "Correction",
    "DEQStats",
    "Phantom",
    "Reversible",
    "SolverConfig",
    "SolverResult",
    "adjoint_solve",
    "equilibrium",
    "exact_frobenius",
    "fixed_point",
    "hutchinson_frobenius",
    "linen",
    "nnx",
    "solvers",
    "spectral_radius",
    "unrolled",
    "weight_norm",
]
