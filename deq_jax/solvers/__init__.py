"""Fixed-point solvers for ``z = f(z)`` on a batch, all returning a :class:`SolverResult`.

    from deq_jax import solvers
    result = solvers.broyden(f, z0, max_steps=30, tol=1e-3)
    solve = solvers.get("anderson")
"""

from deq_jax.solvers.anderson import anderson
from deq_jax.solvers.base import SolverResult, residual_norms
from deq_jax.solvers.broyden import broyden
from deq_jax.solvers.fixed_point_iteration import fixed_point_iteration
from deq_jax.solvers.reversible import reversible

SOLVERS = {
    "broyden": broyden,
    "anderson": anderson,
    "fixed_point_iteration": fixed_point_iteration,
    "reversible": reversible,
}


def get(name: str):
    """The solver function called ``name``; ``ValueError`` naming the choices if unknown."""
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None


__all__ = [
    "SOLVERS",
    "SolverResult",
    "anderson",
    "broyden",
    "fixed_point_iteration",
    "get",
    "residual_norms",
    "reversible",
]
