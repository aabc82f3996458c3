"""Mixed precision for equilibrium cells: f in a low-precision dtype, everything else not.

    f_bf16 = in_compute_dtype(f, jnp.bfloat16)

``f_bf16(params, x, z)`` casts the floating-point leaves of its inputs to bfloat16, runs
``f`` and casts the result back to z's dtypes. Used as the map of a solve, the
parameters stay float32 (their gradients too: the casts' VJPs cast back), and so do the
solver's iterates, residual norms and Broyden/Anderson products: the solver only ever
sees float32 z. What bfloat16 costs is f's own rounding, about 3 significant digits, so a
relative residual much below 1e-2 is not reachable: set the forward and backward
tolerances accordingly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def cast_floating(tree: PyTree, dtype) -> PyTree:
    """``tree`` with its floating-point leaves cast to ``dtype`` (integer leaves, e.g.
    PRNG keys or token ids, unchanged)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree)


def check_compute_dtype(compute_dtype) -> None:
    """``ValueError`` unless ``compute_dtype`` is None or one of :data:`COMPUTE_DTYPES`."""
    if compute_dtype is None:
        return
    try:
        name = jnp.dtype(compute_dtype).name
    except TypeError:  # not a dtype at all, e.g. "bf16"
        name = None
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be None or one of {COMPUTE_DTYPES}, got {compute_dtype!r}")


def in_compute_dtype(f: Callable, compute_dtype) -> Callable:
    """``f(params, x, z)`` computed in ``compute_dtype`` and returned in z's dtypes (see
    module doc); None: ``f`` itself."""
    check_compute_dtype(compute_dtype)
    if compute_dtype is None:
        return f

    def f_low(params, x, z):
        out = f(*cast_floating((params, x, z), compute_dtype))
        return jax.tree.map(lambda o, zz: o.astype(zz.dtype), out, z)

    return f_low
