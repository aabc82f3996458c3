"""Data: the digits split, CIFAR-10 through tfds.testing.mock_data, augmentation, errors."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from deq_jax import data


def test_digits_split_is_deterministic_and_stratified():
    a, b, c = data.load_digits(seed=0), data.load_digits(seed=0), data.load_digits(seed=1)
    assert a.train_images.shape == (1437, 8, 8, 1) and a.test_images.shape == (360, 8, 8, 1)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert not np.array_equal(a.test_labels, c.test_labels)
    counts = np.bincount(a.test_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 10 classes of ~180
    assert 0.0 <= a.train_images.min() and a.train_images.max() <= 1.0


ROWS = np.array([1, 2, 5, 6, 13])  # a process's share of a batch (any ascending rows)


def test_a_process_share_of_a_batch_is_those_rows_of_the_global_batch():
    """What a process of a multi-process run loads is the same examples, crops and flips as
    the rows it holds of the global batch: the batch does not depend on the process count."""
    import dataclasses

    ds = dataclasses.replace(data.load_digits(seed=0), crop_padding=1, flip=True)
    images, labels = data.train_batch(ds, 7, 16, seed=3)
    part_images, part_labels = data.train_batch(ds, 7, 16, seed=3, rows=ROWS)
    np.testing.assert_array_equal(part_images, images[ROWS])
    np.testing.assert_array_equal(part_labels, labels[ROWS])
    for whole, part in zip(data.eval_batches(ds, 16), data.eval_batches(ds, 16, rows=ROWS), strict=True):
        for a, b in zip(whole, part, strict=True):
            np.testing.assert_array_equal(b, a[ROWS])

    from deq_jax.data import text

    tokens = np.arange(1000, dtype=np.int32)
    whole, part = text.stream_batch(tokens, 3, 16, 8), text.stream_batch(tokens, 3, 16, 8, rows=ROWS)
    for a, b in zip(whole, part, strict=True):
        np.testing.assert_array_equal(b, a[ROWS])
    for a, b in zip(text.eval_windows(tokens, 16, 8), text.eval_windows(tokens, 16, 8, rows=ROWS), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(y, x[ROWS])


def test_a_held_out_validation_split_is_disjoint_stratified_and_seeded():
    ds = data.load_digits(seed=0)
    train, held = data.hold_out(ds, 0.2, seed=0)
    assert len(held.test_labels) == 288 and len(train.train_labels) == 1437 - 288
    np.testing.assert_array_equal(train.test_labels, ds.test_labels)  # the test set is untouched
    # Together they are the training set, each example once.
    together = np.concatenate([train.train_images, held.test_images]).reshape(1437, -1)
    assert len(np.unique(together, axis=0)) == len(np.unique(ds.train_images.reshape(1437, -1), axis=0))
    np.testing.assert_array_equal(np.sort(np.concatenate([train.train_labels, held.test_labels])),
                                  np.sort(ds.train_labels))
    counts = np.bincount(held.test_labels, minlength=10)
    assert counts.min() >= 27 and counts.max() <= 30  # stratified: 10 classes of ~144
    again, other = data.hold_out(ds, 0.2, seed=0)[1], data.hold_out(ds, 0.2, seed=1)[1]
    np.testing.assert_array_equal(again.test_images, held.test_images)
    assert not np.array_equal(other.test_labels, held.test_labels)
    assert sum(float(b[2].sum()) for b in data.eval_batches(held, 100)) == 288
    with pytest.raises(ValueError, match="validation fraction"):
        data.hold_out(ds, 1.0)


def test_the_validation_split_is_evaluated_first_and_the_test_set_after():
    from deq_jax.train import config as config_lib
    from deq_jax.train.tasks import make_task

    task = make_task(config_lib.resolve({"data": {"validation_fraction": 0.2}}))
    assert list(task.eval_sets) == ["validation", "test"] and task.eval_split == "validation"
    assert sum(float(b[2].sum()) for b in task.eval_sets["validation"]()) == 288
    assert sum(float(b[2].sum()) for b in task.eval_sets["test"]()) == 360
    assert list(make_task(config_lib.resolve({})).eval_sets) == ["test"]
    with pytest.raises(ValueError, match="validation_fraction"):
        config_lib.resolve({"data": {"name": "pydoc", "validation_fraction": 0.2}})


def test_train_batches_are_pure_functions_of_seed_and_step():
    ds = data.load_digits()
    x1, y1 = data.train_batch(ds, 5, 32, seed=0)
    x2, y2 = data.train_batch(ds, 5, 32, seed=0)
    x3, _ = data.train_batch(ds, 6, 32, seed=0)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    # One epoch visits every training example once.
    per_epoch = len(ds.train_labels) // 32
    seen = np.concatenate([data.train_batch(ds, s, 32, seed=0)[1] for s in range(per_epoch)])
    assert len(seen) == per_epoch * 32
    batches = list(data.eval_batches(ds, 200))
    assert [b[0].shape[0] for b in batches] == [200, 200]
    assert sum(float(b[2].sum()) for b in batches) == 360


def test_cifar10_pipeline_with_mock_data():
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load("cifar10", data_dir="/nonexistent")
    assert ds.train_images.shape == (24, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_labels.shape == (24,) and ds.crop_padding == 4 and ds.flip
    images, labels = data.train_batch(ds, 0, 16, seed=0)
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.float32 and labels.shape == (16,)
    # Normalized with the CIFAR statistics: un-normalizing gives values in [0, 1].
    raw = images * ds.std + ds.mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # Augmented: the training batch differs from the plain normalized images.
    order = np.random.default_rng([0, 0]).permutation(24)[:16]
    plain = data.pipeline.normalize(ds, ds.train_images[order])
    assert not np.allclose(images, plain)


def test_augment_crops_and_flips():
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1) + 1
    out = data.pipeline.augment(images, np.random.default_rng(0), crop_padding=1, flip=False)
    for b in range(2):  # each output is a 4x4 window of the zero-padded 6x6 image
        padded = np.pad(images[b, ..., 0], 1)
        windows = [padded[i : i + 4, j : j + 4] for i in range(3) for j in range(3)]
        assert any(np.array_equal(out[b, ..., 0], w) for w in windows)
    flipped = data.pipeline.augment(images, np.random.default_rng(1), crop_padding=0, flip=True)
    for b in range(2):
        assert np.array_equal(flipped[b], images[b]) or np.array_equal(flipped[b], images[b, :, ::-1])


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
        data.load("cifar10", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown image data set"):
        data.load("mnist")


def test_the_prepare_command_for_a_missing_data_set_can_be_copied(tmp_path, monkeypatch):
    """Without data.data_dir the hint names TFDS's real folder ($TFDS_DATA_DIR here), not a
    description of it, so the printed command runs as it is."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        data.load("cifar10")
    assert f"    tfds build cifar10 --data_dir {tmp_path} --file_format array_record\n" in str(info.value)
