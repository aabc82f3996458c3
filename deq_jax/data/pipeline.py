"""Batches from in-memory arrays: seeded epoch shuffling, augmentation, normalization.

Image data sets come in two kinds with one interface (``name``, ``num_classes``,
``image_shape``, ``steps_per_epoch(batch)``, ``train_batch(step, batch, seed, rows)``,
``eval_batches(batch, rows)``): :class:`Dataset` here (digits, CIFAR-10: arrays in memory) and
:class:`~deq_jax.data.imagenet.StreamingImages` (ImageNet: read example by example).

``rows`` (optional, ascending positions within the global batch) asks for a part of each
batch: what one process of a multi-process run loads, decodes and augments. The global
batch of a step is the same however it is split: the example at position k, and its
augmentation, depend on ``(seed, step, k)`` alone.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

IMAGE_DATA = ("digits", "cifar10", "imagenet2012")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An in-memory image classification data set.

    Attributes:
      name: data set name.
      train_images, test_images: ``[N, H, W, C]`` uint8 (0..255) or float32 (0..1).
      train_labels, test_labels: ``[N]`` int32.
      num_classes: number of classes.
      mean, std: ``[C]`` float32 normalization of images scaled to 0..1.
      crop_padding: random-crop padding for training batches (0: no crop).
      flip: random horizontal flips for training batches.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: np.ndarray
    std: np.ndarray
    crop_padding: int = 0
    flip: bool = False

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def steps_per_epoch(self, batch_size: int) -> int:
        return steps_per_epoch(self, batch_size)

    def train_batch(self, step: int, batch_size: int, seed: int, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """:func:`train_batch` of this data set."""
        return train_batch(self, step, batch_size, seed, rows)

    def eval_batches(self, batch_size: int, rows=None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:func:`eval_batches` of this data set."""
        return eval_batches(self, batch_size, rows)


def normalize(dataset: Dataset, images: np.ndarray) -> np.ndarray:
    """Images (uint8 0..255 or float 0..1) -> float32 ``(x - mean) / std``."""
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x = x / 255.0
    return (x - dataset.mean) / dataset.std


def augment(images: np.ndarray, rng: np.random.Generator, crop_padding: int, flip: bool,
            rows: np.ndarray | None = None, batch_size: int | None = None) -> np.ndarray:
    """Random crop after zero padding by ``crop_padding`` pixels, then random horizontal flip.

    ``images``: ``[B, H, W, C]``; returns the same shape and dtype. ``rows``/``batch_size``:
    ``images`` are the examples at positions ``rows`` of a batch of ``batch_size``; the
    draws are made for the whole batch, so each example gets the crop and flip it would
    get in the whole batch.
    """
    b, h, w, _ = images.shape
    n = b if batch_size is None else batch_size
    pick = slice(None) if rows is None else np.asarray(rows)
    if crop_padding:
        p = crop_padding
        padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        dy = rng.integers(0, 2 * p + 1, size=n)[pick]
        dx = rng.integers(0, 2 * p + 1, size=n)[pick]
        ys = dy[:, None] + np.arange(h)[None, :]  # [B, H]
        xs = dx[:, None] + np.arange(w)[None, :]  # [B, W]
        images = padded[np.arange(b)[:, None, None], ys[:, :, None], xs[:, None, :]]
    if flip:
        flipped = (rng.random(n) < 0.5)[pick]
        images = np.where(flipped[:, None, None, None], images[:, :, ::-1], images)
    return images


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
    n = len(dataset.train_labels)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples of {dataset.name}")
    return n // batch_size


def train_batch(dataset: Dataset, step: int, batch_size: int, seed: int,
                rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The training batch of global step ``step``: ``([B, H, W, C] float32, [B] int32)``,
    or its ``rows`` (``B = len(rows)``).

    Epoch e visits the training set in the order ``permutation(seed, e)`` (the last
    partial batch is dropped); augmentation draws from ``(seed, step)``. Pure in its
    arguments, so resuming at any step reproduces the same batches.
    """
    per_epoch = steps_per_epoch(dataset, batch_size)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(dataset.train_labels))
    idx = order[i * batch_size : (i + 1) * batch_size]
    if rows is not None:
        idx = idx[np.asarray(rows)]
    images = dataset.train_images[idx]
    if dataset.crop_padding or dataset.flip:
        images = augment(images, np.random.default_rng([seed, step, 1]), dataset.crop_padding, dataset.flip,
                         rows, batch_size)
    return normalize(dataset, images), dataset.train_labels[idx]


def eval_batches(dataset: Dataset, batch_size: int,
                 rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The test set in order, as ``(images, labels, weights)`` batches of exactly ``batch_size``
    (or their ``rows``).

    The last batch is padded with copies of the first examples and weight 0, so that
    every batch has the same shape (one compilation) and shards evenly.
    """
    n = len(dataset.test_labels)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        if rows is not None:
            idx = idx[np.asarray(rows)]
        weights = (idx < n).astype(np.float32)
        idx = np.where(idx < n, idx, idx % n)
        yield normalize(dataset, dataset.test_images[idx]), dataset.test_labels[idx], weights


def hold_out(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """``(train, validation)``: ``fraction`` of the training set held out, stratified by class.

    ``train`` is ``dataset`` with the rest of its training examples (its test set
    unchanged); ``validation`` holds the held-out examples in its test fields, so that
    :func:`eval_batches` of it visits them. The split depends only on ``seed``; both keep
    ``dataset``'s normalization (from the whole training set). For choosing
    hyperparameters without looking at the test set.
    """
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    index = np.arange(len(dataset.train_labels))
    keep, held = train_test_split(index, test_size=fraction, random_state=seed, stratify=dataset.train_labels)
    keep, held = np.sort(keep), np.sort(held)
    train = dataclasses.replace(dataset, train_images=dataset.train_images[keep],
                                train_labels=dataset.train_labels[keep])
    validation = dataclasses.replace(dataset, test_images=dataset.train_images[held],
                                     test_labels=dataset.train_labels[held])
    return train, validation


def tfds_dir(data_dir: str | None) -> str:
    """The folder TFDS reads for ``data_dir`` (None: ``$TFDS_DATA_DIR``, else
    ``~/tensorflow_datasets``, TFDS's own default), spelled out for a command a user copies."""
    return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def load(name: str, *, seed: int = 0, data_dir: str | None = None, image_size: int | None = None):
    """Loads ``"digits"`` (embedded, no download), ``"cifar10"`` (prepared with TFDS, in
    memory) or ``"imagenet2012"`` (prepared with TFDS, streamed).

    ``image_size``: the side of ImageNet's square crops (None or 0: 224); the other data
    sets have a fixed size and accept only None or 0.
    """
    from deq_jax.data.cifar10 import load_cifar10
    from deq_jax.data.digits import load_digits
    from deq_jax.data.imagenet import IMAGE_SIZE, load_imagenet

    if name not in IMAGE_DATA:
        raise ValueError(f"unknown image data set {name!r}; choose one of {IMAGE_DATA}")
    if name == "imagenet2012":
        return load_imagenet(data_dir=data_dir, image_size=image_size or IMAGE_SIZE)
    if image_size:
        raise ValueError(f"image_size applies to imagenet2012 only; {name} images have a fixed size")
    if name == "digits":
        return load_digits(seed=seed)
    return load_cifar10(data_dir=data_dir)
