"""Stopping a run cleanly on SIGTERM (how SLURM and preemptible cloud machines stop a job)
or SIGINT (Ctrl-C): a checkpoint at the next log boundary, then :class:`Interrupted`::

    with preemption.watch() as requested:
        for step in ...:
            ...
            if at_log_boundary and preemption.agreed(requested()):
                save the checkpoint of this step; raise preemption.Interrupted(...)

The signal only sets a flag; the loop looks at it where a checkpoint restores to exactly
the metrics of an uninterrupted run (a log boundary). On several processes they agree
first (:func:`agreed`), so that every process saves the same step, whichever got the
signal.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """A run stopped by a signal after writing the checkpoint of ``step``.

    Attributes:
      step: the step of the checkpoint written on the way out.
      signal_name: ``"SIGTERM"`` or ``"SIGINT"``.
      exit_code: the conventional status of a process ended by that signal (128 + number).
    """

    def __init__(self, step: int, signal_name: str, run_dir: str):
        self.step, self.signal_name, self.run_dir = step, signal_name, run_dir
        self.exit_code = 128 + int(getattr(signal, signal_name))
        super().__init__(f"{signal_name} at step {step}: checkpoint written to {run_dir}")


@contextlib.contextmanager
def watch() -> Iterator[Callable[[], str | None]]:
    """While open, SIGTERM and SIGINT set a flag instead of ending the process; yields a
    function returning the name of the first signal received (None while none was). Outside
    the main thread (where Python cannot install handlers) nothing is installed."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handler(signum, frame):
        if not received:
            received.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield lambda: received[0] if received else None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def agreed(requested: str | None) -> str | None:
    """The signal any process received (every process gets the same answer), or None. One
    small all-gather on several processes; nothing on one."""
    if jax.process_count() == 1:
        return requested
    from jax.experimental import multihost_utils

    codes = np.ravel(multihost_utils.process_allgather(np.int32(int(getattr(signal, requested)) if requested else 0)))
    first = next((int(c) for c in codes if c), 0)
    return signal.Signals(first).name if first else None
