"""Checkpoints (Orbax): atomic, the last k kept, written in the background, a corrupt newest one
skipped with a warning, shapes and dtypes checked against the template, a full disk refused
with a clear error, old msgpack checkpoints still restored."""

import errno
import re
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath

from deq_jax.models import MDEQ
from deq_jax.train import checkpoint, schedules
from deq_jax.train.step import TrainState

ROOT = Path(__file__).resolve().parents[1]
# When a read or write fails, tensorstore still completes the other pending ones, on the event
# loop that Orbax has closed by then: harmless, reported as an exception Python ignored.
ORBAX_LOOP_NOISE = pytest.mark.filterwarnings(
    "ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning")


def intercept_tree_metadata(monkeypatch, tmp_path, write_text):
    """Orbax writes a checkpoint's tree metadata (``_METADATA``) in the background, after the
    arrays' data files, with etils.epath's ``write_text``: ``write_text(original, path, text)``
    is called instead."""
    path_type = type(epath.Path(tmp_path))
    original = path_type.write_text

    def intercepted(path, text, *args, **kwargs):
        if path.name == "_METADATA":
            return write_text(original, path, text, *args, **kwargs)
        return original(path, text, *args, **kwargs)

    monkeypatch.setattr(path_type, "write_text", intercepted)


def state(scale=1.0):
    """A train state as the loop has it: a flax struct, optax's named tuples (and an empty one),
    a None memory."""
    params = {"w": scale * jnp.ones((3, 2)), "b": jnp.zeros((2,), jnp.bfloat16)}
    gamma = schedules.GammaState(jnp.float32(scale), jnp.float32(0), jnp.float32(0))
    return TrainState(jnp.int32(3), params, optax.adam(1e-3).init(params), gamma)


def equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype
    assert jax.tree.structure(a) == jax.tree.structure(b)


def test_save_keeps_the_newest_k_and_restores_exactly(tmp_path):
    with checkpoint.Checkpoints(tmp_path, keep=2) as ckpts:
        for step in (2, 4, 6):
            ckpts.save(step, state(step))
        ckpts.wait()
        assert ckpts.steps() == checkpoint.steps(tmp_path) == [4, 6]
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "6"]  # no temporary folder
        restored, step = ckpts.restore(state())
        assert step == 6
        equal(restored, state(6))
        assert restored.params["b"].dtype == jnp.bfloat16 and restored.memory is None
        older, step = ckpts.restore(state(), step=4)
        assert step == 4 and float(older.params["w"][0, 0]) == 4.0
        with pytest.raises(FileNotFoundError, match="no checkpoint of step 5"):
            ckpts.restore(state(), step=5)
    # A save killed mid-write leaves only Orbax's temporary folder: not a checkpoint, and out
    # of the way of the next run's save of that step.
    partial = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1"
    (partial / "default").mkdir(parents=True)
    (partial / "default" / "_METADATA").write_text("{")
    assert checkpoint.steps(tmp_path) == [4, 6]
    assert checkpoint.restore_params(tmp_path, state().params)[1] == 6
    with checkpoint.Checkpoints(tmp_path, keep=2) as ckpts:
        ckpts.save(8, state(8))
    assert checkpoint.steps(tmp_path) == [6, 8] and not partial.exists()
    equal(checkpoint.restore_params(tmp_path, state().params)[0], state(8).params)


def test_save_returns_before_the_write_and_wait_completes_it(tmp_path, monkeypatch):
    """The write overlaps training: ``save`` returns once the arrays are off the devices (here
    the device arrays are deleted at once, as a donating train step would), ``wait`` finishes it."""
    release, written = threading.Event(), []

    def held(original, path, *args, **kwargs):
        release.wait(60)
        written.append(path)
        return original(path, *args, **kwargs)

    intercept_tree_metadata(monkeypatch, tmp_path, held)
    saved, expected = state(2), jax.device_get(state(2))
    with checkpoint.Checkpoints(tmp_path, keep=2) as ckpts:
        ckpts.save(2, saved)
        assert not written and ckpts.steps() == []
        assert [p.name[:22] for p in (tmp_path / "checkpoints").iterdir()] == ["2.orbax-checkpoint-tmp"]
        for leaf in jax.tree.leaves(saved):
            leaf.delete()
        assert float(jnp.sum(jnp.arange(10.0))) == 45.0  # other work meanwhile
        release.set()
        ckpts.wait()
        assert written and ckpts.steps() == [2]
        restored, step = ckpts.restore(state())
    assert step == 2
    equal(restored, expected)


