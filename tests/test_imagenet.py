"""ImageNet: preprocessing against PIL and hand-computed crops, streamed batches, the TFDS
mock, MDEQ-small shapes, every full-scale config, and two training steps of the ImageNet
config at 32x32 through the real training loop."""

import dataclasses
import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from deq_jax import data
from deq_jax.data import imagenet
from deq_jax.models import MDEQ, SIZES
from deq_jax.train import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "deq_jax" / "configs").glob("*.py") if p.stem != "__init__")


class FakeSource:
    """A random-access source like ``tfds.data_source``: ``source[i] -> {"image", "label"}``."""

    def __init__(self, n, seed=0, num_classes=5):
        rng = np.random.default_rng(seed)
        self.examples = [
            {
                "image": rng.integers(0, 256, tuple(rng.integers(20, 70, 2)) + (3,), dtype=np.uint8),
                "label": np.int64(rng.integers(0, num_classes)),
            }
            for _ in range(n)
        ]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def fake_dataset(n_train=12, n_eval=10, image_size=16, num_workers=1):
    return imagenet.StreamingImages(
        name="fake", train_source=FakeSource(n_train), eval_source=FakeSource(n_eval, seed=1), num_classes=5,
        image_size=image_size, num_workers=num_workers,
    )


# --- preprocessing --------------------------------------------------------------------


@pytest.mark.parametrize("out_hw", [(16, 24), (50, 70), (37, 20)])
def test_resize_matches_pil_bilinear(out_hw):
    """Antialiased bilinear resizing equals PIL's BILINEAR (which rounds to uint8)."""
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    ours = imagenet.resize(image, *out_hw)
    pil = np.asarray(Image.fromarray(image).resize(out_hw[::-1], Image.Resampling.BILINEAR), np.float32)
    assert ours.shape == pil.shape and ours.dtype == np.float32
    assert np.max(np.abs(ours - pil)) <= 1.0


def test_eval_image_is_the_center_crop_after_resizing_the_shorter_side():
    # image_size 14 -> shorter side 16 (14 / 0.875): a 16x20 image is not resized, so the
    # result is exactly the central 14x14 window (rows 1..14, columns 3..16).
    image = (np.arange(16 * 20 * 3) % 251).astype(np.uint8).reshape(16, 20, 3)
    assert imagenet.eval_size(14) == 16 and imagenet.eval_size(224) == 256
    np.testing.assert_array_equal(imagenet.eval_image(image, 14), image[1:15, 3:17].astype(np.float32))
    # Portrait: a 40x32 image is halved to 20x16, then cropped at rows 3..16, columns 1..14.
    tall = np.random.default_rng(1).integers(0, 256, (40, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(imagenet.eval_image(tall, 14), imagenet.resize(tall, 20, 16)[3:17, 1:15], atol=1e-4)
    # A constant image stays constant; grayscale [H, W, 1] becomes 3 equal channels.
    np.testing.assert_allclose(imagenet.eval_image(np.full((30, 45, 3), 77, np.uint8), 14), 77.0, atol=1e-3)
    gray = imagenet.eval_image(image[:, :, :1], 14)
    assert gray.shape == (14, 14, 3) and np.array_equal(gray[..., 0], gray[..., 2])


def test_random_resized_crop_box_follows_its_rule():
    areas, ratios = [], []
    for seed in range(300):
        top, left, h, w = imagenet.random_resized_crop_box(np.random.default_rng(seed), 100, 80)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 80 and h > 0 and w > 0
        areas.append(h * w / 8000)
        ratios.append(w / h)
    # Rounding to whole pixels moves area and ratio slightly outside the drawn ranges.
    assert 0.07 <= min(areas) and max(areas) <= 1.0 and min(areas) < 0.2 and max(areas) > 0.8
    assert 0.7 <= min(ratios) and max(ratios) <= 1.4
    # No crop can fit a 10x1000 strip (ratio 100): the fallback is the central crop at ratio 4/3.
    assert imagenet.random_resized_crop_box(np.random.default_rng(0), 10, 1000) == (0, 493, 10, 13)


# --- batches --------------------------------------------------------------------------


def test_a_process_share_of_a_batch_reads_only_those_rows():
    ds = fake_dataset()
    rows = np.array([0, 2, 3])
    x, y = ds.train_batch(5, 4, seed=0)
    xr, yr = ds.train_batch(5, 4, seed=0, rows=rows)  # the same crops: keyed by the position in the batch
    np.testing.assert_array_equal(xr, x[rows])
    np.testing.assert_array_equal(yr, y[rows])
    for whole, part in zip(ds.eval_batches(4), ds.eval_batches(4, rows=rows), strict=True):
        for a, b in zip(whole, part, strict=True):
            np.testing.assert_array_equal(b, a[rows])


def test_train_batches_are_pure_functions_of_seed_and_step():
    ds = fake_dataset()
    x1, y1 = ds.train_batch(5, 4, seed=0)
    x2, y2 = ds.train_batch(5, 4, seed=0)
    x3, _ = ds.train_batch(6, 4, seed=0)
    x4, _ = fake_dataset(num_workers=3).train_batch(5, 4, seed=0)  # threads do not change a batch
    assert x1.shape == (4, 16, 16, 3) and x1.dtype == np.float32 and y1.dtype == np.int32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(x1, x4)
    assert not np.array_equal(x1, x3)
    raw = x1 * imagenet.STD + imagenet.MEAN  # un-normalized: back in [0, 1]
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # An epoch (3 steps of 4) visits every training example once, in the seeded order.
    labels = [ds.train_source[i]["label"] for i in np.random.default_rng([0, 1]).permutation(12)]
    np.testing.assert_array_equal(np.concatenate([ds.train_batch(s, 4, seed=0)[1] for s in (3, 4, 5)]), labels)
    with pytest.raises(ValueError, match="batch_size 13 exceeds"):
        ds.train_batch(0, 13, seed=0)


def test_eval_batches_are_padded_with_zero_weights():
    ds = fake_dataset()
    batches = list(ds.eval_batches(4))
    assert [b[0].shape for b in batches] == [(4, 16, 16, 3)] * 3
    np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), [1] * 10 + [0] * 2)
    labels = np.concatenate([b[1] for b in batches])[:10]
    np.testing.assert_array_equal(labels, [ds.eval_source[i]["label"] for i in range(10)])
    expected = imagenet.normalize(imagenet.eval_image(ds.eval_source[0]["image"], 16))
    np.testing.assert_allclose(batches[0][0][0], expected, rtol=1e-6)


