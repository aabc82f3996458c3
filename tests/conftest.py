"""Test-session settings: a persistent XLA compilation cache shared with subprocesses.

The training tests compile the same train/eval steps in several processes (a run, the
same run killed and resumed, 1 vs 4 devices); the cache lets later ones reuse the
executables, which keeps the suite short on 2 cores. Set through the environment, so
the subprocesses the tests start use it too.
"""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "deq_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