def _damage(folder: Path, how: str):
    files = [p for p in folder.rglob("*") if p.is_file()]
    if how == "truncated":  # every file of the arrays' data cut short
        for p in files:
            if p.parent.name == "d":
                p.write_bytes(p.read_bytes()[:-7])
    else:  # the tree's metadata overwritten
        next(p for p in files if p.name == "_METADATA").write_bytes(b"\x00garbage")


@ORBAX_LOOP_NOISE
def test_a_truncated_newest_checkpoint_falls_back_with_a_warning_naming_it(tmp_path):
    with checkpoint.Checkpoints(tmp_path, keep=3) as ckpts:
        for step in (2, 4):
            ckpts.save(step, state(step))
    _damage(tmp_path / "checkpoints" / "4", "truncated")
    ckpts = checkpoint.Checkpoints(tmp_path, keep=3)
    with pytest.warns(UserWarning, match=r"checkpoints/4 cannot be read.*using the older .*checkpoints/2"):
        restored, step = ckpts.restore(state())
    assert step == 2 and float(restored.params["w"][0, 0]) == 2.0
    with pytest.warns(UserWarning, match="checkpoints/4 cannot be read"):
        params, step = checkpoint.restore_params(tmp_path, state().params)
    assert step == 2
    # Asked for by step, or nothing older to fall back to: an error naming the checkpoint.
    with pytest.raises(ValueError, match="checkpoints/4 cannot be read"):
        ckpts.restore(state(), step=4)
    _damage(tmp_path / "checkpoints" / "2", "garbage")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="checkpoints/2 cannot be read"):
        ckpts.restore(state())
    ckpts.close()


def _save_msgpack(run_dir, step, state):
    """A checkpoint as deq_jax <= 0.3 wrote it: flax msgpack of the host state."""
    (Path(run_dir) / f"ckpt_{step:08d}.msgpack").write_bytes(flax.serialization.to_bytes(jax.device_get(state)))


def _save(fmt, run_dir, step, value):
    if fmt == "orbax":
        with checkpoint.Checkpoints(run_dir, keep=1) as ckpts:
            ckpts.save(step, value)
    else:
        _save_msgpack(run_dir, step, value)


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
@pytest.mark.parametrize("changed, message", [
    ({"w": jnp.ones((7, 2))}, r"\['params'\]\['w'\] is float32\[3, 2\], the model expects float32\[7, 2\]"),
    ({"b": jnp.zeros((2,), jnp.float32)}, r"\['params'\]\['b'\] is bfloat16\[2\], the model expects float32\[2\]"),
])
def test_a_checkpoint_of_another_model_names_the_mismatched_leaf(tmp_path, changed, message, fmt):
    _save(fmt, tmp_path, 2, state())
    ckpts = checkpoint.Checkpoints(tmp_path, keep=1)
    params = state().params | changed
    template = state().replace(params=params, opt_state=optax.adam(1e-3).init(params))
    with pytest.raises(ValueError, match=message), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # msgpack: the old format's note
        ckpts.restore(template)
    with pytest.raises(ValueError, match=message.replace(r"\['params'\]", "")), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoint.restore_params(tmp_path, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params))
    with pytest.raises(ValueError, match=r"does not match the model's state.*\['params/b'\]"):
        ckpts.restore(state().replace(params={"w": jnp.ones((3, 2))}))  # a missing leaf
    ckpts.close()