def test_imagenet2012_through_tfds_mock_data():
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load("imagenet2012", data_dir="/nonexistent", image_size=32)
        assert ds.num_classes == 1000 and ds.image_shape == (32, 32, 3)
        example = ds.train_source[0]  # decoded by the data source: a uint8 array
        assert example["image"].dtype == np.uint8 and example["image"].ndim == 3
        images, labels = ds.train_batch(0, 4, seed=0)
        evals = list(ds.eval_batches(4))
    assert images.shape == (4, 32, 32, 3) and labels.shape == (4,) and 0 <= labels.min() and labels.max() < 1000
    assert len(evals) == 2 and float(sum(b[2].sum() for b in evals)) == 6.0


def test_missing_imagenet_names_the_manual_step_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.load("imagenet2012", data_dir=str(tmp_path))
    message = str(err.value)
    for needle in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "image-net.org",
                   f"tfds build imagenet2012 --data_dir {tmp_path} --manual_dir", "--file_format array_record"):
        assert needle in message, needle
    with pytest.raises(ValueError, match="image_size applies to imagenet2012 only"):
        data.load("digits", image_size=32)


# --- model and configs ----------------------------------------------------------------


def test_mdeq_small_shapes_at_32_and_224():
    model = MDEQ("small", num_classes=1000)
    for side, branches in ((32, [8, 4, 2, 1]), (224, [56, 28, 14, 7])):
        images = jnp.zeros((2, side, side, 3))
        variables = jax.eval_shape(lambda k, im: model.init(k, im, unroll=1), jax.random.key(0), images)
        x = jax.eval_shape(lambda v, im: model.apply(v, im, method="inject"), variables, images)
        z = jax.eval_shape(lambda v, x: model.apply(v, x, method="initial_state"), variables, x)
        fz = jax.eval_shape(lambda v, x, z: model.apply(v, x, z, method="cell"), variables, x, z)
        logits = jax.eval_shape(lambda v, z: model.apply(v, z, method="head"), variables, fz)
        assert [a.shape for a in fz] == [(2, s, s, c) for s, c in zip(branches, (32, 64, 128, 256))]
        assert logits.shape == (2, 1000)
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
    assert 18.5e6 < count < 18.7e6  # the official SMALL_reg widths (paper: 17-18M)
    spec = SIZES["small"]
    assert (spec.num_groups, spec.fuse_groups, spec.post_fuse_affine, spec.stem_stride) == (8, 4, False, 4)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_resolves(name):
    c = config_lib.resolve(importlib.import_module(f"deq_jax.configs.{name}").get_config())
    if c.data.name in data.pipeline.IMAGE_DATA:
        assert c.model.size in SIZES


