"""Checkpoints: atomic files, the last k kept, a corrupt newest one skipped with a warning,
shapes and dtypes checked against the template."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deq_jax.models import MDEQ
from deq_jax.train import checkpoint


def state(scale=1.0):
    return {"step": jnp.int32(3), "params": {"w": scale * jnp.ones((3, 2)), "b": jnp.zeros((2,), jnp.bfloat16)},
            "opt_state": (jnp.float32(0.5),)}


def test_save_keeps_the_newest_k_and_restores_exactly(tmp_path):
    for step in (2, 4, 6):
        checkpoint.save(tmp_path, step, state(step), keep=2)
    assert checkpoint.steps(tmp_path) == [4, 6]
    assert not list(tmp_path.glob("*.tmp"))
    restored, step = checkpoint.restore(tmp_path, state())
    assert step == 6
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), restored, jax.device_get(state(6)))
    assert restored["params"]["b"].dtype == jnp.bfloat16
    older, step = checkpoint.restore(tmp_path, state(), step=4)
    assert step == 4 and float(older["params"]["w"][0, 0]) == 4.0
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 5"):
        checkpoint.restore(tmp_path, state(), step=5)


def test_a_truncated_newest_checkpoint_falls_back_with_a_warning_naming_it(tmp_path):
    for step in (2, 4):
        checkpoint.save(tmp_path, step, state(step), keep=3)
    newest = tmp_path / "ckpt_00000004.msgpack"
    newest.write_bytes(newest.read_bytes()[:-7])
    with pytest.warns(UserWarning, match=r"ckpt_00000004\.msgpack cannot be read.*using the older ckpt_00000002"):
        restored, step = checkpoint.restore(tmp_path, state())
    assert step == 2 and float(restored["params"]["w"][0, 0]) == 2.0
    with pytest.warns(UserWarning, match="ckpt_00000004"):
        params, step = checkpoint.restore_params(tmp_path, state()["params"])
    assert step == 2
    # Asked for by step, or nothing older to fall back to: an error naming the file.
    with pytest.raises(ValueError, match=r"ckpt_00000004\.msgpack cannot be read"):
        checkpoint.restore(tmp_path, state(), step=4)
    (tmp_path / "ckpt_00000002.msgpack").write_bytes(b"\x00garbage")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"ckpt_00000002\.msgpack cannot be read"):
        checkpoint.restore(tmp_path, state())


@pytest.mark.parametrize("changed, message", [
    ({"w": jnp.ones((7, 2))}, r"\['params'\]\['w'\] is float32\[3, 2\], the model expects float32\[7, 2\]"),
    ({"b": jnp.zeros((2,), jnp.float32)}, r"\['params'\]\['b'\] is bfloat16\[2\], the model expects float32\[2\]"),
])
def test_a_checkpoint_of_another_model_names_the_mismatched_leaf(tmp_path, changed, message):
    checkpoint.save(tmp_path, 2, state(), keep=1)
    template = state()
    template["params"] |= changed
    with pytest.raises(ValueError, match=message):
        checkpoint.restore(tmp_path, template)
    with pytest.raises(ValueError, match=message.replace(r"\['params'\]", "")):
        checkpoint.restore_params(tmp_path, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                                         template["params"]))
    template["params"] = {"w": jnp.ones((3, 2))}  # a missing leaf
    with pytest.raises(ValueError, match="does not match the model's state"):
        checkpoint.restore(tmp_path, template)


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
    with pytest.warns(UserWarning, match="0.1's parameter layout"):
        restored, step = checkpoint.restore(tmp_path, template)
    assert step == 5
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), restored, jax.device_get(new))
    # A checkpoint of another model is still refused, naming the leaves.
    other = {"params": {"w": jnp.ones(2)}, "opt_state": saved["opt_state"], "step": 5}
    (tmp_path / "ckpt_00000006.msgpack").write_bytes(flax.serialization.msgpack_serialize(other))
    with pytest.raises(ValueError, match="leaves missing from the checkpoint"):
        checkpoint.restore(tmp_path, template, step=6)