def test_a_checkpoint_with_the_0_1_cell_layout_restores_under_deq_cell_with_a_warning(tmp_path):
    """deq_jax 0.1 models kept the cell's parameters at the top level; today they live
    under the DEQ layer's ``deq/cell`` scope, in the parameters and in the optimizer's trees."""
    tx = optax.adam(1e-3)

    @jax.jit
    def fresh_state():
        params = MDEQ("digits").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), unroll=1)["params"]
        return {"step": jnp.int32(5), "params": params, "opt_state": tx.init(params)}

    new = jax.device_get(fresh_state())

    def old_layout(tree):  # the cell's modules moved up to the top level
        tree = dict(tree)
        return {**{k: v for k, v in tree.items() if k != "deq"}, **tree["deq"]["cell"]}

    template = jax.tree.map(jnp.zeros_like, new)
    saved = flax.serialization.to_state_dict(new)
    saved["params"] = old_layout(saved["params"])
    saved["opt_state"]["0"]["mu"] = old_layout(saved["opt_state"]["0"]["mu"])
    saved["opt_state"]["0"]["nu"] = old_layout(saved["opt_state"]["0"]["nu"])
    assert "blocks_0" in saved["params"] and "deq" not in saved["params"]
    (tmp_path / "ckpt_00000005.msgpack").write_bytes(flax.serialization.msgpack_serialize(saved))
    ckpts = checkpoint.Checkpoints(tmp_path, keep=3)
    with pytest.warns(UserWarning, match="0.1's parameter layout"), pytest.warns(UserWarning, match="old checkpoint"):
        restored, step = ckpts.restore(template)
    assert step == 5
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), restored, jax.device_get(new))
    # A checkpoint of another model is still refused, naming the leaves.
    other = {"params": {"w": jnp.ones(2)}, "opt_state": saved["opt_state"], "step": 5}
    (tmp_path / "ckpt_00000006.msgpack").write_bytes(flax.serialization.msgpack_serialize(other))
    with pytest.raises(ValueError, match="leaves missing from the checkpoint"):
        ckpts.restore(template, step=6)
    ckpts.close()


def test_old_msgpack_checkpoints_restore_with_a_warning_and_the_next_save_is_orbax(tmp_path):
    for step in (4, 8):  # deq_jax <= 0.3's files
        _save_msgpack(tmp_path, step, state(step))
    ckpts = checkpoint.Checkpoints(tmp_path, keep=2)
    assert ckpts.steps() == [4, 8]
    with pytest.warns(UserWarning, match=r"ckpt_00000008\.msgpack is in deq_jax's old checkpoint format.*Orbax's"):
        restored, step = ckpts.restore(state())
    assert step == 8
    equal(restored, state(8))
    newest = tmp_path / "ckpt_00000008.msgpack"
    newest.write_bytes(newest.read_bytes()[:-7])
    with pytest.warns(UserWarning, match=r"ckpt_00000008\.msgpack cannot be read.*using the older .*ckpt_00000004"), \
            pytest.warns(UserWarning, match="ckpt_00000004.msgpack is in deq_jax's old checkpoint format"):
        assert ckpts.restore(state())[1] == 4
    ckpts.save(12, state(12))
    ckpts.wait()  # the newest 2 of both kinds are kept
    assert ckpts.steps() == [8, 12] and not (tmp_path / "ckpt_00000004.msgpack").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored, step = ckpts.restore(state())
    assert step == 12
    equal(restored, state(12))
    ckpts.save(16, state(16))
    ckpts.close()
    assert checkpoint.steps(tmp_path) == [12, 16] and not list(tmp_path.glob("*.msgpack"))


def test_a_state_that_does_not_fit_on_the_disk_is_refused_before_writing(tmp_path, monkeypatch):
    with checkpoint.Checkpoints(tmp_path, keep=2) as ckpts:
        ckpts.save(2, state(2))
        ckpts.wait()
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=5000))
        with pytest.raises(OSError, match=r"checkpoints/4 not written: it needs ([\d,]+) bytes.*has 5,000 free.*"
                                          r"train\.keep_checkpoints.*--workdir on a disk with room") as error:
            ckpts.save(4, state(4))
        assert error.value.errno == errno.ENOSPC
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]  # nothing written
        needed = int(re.search(r"needs ([\d,]+) bytes", str(error.value)).group(1).replace(",", ""))
        nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state()))
        assert needed == int(nbytes * 1.1) + 2**20  # the margin: 10% and 1 MiB
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=needed))
        ckpts.save(4, state(4))
    assert checkpoint.steps(tmp_path) == [2, 4]


