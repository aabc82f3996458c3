"""Test-session settings: full float32 matmuls, and a persistent XLA compilation cache
shared with subprocesses.

The tests compare with exact references (linear solves, finite differences, unrolled
gradients) at float32 tolerances, so they rely on float32 matmuls and convolutions. That
is what CPUs do by default, but NVIDIA GPUs run float32 matmuls in TF32 (about 3
significant digits) unless told otherwise: the suite asks for "highest" everywhere, also
in the subprocesses it starts. Tests of the ``precision`` option set their own.

The training tests compile the same train/eval steps in several processes (a run, the
same run killed and resumed, 1 vs 4 devices); the cache lets later ones reuse the
executables, which keeps the suite short on 2 cores. Set through the environment, so
the subprocesses the tests start use it too, as do the two pytest-xdist workers
(``setup.cfg``'s addopts; one test file per worker, so module fixtures run once).
"""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "deq_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
)
jax.config.update("jax_default_matmul_precision", "highest")