# Values read from the official files (see each config's table); a guard against edits.
OFFICIAL = {
    "imagenet": {"optim.name": "sgd", "optim.learning_rate": 0.04, "optim.weight_decay": 2e-5,
                 "optim.warmup_steps": 0, "forward.max_steps": 14, "backward.max_steps": 14,
                 "forward.stop_mode": "abs", "backward.stop_mode": "abs", "jr.gamma": 2.5,
                 "jr.staircase_every": 50_000, "jr.prob": 0.08, "jr.pretrain_gamma": 0.03,
                 "forward.random_lower_rule": "jr_steps", "train.batch_size": 128,
                 "train.pretrain_steps": 510_000, "train.pretrain_layers": 5, "model.dropout": 0.02},
    "cifar": {"forward.max_steps": 8, "backward.max_steps": 7, "jr.gamma": 0.4, "jr.prob": 0.02,
              "jr.stop_step": 90 * (50_000 // 96), "train.num_steps": 220 * (50_000 // 96),
              "train.batch_size": 96, "train.pretrain_steps": 16_000, "train.pretrain_layers": 8,
              "model.dropout": 0.22, "optim.warmup_steps": 0, "forward.random_lower_rule": "jr_steps"},
    "cifar_tiny": {"forward.max_steps": 18, "backward.max_steps": 20, "jr.gamma": 0.0,
                   "train.batch_size": 128, "train.pretrain_steps": 3000, "train.pretrain_layers": 10},
    "lm_wikitext103": {"forward.solver": "anderson", "backward.solver": "broyden", "forward.max_steps": 14,
                       "backward.max_steps": 14, "jr.gamma": 2.0, "jr.staircase_every": 30_000, "jr.prob": 0.4,
                       "train.batch_size": 56, "optim.clip_norm": 0.25, "optim.warmup_steps": 16_000,
                       "train.pretrain_steps": 32_000, "train.pretrain_layers": 2,
                       "forward.random_lower_rule": "every_step", "model.mem_len": 300,
                       "model.cutoffs": "20000,40000,200000", "model.div_val": 4, "train.seq_len": 150},
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_full_scale_configs_carry_the_official_values(name):
    c = config_lib.resolve(importlib.import_module(f"deq_jax.configs.{name}").get_config())
    for key, value in OFFICIAL[name].items():
        group, leaf = key.split(".")
        assert c[group][leaf] == value, key
    if name in ("imagenet", "cifar"):
        spec = SIZES[c.model.size]
        assert spec.channels == (32, 64, 128, 256) and spec.num_groups == 8


# --- two training steps -----------------------------------------------------------------


def test_two_training_steps_of_the_imagenet_config_at_32x32(tmp_path, monkeypatch):
    """The ImageNet config (SGD, staircase JR, abs stopping, streamed TFDS data) through the
    real loop on 32x32 crops of the TFDS mock: two DEQ steps, then the evaluation.

    The model is MDEQ-small's architecture (stride-4 stem, injection conv, 8/4 GroupNorm
    groups, bottleneck head) at 2 narrow branches: compiling the 4-branch cell's train
    step alone takes minutes on 2 CPU cores (its shapes are tested above)."""
    from deq_jax.configs import imagenet as imagenet_config
    from deq_jax.models import mdeq
    from deq_jax.train import loop
    from deq_jax.train.metrics import read

    reduced = dataclasses.replace(SIZES["small"], channels=(8, 16), expand=2, head_channels=(4, 8),
                                  final_channels=32)
    monkeypatch.setitem(mdeq.SIZES, "small_reduced", reduced)
    c = imagenet_config.get_config()
    c.model.size = "small_reduced"
    c.train.update(num_steps=2, pretrain_steps=0, batch_size=4, log_every=1, eval_every=2,
                   checkpoint_every=2)
    c.forward.update(max_steps=4, random_lower=1)
    c.backward.update(max_steps=4)
    c.jr.update(prob=1.0)
    c.eval.update(batch_size=4, max_steps=4, budgets="2,4", jac_probes=1, spectral_iters=5)
    c.data.image_size = 32
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        summary = loop.train(c, tmp_path / "run", progress=False)
    assert summary["steps"] == 2 and summary["eval_split"] == "validation"
    assert 0.0 <= summary["validation_accuracy"] <= 1.0
    assert np.isfinite(summary["validation_loss"]) and np.isfinite(summary["jacobian_frobenius_sq_per_dim"])
    rows = [r for r in read(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["mode"] for r in rows] == ["deq", "deq"]
    assert all(np.isfinite(r["loss"]) and r["gamma"] == pytest.approx(2.5) for r in rows)


def test_wikitext103_config_parameter_count():
    """The config's model at the WikiText-103 vocabulary (267,735 words), counted from the
    shapes (nothing allocated): 96,226,088 parameters. The official model prints 97,851,488
    (97,691,888 with its storage-tied tail output projections counted once); the config's
    docstring explains the 1,465,800 difference part by part, checked here."""
    from deq_jax.configs import lm_wikitext103
    from deq_jax.models import DEQTransformer

    c = config_lib.resolve(lm_wikitext103.get_config())
    m = c.model
    model = DEQTransformer(267_735, d_model=m.d_model, num_heads=m.num_heads, d_ff=m.d_ff, pre_ln=m.pre_ln,
                           mem_len=m.mem_len, cutoffs=config_lib.cutoffs(c), div_val=m.div_val)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32), unroll=1), jax.random.key(0))

    def count(tree):
        return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))

    params = shapes["params"]
    cell = params["deq"]["cell"]
    assert count(params) == 96_226_088
    assert count(cell["ff_in"]) + count(cell["ff_out"]) == 67_297_400  # = official ff1_net + ff2_net
    assert count(params["softmax"]) == 26_466_788  # official adaptive parts, tied projections counted once
    assert count(params["inject_proj"]) == 1_472_100 - 981_400  # official inject_conv: 700 -> 2100, bias
    assert count(cell["attention"]) == (1_472_100 + 490_700 + 1_400 + 491_400) - 490_000  # official qkv, r, biases, o
    assert count([v for k, v in cell.items() if k.startswith("norms")]) + count(params["final_norm"]) == 5_600


