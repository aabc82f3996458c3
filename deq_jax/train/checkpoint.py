"""Checkpoints of a train state on Orbax: written in the background by every process of a run,
atomic, the newest k kept, checked against the model when restored.

Why Orbax (``orbax.checkpoint.CheckpointManager``): the write overlaps training (``save``
returns once the arrays are copied off the devices), a run of several processes writes each
array's shards from the processes that hold them (a replicated array once), restores straight
into the live state's shardings, and any path Orbax supports works (a local disk, ``gs://...``).

The run folder::

    checkpoints/<step>/     one Orbax checkpoint per step (PyTreeCheckpointHandler): the state
                            as flax's state dict (flax.serialization.to_state_dict)
    checkpoints/<step>.orbax-checkpoint-tmp...   a checkpoint being written (renamed when complete)
    ckpt_<8-digit step>.msgpack   deq_jax <= 0.3's format (flax msgpack of the host state); restored

Guarantees (docs/reliability.md; the tests are in tests/test_checkpoint.py):

* A checkpoint is written to a temporary folder and renamed when complete (Orbax's atomic
  finalization; on GCS a ``commit_success.txt`` marks it), so a killed run leaves the earlier
  checkpoints and never a partial one under a step's name; the newest ``keep`` are kept (old
  msgpack ones counted too), an older one deleted only once the new one is complete.
* A newest checkpoint that cannot be read (truncated, corrupt) is skipped with a warning naming
  it, for the newest one that can; asked for by step, or with nothing older, an error naming it.
* A checkpoint of another model is a ``ValueError`` naming the first leaf whose shape or dtype
  differs, or the missing and extra leaves; deq_jax 0.1's parameter layout (the cell at the
  model's top level) restores under ``deq/cell`` with a warning.
* Full disk: before writing, the state's bytes plus a margin (10% and 1 MiB, for Orbax's
  metadata) are compared with the free space (local disks): if it does not fit, an
  ``OSError`` (ENOSPC) says what is needed and what to change, and nothing is written. A write
  that fails anyway raises such an error from ``wait()`` (or the next ``save()``), with its
  partial folder removed and the earlier checkpoints intact.
* A non-finite state is never saved: the training loop checks before calling ``save``.

Several processes (jax.distributed): every process makes its ``Checkpoints`` on the same shared
folder and calls ``save``, ``wait``, ``restore`` and ``close`` together (Orbax synchronizes them);
decisions (room on the disk, whether a checkpoint could be read) are made the same everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import warnings

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.experimental import multihost_utils

ORBAX_DIR = "checkpoints"
_LEGACY = re.compile(r"^ckpt_(\d{8})\.msgpack$")
_TMP = ".orbax-checkpoint-tmp"  # Orbax's suffix of a step folder being written
_MARGIN = (0.10, 2**20)  # room asked beyond the arrays' bytes: a fraction of them, and bytes


def _absolute(run_dir: str | os.PathLike) -> epath.Path:
    """``run_dir`` as an absolute path (a relative local one against the working directory);
    URLs such as ``gs://...`` unchanged."""
    path = os.fspath(run_dir)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def _legacy_name(step: int) -> str:
    return f"ckpt_{step:08d}.msgpack"


def _legacy_steps(run_dir: epath.Path) -> list[int]:
    if not run_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for m in (_LEGACY.match(p.name) for p in run_dir.iterdir()) if m)


def steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps of the checkpoints in ``run_dir`` (Orbax's and old msgpack ones), ascending."""
    run_dir = epath.Path(run_dir)
    return sorted(set(ocp.utils.checkpoint_steps(run_dir / ORBAX_DIR)) | set(_legacy_steps(run_dir)))


class Checkpoints:
    """The run folder's checkpoints. Every process of a multi-process run makes one and calls
    save/restore collectively (Orbax coordinates them; replicated arrays are written once).

    ``read_only``: restore only (nothing is created, written or deleted).
    """

    def __init__(self, run_dir: str | os.PathLike, keep: int, *, read_only: bool = False):
        self.run_dir = _absolute(run_dir)  # Orbax writes local checkpoints only under absolute paths
        self.directory = self.run_dir / ORBAX_DIR
        self.keep = keep
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, read_only=read_only,
                                               create=not read_only, cleanup_tmp_directories=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, item_handlers=ocp.PyTreeCheckpointHandler(),
                                              options=options)
        self._pending = None  # (step, bytes needed) of the save being written

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending (Orbax's and old msgpack ones)."""
        return steps(self.run_dir)

    def save(self, step: int, state) -> None:
        """Starts writing ``state`` as the checkpoint of ``step``; returns once its arrays are
        copied off the devices (they may change at once, e.g. be donated to the next step).
        Raises the previous save's error, or ``OSError`` if the disk has no room for it."""
        self.wait()
        tree = flax.serialization.to_state_dict(state)
        nbytes = sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(tree))  # global: replicas once
        needed = int(nbytes * (1 + _MARGIN[0])) + _MARGIN[1]
        free = _free_bytes(self.directory, collective=True)
        if free is not None and needed > free:
            raise OSError(errno.ENOSPC, f"checkpoint {self.directory / str(step)} not written: it needs {needed:,} "
                          f"bytes ({nbytes:,} of arrays, 10% and 1 MiB more for metadata) and {self.directory} has "
                          f"{free:,} free. {_ROOM}")
        try:
            self._manager.save(step, args=ocp.args.PyTreeSave(tree), force=True)
        except Exception as e:
            self._failed(step, needed, e)
        self._pending = (step, needed)

    def wait(self) -> None:
        """Blocks until the pending save is complete; raises its error (``OSError`` for a full
        disk, its partial folder removed, the earlier checkpoints intact)."""
        if self._pending is None:
            return
        (step, needed), self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._failed(step, needed, e)
        if jax.process_index() == 0:  # Orbax keeps its newest `keep`; counted with them, old msgpack ones go too
            for old in self.steps()[:-self.keep]:
                (self.run_dir / _legacy_name(old)).unlink(missing_ok=True)

    def _failed(self, step: int, needed: int, error: Exception):
        """Removes the partial folder of a save that failed and raises a clear error."""
        path = self.directory / str(step)
        if jax.process_count() > 1:  # every process has stopped writing (its save failed too, or timed out)
            multihost_utils.sync_global_devices(f"deq_jax.train.checkpoint: save of step {step} failed")
        if jax.process_index() == 0:
            partial = list(self.directory.glob(f"{step}{_TMP}*"))
            if path.exists() and step not in ocp.utils.checkpoint_steps(self.directory):
                partial.append(path)  # e.g. on GCS, written in place: no commit_success.txt yet
            for folder in partial:
                folder.rmtree()
        self._manager.reload()  # its list of steps as on disk again (the oldest was not deleted)
        kept = "its partial folder was removed and the earlier checkpoints are intact"
        free = _free_bytes(self.directory, collective=False)
        if _disk_full(error):
            raise OSError(errno.ENOSPC, f"checkpoint {path} could not be written, the disk is full: it needs "
                          f"{needed:,} bytes, {self.directory} has {'?' if free is None else f'{free:,}'} free; "
                          f"{kept}. {_ROOM}") from error
        if isinstance(error, OSError):
            raise OSError(error.errno, f"checkpoint {path} could not be written ({error}); {kept}") from error
        error.add_note(f"checkpoint {path} was not written; no partial folder is left, the earlier checkpoints "
                       "are intact")
        raise error

    def restore(self, template, step: int | None = None):
        """``(state, step)`` from the newest readable checkpoint (or ``step``), with the structure
        and shardings of ``template`` (the live state: ``jax.Array`` leaves, or
        ``jax.ShapeDtypeStruct`` with ``sharding``; leaves without a sharding restore as numpy).

        Raises ``FileNotFoundError`` if there is none, ``ValueError`` if no candidate can be
        read or its leaves do not match ``template``'s shapes and dtypes.
        """
        self.wait()
        return self._restore(template, step)

    def close(self) -> None:
        """Waits for the pending save (raising its error), then releases Orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _name(self, step: int) -> epath.Path:
        orbax = self.directory / str(step)
        return orbax if step in ocp.utils.checkpoint_steps(self.directory) else self.run_dir / _legacy_name(step)

    def _restore(self, template, step, part: str | None = None, note_legacy: bool = True):
        """``(template-like tree, step)``: the whole saved state, or its subtree ``part``;
        ``note_legacy``: warn that a msgpack checkpoint is the old format (where a save follows)."""
        available = self.steps()
        if not available:
            raise FileNotFoundError(f"no checkpoint in {self.run_dir} (neither {ORBAX_DIR}/<step> nor ckpt_*.msgpack)")
        if step is not None and step not in available:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.run_dir}; it has steps {available}")
        candidates = [step] if step is not None else available[::-1]
        want = flax.serialization.to_state_dict(template)
        for i, s in enumerate(candidates):
            path = self._name(s)
            legacy = path.name.endswith(".msgpack")
            # The saved tree: its arrays (msgpack), or their shapes and dtypes (Orbax's metadata).
            saved, error = _everywhere(_read_msgpack, path) if legacy else _everywhere(self._metadata, s)
            if error is None:
                if part is not None:
                    if part not in saved:
                        raise ValueError(f"{path} holds no {part!r} (not a train state checkpoint)")
                    saved = saved[part]
                if legacy:
                    saved = _moved_cell_layout(set(flatten_dict(want, sep="/")), saved, str(path))
                _check(want, saved, str(path))
                read = (_place, want, saved) if legacy else (self._read_orbax, s, want, part)
                restored, error = _everywhere(*read)
            if error is None:
                if legacy and note_legacy:
                    warnings.warn(f"{path} is in deq_jax's old checkpoint format (msgpack); it restores, and "
                                  f"checkpoints saved from now on are Orbax's ({self.directory}/<step>)", stacklevel=3)
                return flax.serialization.from_state_dict(template, restored), s
            if i + 1 == len(candidates):
                raise ValueError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from error
            warnings.warn(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); "
                          f"using the older {self._name(candidates[i + 1])}", stacklevel=3)
        raise AssertionError("unreachable")

    def _metadata(self, step: int) -> dict:
        return self._manager.item_metadata(step).tree

    def _read_orbax(self, step: int, want: dict, part: str | None) -> dict:
        abstract = jax.tree.map(_abstract, want)
        item = abstract if part is None else {part: abstract}
        args = ocp.args.PyTreeRestore(item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=part is not None)
        restored = self._manager.restore(step, args=args)
        return restored if part is None else restored[part]


_ROOM = ("Free space there, lower train.keep_checkpoints (a run holds keep + 1 checkpoints while writing), "
         "or run with --workdir on a disk with room")


def _free_bytes(directory: epath.Path, collective: bool) -> int | None:
    """Free bytes on ``directory``'s disk; None where unknown (not a local path). Collective:
    process 0 measures and tells the others, so that all decide alike."""
    free = -1
    if (jax.process_index() == 0 or not collective) and "://" not in os.fspath(directory):
        with contextlib.suppress(OSError):  # unreadable: unknown, as for a URL (-1 -> None)
            free = shutil.disk_usage(os.fspath(directory)).free
    if collective and jax.process_count() > 1:  # as two int32 words: without x64, int64 would be cut to 32 bits
        hi, lo = multihost_utils.broadcast_one_to_all(np.array(divmod(free, 2**30), np.int32))
        free = int(hi) * 2**30 + int(lo)
    return None if free < 0 else free


def _disk_full(error: BaseException) -> bool:
    """Whether ``error`` or one it came from says the disk is full (tensorstore's errors are
    ``ValueError``s whose message carries the OS error)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
                s in str(error) for s in ("No space left on device", "Disk quota exceeded")):
            return True
        error = error.__cause__ or error.__context__
    return False


