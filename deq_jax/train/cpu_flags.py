"""Faster XLA CPU code for DEQ training (same math), for the command-line entry points::

    import deq_jax.train.cpu_flags as cpu_flags
    if __name__ == "__main__":
        cpu_flags.apply()  # before jax starts its backend
    import jax

:func:`apply` adds ``--xla_cpu_experimental_ynn_fusion_type=individual_dot
--xla_cpu_copy_insertion_use_region_analysis=true`` to ``XLA_FLAGS`` (see docs/performance.md,
"CPU notes"); a user's own ``XLA_FLAGS`` come last and win. Every script that trains
calls it, so that a run gives the same numbers whichever script starts it: unregularized
DEQ training is chaotic enough that a different float rounding order changes its outcome.
Importing this module changes nothing (tests import the scripts without these flags).

jax reads ``XLA_FLAGS`` when its backend starts (the first computation or device query),
not at ``import jax``, so :func:`apply` still works after ``import deq_jax``: importing
the library computes nothing (``tests/test_package.py`` checks that flags set after
importing :mod:`deq_jax.train.cli` still reach XLA).

The flags are experimental and XLA aborts the process on a flag it does not know, so
:func:`apply` first starts jax once in a subprocess with them (about 2 s): it adds them
only when that succeeds and jax's default backend there is the CPU (on a GPU or TPU
machine they would do nothing for the run).
"""

import os
import subprocess
import sys
import warnings

CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot --xla_cpu_copy_insertion_use_region_analysis=true"
_PROBE = "import jax; print(jax.default_backend())"


def _probe(flags: str) -> tuple[bool, str]:
    """(whether jax starts with ``XLA_FLAGS=flags``, its default backend or the error)."""
    env = dict(os.environ, XLA_FLAGS=flags)
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return False, "jax did not start within 300 s"
    if proc.returncode != 0:
        return False, (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return True, proc.stdout.strip().splitlines()[-1]


def apply(flags: str = CPU_FLAGS) -> bool:
    """Prepends ``flags`` to ``XLA_FLAGS`` (once) when jax starts with them and runs on the
    CPU; call before jax's backend starts (before the first computation). Returns whether
    they are set."""
    current = os.environ.get("XLA_FLAGS", "")
    if flags in current:
        return True
    combined = f"{flags} {current}".strip()
    ok, answer = _probe(combined)
    if not ok:
        warnings.warn(f"running without the XLA CPU flags {flags!r}: this jaxlib does not start with them ({answer})",
                      stacklevel=2)
        return False
    if answer != "cpu":
        return False
    os.environ["XLA_FLAGS"] = combined
    return True