def test_two_training_steps_of_the_wikitext103_config_on_token_files(tmp_path):
    """The full lm_wikitext103 config (adaptive softmax with the official cutoffs' shape,
    memory, Anderson + Broyden, staircase JR, cosine schedule) through the real loop, at
    reduced widths on token files the test writes: two DEQ steps with the memory carried,
    then the evaluation over the valid stream with memory (pretraining with memory:
    ``test_lm.py``)."""
    from deq_jax.configs import lm_wikitext103
    from deq_jax.train import loop
    from deq_jax.train.metrics import read

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]
    p = 1.0 / np.arange(1, 301)  # Zipf-like: the frequency order matters for the clusters
    for split, lines in (("train", 400), ("valid", 40), ("test", 40)):
        with open(tmp_path / f"wiki.{split}.tokens", "w") as fh:
            for _ in range(lines):
                fh.write(" ".join(rng.choice(words, 12, p=p / p.sum())) + "\n")
    c = lm_wikitext103.get_config()
    c.data.data_dir = str(tmp_path)
    c.model.update(d_model=64, num_heads=4, d_ff=64, mem_len=24, cutoffs="20,60,150")  # widths 64, 16, 4, 1
    c.train.update(num_steps=2, pretrain_steps=0, batch_size=4, seq_len=12, log_every=1, eval_every=2,
                   checkpoint_every=2)
    c.forward.update(max_steps=4, random_lower=1)
    c.backward.update(max_steps=4)
    c.jr.update(prob=1.0)
    c.optim.update(warmup_steps=1)
    c.eval.update(batch_size=4, max_steps=4, budgets="4", jac_probes=1, spectral_iters=5)
    summary = loop.train(c, tmp_path / "run", progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["valid_perplexity"])
    # Adaptive softmax: no full distribution is formed, so no accuracy (NaN, null in JSON).
    assert summary.get("valid_accuracy") is None or np.isnan(summary["valid_accuracy"])
    rows = [r for r in read(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["mode"] for r in rows] == ["deq", "deq"] and all(np.isfinite(r["loss"]) for r in rows)