def _everywhere(read, *args):
    """``(read(*args), None)`` if it returned on every process, else ``(None, its error)``:
    every process goes on alike (to an older checkpoint, say) if one could not read."""
    try:
        value, error = read(*args), None
    except Exception as e:  # a truncated or corrupt file raises one of several types
        value, error = None, e
    if jax.process_count() > 1 and not np.all(multihost_utils.process_allgather(np.int32(error is None))):
        return None, error or RuntimeError("another process could not read it")
    return value, error


def _abstract(leaf):
    if not hasattr(leaf, "shape"):
        return leaf  # a Python scalar
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))


def _read_msgpack(path: epath.Path) -> dict:
    return flax.serialization.msgpack_restore(path.read_bytes())


def _place(want: dict, saved: dict) -> dict:
    """Host arrays ``saved`` put on the shardings of ``want``'s leaves (numpy where none)."""

    def place(model_leaf, value):
        sharding = getattr(model_leaf, "sharding", None)
        if sharding is None:
            return value
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(place, want, flax.serialization.from_state_dict(want, saved))


def _check(want: dict, saved: dict, source: str) -> None:
    """Checks ``saved`` (a state dict of arrays or of Orbax's array metadata) against the
    model's state dict ``want``: the same leaves, each of the same shape and dtype
    (``ValueError`` naming the first that differs, or the missing and extra leaves)."""
    want_flat = flatten_dict(want, sep="/")
    have_flat = flatten_dict(saved, sep="/")
    if set(want_flat) != set(have_flat):
        raise ValueError(f"{source} does not match the model's state: leaves missing from the checkpoint "
                         f"{sorted(set(want_flat) - set(have_flat))[:5]}, leaves the model does not have "
                         f"{sorted(set(have_flat) - set(want_flat))[:5]}")
    for key, model_leaf in want_flat.items():
        leaf = have_flat[key]
        if not hasattr(model_leaf, "shape"):
            continue
        shape, dtype = (None, None) if leaf is None else (tuple(leaf.shape), np.dtype(leaf.dtype))
        if shape != tuple(model_leaf.shape) or dtype != np.dtype(model_leaf.dtype):
            name = "".join(f"[{k!r}]" for k in key.split("/"))
            got = "None" if leaf is None else f"{dtype}{list(shape)}"
            raise ValueError(f"{source}: leaf {name} is {got}, the model expects "
                             f"{np.dtype(model_leaf.dtype)}{list(model_leaf.shape)} "
                             "(a checkpoint of another model or config?)")


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
        return saved  # not the old layout: _check reports the mismatch
    warnings.warn(f"{source} has deq_jax 0.1's parameter layout (the cell at the model's top level); "
                  f"restoring it under {_CELL[:-1]!r}", stacklevel=4)
    flat = flatten_dict(saved, sep="/", keep_empty_nodes=True)
    return unflatten_dict({old_name.get(key, key): value for key, value in flat.items()}, sep="/")


def restore_params(run_dir: str | os.PathLike, template, step: int | None = None):
    """``(params, step)``: only the parameters of a saved train state, shaped like
    ``template`` (arrays or ``jax.ShapeDtypeStruct``; no optimizer state needed)."""
    with Checkpoints(run_dir, keep=1, read_only=True) as checkpoints:
        return checkpoints._restore(template, step, part="params", note_legacy=False)
