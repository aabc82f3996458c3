"""Starting one process of a multi-process run (JAX's multi-controller runtime).

Every process runs the same training command; together they form one run over all their
devices (``jax.devices()``), each process loading only its share of every batch
(:func:`deq_jax.train.step.process_rows`). :func:`initialize` must run before anything
starts JAX's backend::

    # by hand, on each of two machines (process_id 0 and 1):
    deq-jax-train --coordinator_address=10.0.0.1:4321 --num_processes=2 --process_id=0 ...

    # where JAX detects the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU):
    deq-jax-train --config.multihost=True ...

Processes that run on CPUs exchange their collectives through gloo (JAX's CPU
collectives); GPUs and TPUs use their own (NCCL, ICI), so the setting does not touch them.
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int | None = None,
               heartbeat_timeout_s: int | None = None) -> None:
    """Joins this process to a multi-process run (``jax.distributed.initialize``).

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator service; None: JAX's
        cluster auto-detection (SLURM, Open MPI, Kubernetes, Cloud TPU) fills in all three.
      num_processes, process_id: this run's process count and this process's index in
        ``[0, num_processes)``; given together with ``coordinator_address`` when starting
        processes by hand.
      timeout_s: seconds to wait for every process to join (None: JAX's default, 300 s).
      heartbeat_timeout_s: seconds without a heartbeat after which a process counts as lost
        and every other process stops with an error naming it (None: JAX's default, 100 s).

    Raises:
      ValueError: only some of the three are given, or ``process_id`` is out of range.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("give all of coordinator_address, num_processes and process_id (processes started by "
                         "hand) or none of them (a cluster JAX detects: SLURM, Open MPI, Kubernetes, Cloud TPU); "
                         f"got coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                         f"process_id={process_id!r}")
    if all(given) and not (num_processes >= 1 and 0 <= process_id < num_processes):
        raise ValueError(f"process_id must be in [0, num_processes); got process_id={process_id}, "
                         f"num_processes={num_processes}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {k: v for k, v in (("initialization_timeout", timeout_s),
                                ("heartbeat_timeout_seconds", heartbeat_timeout_s)) if v is not None}
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
