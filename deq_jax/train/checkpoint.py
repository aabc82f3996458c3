"""Checkpoints of a train state: one file per step, written atomically, the last k kept.

A checkpoint is ``ckpt_<step>.msgpack`` (flax serialization of the host copy of the
state). It is written to a temporary file, flushed to disk, renamed, and the directory
entry flushed too, so a run killed at any moment (or a machine losing power) leaves either
the previous checkpoints or the new one, never a partial file under a checkpoint name.
Restoring checks every leaf's shape and dtype against the template (a mismatch is an
error naming the leaf); a newest checkpoint that cannot be read (truncated, corrupt) is
skipped with a warning naming it, for the newest one that can.

Why not Orbax: the train states here are replicated (every device holds the whole state),
small, and written by one process, so one msgpack file per step does everything needed,
with no further dependency; docs/reliability.md lists what is guaranteed and the tests.
"""

from __future__ import annotations

import errno
import os
import re
import warnings
from pathlib import Path

import flax.serialization
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

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
    _sync_dir(path.parent)
    for old in steps(run_dir)[:-keep]:
        _path(Path(run_dir), old).unlink(missing_ok=True)
    return path


def _sync_dir(directory: Path) -> None:
    """Flushes a directory's entries (the rename) to disk, where the OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError as e:  # filesystems that cannot fsync a directory say so; anything else is an error
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _read(run_dir: str | os.PathLike, step: int | None) -> tuple[dict, int]:
    """The saved state dict of ``step``, or of the newest readable checkpoint."""
    available = steps(run_dir)
    if not available:
        raise FileNotFoundError(f"no checkpoint (ckpt_*.msgpack) in {run_dir}")
    if step is not None and step not in available:
        raise FileNotFoundError(f"no checkpoint of step {step} in {run_dir}; it has steps {available}")
    candidates = [step] if step is not None else available[::-1]
    for i, s in enumerate(candidates):
        path = _path(Path(run_dir), s)
        try:
            return flax.serialization.msgpack_restore(path.read_bytes()), s
        except Exception as e:  # msgpack raises several types for a truncated or corrupt file
            if i + 1 == len(candidates):
                raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
            warnings.warn(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                          f"using the older {_path(Path(run_dir), candidates[i + 1]).name}", stacklevel=3)
    raise AssertionError("unreachable")


def _like(template, saved: dict, source: str):
    """``saved`` restored into the structure of ``template``, every leaf's shape and dtype
    checked against it (``ValueError`` naming the first leaf that differs)."""
    want = set(flatten_dict(flax.serialization.to_state_dict(template), sep="/"))
    saved = _moved_cell_layout(want, saved, source)
    have = set(flatten_dict(saved, sep="/"))
    if want != have:
        raise ValueError(f"{source} does not match the model's state: leaves missing from the checkpoint "
                         f"{sorted(want - have)[:5]}, leaves the model does not have {sorted(have - want)[:5]}")
    restored = flax.serialization.from_state_dict(template, saved)
    expected = jax.tree_util.tree_flatten_with_path(template)[0]
    got = jax.tree.leaves(restored)
    for (keys, model_leaf), leaf in zip(expected, got, strict=True):
        leaf = np.asarray(leaf)
        if tuple(leaf.shape) != tuple(model_leaf.shape) or leaf.dtype != np.dtype(model_leaf.dtype):
            raise ValueError(
                f"{source}: leaf {jax.tree_util.keystr(keys)} is {leaf.dtype}{list(leaf.shape)}, the model "
                f"expects {np.dtype(model_leaf.dtype)}{list(model_leaf.shape)} "
                "(a checkpoint of another model or config?)")
    return restored


_CELL = "deq/cell/"


def _moved_cell_layout(want: set[str], saved: dict, source: str) -> dict:
    """A checkpoint of deq_jax 0.1, whose models kept their cell's parameters at the top
    level (``blocks_0``, ``fuse``; ``attention``, ``ff_in``, ...), restated in today's
    layout, where they live under the ``deq/cell`` scope of the model's DEQ layer (in the
    parameters and in every optimizer-state tree that mirrors them); other checkpoints
    are returned unchanged."""
    leaves = set(flatten_dict(saved, sep="/"))
    if leaves == want or not any(_CELL in key for key in want):
        return saved
    old_name = {key.replace(_CELL, "", 1): key for key in want if _CELL in key}
    if any(_CELL in key for key in leaves) or not set(old_name) <= leaves:
        return saved  # not the old layout: _like reports the mismatch
    warnings.warn(f"{source} has deq_jax 0.1's parameter layout (the cell at the model's top level); "
                  f"restoring it under {_CELL[:-1]!r}", stacklevel=4)
    flat = flatten_dict(saved, sep="/", keep_empty_nodes=True)
    return unflatten_dict({old_name.get(key, key): value for key, value in flat.items()}, sep="/")


def restore(run_dir: str | os.PathLike, template, step: int | None = None):
    """``(state, step)`` from the newest readable checkpoint (or ``step``), shaped like
    ``template``.

    Raises ``FileNotFoundError`` if there is none, ``ValueError`` if no candidate can be
    read or its leaves do not match ``template``'s shapes and dtypes.
    """
    saved, step = _read(run_dir, step)
    return _like(jax.device_get(template), saved, str(_path(Path(run_dir), step))), step


def restore_params(run_dir: str | os.PathLike, template, step: int | None = None):
    """``(params, step)``: only the parameters of a saved train state, shaped like
    ``template`` (arrays or ``jax.ShapeDtypeStruct``; no optimizer state needed)."""
    saved, step = _read(run_dir, step)
    if "params" not in saved:
        raise ValueError(f"{_path(Path(run_dir), step)} holds no 'params' (not a train state checkpoint)")
    return _like(template, saved["params"], str(_path(Path(run_dir), step))), step
