"""Faster XLA CPU code for DEQ training (same math): import this before jax.

    import experiments.cpu_flags  # noqa: F401  (first, before jax)

Sets ``--xla_cpu_experimental_ynn_fusion_type=individual_dot
--xla_cpu_copy_insertion_use_region_analysis=true`` (see README "CPU performance notes");
a user's own ``XLA_FLAGS`` come last and win. Every entry point that trains imports it, so
that a run gives the same numbers whichever script starts it: unregularized DEQ training
is chaotic enough that a different float rounding order changes its outcome.
"""

import os

CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot --xla_cpu_copy_insertion_use_region_analysis=true"
if CPU_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{CPU_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()
