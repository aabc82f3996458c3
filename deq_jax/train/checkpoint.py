"""Checkpoints of a train state: one file per step, written atomically, the last k kept.

A checkpoint is ``ckpt_<step>.msgpack`` (flax serialization of the host copy of the
state). It is written to a temporary file, flushed to disk, then renamed, so a run
killed at any moment leaves either the previous checkpoints or the new one, never a
partial file under a checkpoint name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import flax.serialization
import jax

_NAME = re.compile(r"^ckpt_(\d{8})\.msgpack$")


def _path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:08d}.msgpack"


def steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps of the checkpoints in ``run_dir``, ascending."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = (_NAME.match(p.name) for p in run_dir.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def save(run_dir: str | os.PathLike, step: int, state, keep: int) -> Path:
    """Writes ``state`` as the checkpoint of ``step`` and deletes all but the newest ``keep``."""
    path = _path(Path(run_dir), step)
    data = flax.serialization.to_bytes(jax.device_get(state))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    for old in steps(run_dir)[:-keep]:
        _path(Path(run_dir), old).unlink(missing_ok=True)
    return path


def _read(run_dir: str | os.PathLike, step: int | None) -> tuple[bytes, int]:
    available = steps(run_dir)
    if not available:
        raise FileNotFoundError(f"no checkpoint (ckpt_*.msgpack) in {run_dir}")
    step = available[-1] if step is None else step
    if step not in available:
        raise FileNotFoundError(f"no checkpoint of step {step} in {run_dir}; it has steps {available}")
    with open(_path(Path(run_dir), step), "rb") as fh:
        return fh.read(), step


def restore(run_dir: str | os.PathLike, template, step: int | None = None):
    """``(state, step)`` from the newest checkpoint (or ``step``), shaped like ``template``.

    Raises ``FileNotFoundError`` if there is none.
    """
    data, step = _read(run_dir, step)
    return flax.serialization.from_bytes(jax.device_get(template), data), step


def restore_params(run_dir: str | os.PathLike, template, step: int | None = None):
    """``(params, step)``: only the parameters of a saved train state, shaped like
    ``template`` (arrays or ``jax.ShapeDtypeStruct``; no optimizer state needed)."""
    data, step = _read(run_dir, step)
    saved = flax.serialization.msgpack_restore(data)
    return flax.serialization.from_state_dict(template, saved["params"]), step