@ORBAX_LOOP_NOISE
@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    # tensorstore's form of it (its array writes raise ValueError)
    ValueError("RESOURCE_EXHAUSTED: Error writing in OCDBT database: Failed to write 791600 bytes to file 7: "
               "No space left on device [os_error_code='28']"),
    RuntimeError("another failure"),
])
def test_a_write_that_fails_leaves_no_partial_folder_and_the_earlier_checkpoints(tmp_path, monkeypatch, failure):
    def failing(original, path, *args, **kwargs):
        raise failure

    ckpts = checkpoint.Checkpoints(tmp_path, keep=2)
    ckpts.save(2, state(2))
    ckpts.save(4, state(4))
    ckpts.wait()
    expected = r"checkpoints/6 could not be written, the disk is full: it needs [\d,]+ bytes.*has [\d,]+ free; " \
        r"its partial folder was removed and the earlier checkpoints are intact.*train\.keep_checkpoints"
    if isinstance(failure, RuntimeError):  # not a disk's error: raised as it is, with a note
        expected = "another failure"
    with monkeypatch.context() as patch:
        intercept_tree_metadata(patch, tmp_path, failing)
        ckpts.save(6, state(6))  # returns: the write fails in the background
        with pytest.raises(RuntimeError if isinstance(failure, RuntimeError) else OSError, match=expected) as error:
            ckpts.wait()
        if isinstance(failure, RuntimeError):
            assert "no partial folder is left" in error.value.__notes__[0]
        else:
            assert error.value.errno == errno.ENOSPC
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]
        restored, step = ckpts.restore(state())
        assert step == 4
        equal(restored, state(4))
        # The next save() raises such a failure too (before it starts writing).
        ckpts.save(6, state(6))
        with pytest.raises(type(error.value), match=expected):
            ckpts.save(8, state(8))
    # Once the disk has room again, saving goes on, and the newest 2 are kept.
    ckpts.save(8, state(8))
    ckpts.save(10, state(10))
    ckpts.close()
    assert checkpoint.steps(tmp_path) == [8, 10]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10", "8"]


SHARDED = r"""
import os, sys, warnings
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import flax.serialization, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from deq_jax.train import checkpoint
from deq_jax.train.step import TrainState
mesh = Mesh(jax.devices(), ("data",))
replicated, per_example = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

def make(scale, memory_sharding=per_example):
    params = {"w": jax.device_put(scale * jnp.ones((3, 2)), replicated)}
    memory = jax.device_put(scale * jnp.arange(8 * 5, dtype=jnp.float32).reshape(8, 5), memory_sharding)
    return TrainState(jax.device_put(jnp.int32(scale), replicated), params, (), (), memory)

run = sys.argv[1]
with checkpoint.Checkpoints(run, keep=2) as ckpts:
    ckpts.save(1, make(1))
    ckpts.save(2, make(2))
    for memory_sharding in (per_example, replicated):  # the template's shardings, whichever they are
        template = make(0, memory_sharding)
        restored, step = ckpts.restore(template)
        assert step == 2
        for got, want, model in zip(jax.tree.leaves(restored), jax.tree.leaves(make(2)), jax.tree.leaves(template)):
            assert got.sharding == model.sharding, (got.sharding, model.sharding)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), make(0))
    assert ckpts.restore(abstract, step=1)[0].memory.sharding == per_example
old = os.path.join(run, 'ckpt_00000003.msgpack')  # deq_jax <= 0.3's format: on the template's shardings too
open(old, 'wb').write(flax.serialization.to_bytes(jax.device_get(make(3))))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    restored, step = checkpoint.Checkpoints(run, keep=2, read_only=True).restore(make(0))
assert step == 3 and restored.memory.sharding == per_example and float(restored.memory[7, 4]) == 3 * 39
print("OK")
"""


def test_restore_gives_the_state_the_templates_shardings_on_4_devices(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_a_relative_run_folder_works(tmp_path, monkeypatch):
    """The command line's default --workdir is relative (runs/<name>_<time>); Orbax itself
    accepts only absolute local paths."""
    monkeypatch.chdir(tmp_path)
    with checkpoint.Checkpoints("runs/relative", keep=2) as ckpts:
        ckpts.save(3, state(3))
    assert checkpoint.steps("runs/relative") == [3] and (tmp_path / "runs" / "relative" / "checkpoints" / "3").is_dir()
    with checkpoint.Checkpoints("runs/relative", keep=2, read_only=True) as ckpts:
        restored, step = ckpts.restore(state())
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, restored, state(3))
