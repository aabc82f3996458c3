"""MDEQ shapes, weight norm and variational dropout."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq_jax.models import MDEQ, SIZES, MDEQSize

SHAPES = {"digits": (8, 8, 1), "tiny": (32, 32, 3), "cifar": (32, 32, 3), "small": (32, 32, 3)}


@pytest.mark.parametrize("size", sorted(SIZES))
def test_output_shapes_for_each_size(size):
    model = MDEQ(size, num_classes=10, dropout=0.25)
    images = jnp.zeros((2,) + SHAPES[size])
    # Shapes only (eval_shape): the cifar size has 7M parameters.
    variables = jax.eval_shape(lambda k, im: model.init(k, im, unroll=1), jax.random.key(0), images)
    x = jax.eval_shape(lambda v, im: model.apply(v, im, method="inject"), variables, images)
    z = jax.eval_shape(lambda v, x: model.apply(v, x, method="initial_state"), variables, x)
    fz = jax.eval_shape(lambda v, x, z: model.apply(v, x, z, method="cell"), variables, x, z)
    logits = jax.eval_shape(lambda v, z: model.apply(v, z, method="head"), variables, fz)
    spec = SIZES[size]
    side = SHAPES[size][0] // spec.stem_stride
    expected = [(2, side // 2**i, side // 2**i, c) for i, c in enumerate(spec.channels)]
    chex.assert_trees_all_equal_shapes(z, fz)
    assert [a.shape for a in fz] == expected
    assert logits.shape == (2, 10)


def test_weight_norm_and_dropout_masks():
    model = MDEQ("digits", dropout=0.5)
    images = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
    params = model.init(jax.random.key(0), images, unroll=1)["params"]
    # Weight norm: scaling v leaves the conv unchanged.
    v = params["deq"]["cell"]["blocks_0"]["WNConv_0"]["v"]
    scaled = jax.tree.map(lambda a: a, params)
    scaled["deq"]["cell"]["blocks_0"]["WNConv_0"]["v"] = 3.0 * v
    x = model.apply({"params": params}, images, method="inject")
    z0 = model.apply({"params": params}, x, method="initial_state")
    out = model.apply({"params": params}, x, z0, method="cell")
    out_scaled = model.apply({"params": scaled}, x, z0, method="cell")
    chex.assert_trees_all_close(out, out_scaled, rtol=1e-5, atol=1e-6)
    # Dropout: no keys -> all ones; per-example keys -> 0 or 2, a mask per example that
    # does not depend on the rest of the batch.
    assert all(bool(jnp.all(m == 1)) for m in x["masks"])
    keys = jax.random.split(jax.random.key(3), 6)
    masks = model.apply({"params": params}, images, keys, method="inject")["masks"]
    values = np.unique(np.concatenate([np.asarray(m).ravel() for m in masks]))
    np.testing.assert_allclose(values, [0.0, 2.0])
    first_two = model.apply({"params": params}, images[:2], keys[:2], method="inject")["masks"]
    chex.assert_trees_all_close(tuple(m[:2] for m in masks), first_two)


def test_bad_shapes_and_sizes_give_clear_errors():
    with pytest.raises(ValueError, match="unknown MDEQ size"):
        MDEQ("huge").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="images"):
        MDEQ("digits").init(jax.random.key(0), jnp.zeros((8, 8, 1)))
    with pytest.raises(ValueError, match="divisible"):
        MDEQ("digits").init(jax.random.key(0), jnp.zeros((1, 7, 7, 1)))
    with pytest.raises(ValueError, match="num_groups"):
        MDEQSize(channels=(6,), expand=1, head_channels=(4,), final_channels=8, num_groups=4)
    with pytest.raises(ValueError, match="stem_stride"):
        MDEQSize(channels=(8,), expand=1, head_channels=(4,), final_channels=8, num_groups=4, stem_stride=3)
    with pytest.raises(ValueError, match="post_fuse_groups"):
        MDEQSize(channels=(8, 12), expand=1, head_channels=(4, 4), final_channels=8, num_groups=4, post_fuse_groups=8)
    with pytest.raises(ValueError, match="head"):
        MDEQSize(channels=(8,), expand=1, head_channels=(4,), final_channels=8, num_groups=4, head="mlp")
