"""Faster XLA CPU code for DEQ training (same math), for the command-line entry points.

    import experiments.cpu_flags as cpu_flags
    if __name__ == "__main__":
        cpu_flags.apply()  # before jax is imported
    import jax

:func:`apply` adds ``--xla_cpu_experimental_ynn_fusion_type=individual_dot
--xla_cpu_copy_insertion_use_region_analysis=true`` to ``XLA_FLAGS`` (see README "CPU
performance notes"); a user's own ``XLA_FLAGS`` come last and win. Every script that trains
calls it, so that a run gives the same numbers whichever script starts it: unregularized
DEQ training is chaotic enough that a different float rounding order changes its outcome.
Importing this module changes nothing (tests import the scripts without these flags).
"""

import os

CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot --xla_cpu_copy_insertion_use_region_analysis=true"


def apply() -> None:
    """Prepends :data:`CPU_FLAGS` to ``XLA_FLAGS`` (once); call before jax is imported."""
    current = os.environ.get("XLA_FLAGS", "")
    if CPU_FLAGS not in current:
        os.environ["XLA_FLAGS"] = f"{CPU_FLAGS} {current}".strip()
