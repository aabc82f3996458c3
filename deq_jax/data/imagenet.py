"""ImageNet (ILSVRC 2012) through ``tfds.data_source``: streamed, never held in memory.

    ds = load_imagenet(data_dir, image_size=224)
    images, labels = ds.train_batch(step, batch_size, seed)   # [B, S, S, 3] float32, [B] int32
    for images, labels, weights in ds.eval_batches(batch_size): ...

The 1.28M training images do not fit in memory, so a batch is read by random access:
epoch e visits the training split in the order ``permutation(seed, e)`` (the last partial
batch is dropped) and example k of the batch of global step t is augmented with its own
generator ``(seed, t, k)``. A batch is therefore a pure function of ``(seed, step)``, as for
the in-memory data sets, and does not depend on how many threads decode it.

Preprocessing (numpy, the standard ImageNet recipe the official MDEQ code uses through
torchvision, ``MDEQ-Vision/tools/cls_train.py``):

* training: a random crop of 8%-100% of the area with aspect ratio in [3/4, 4/3]
  (:func:`random_resized_crop_box`), resized to ``image_size`` x ``image_size``, then a
  random horizontal flip;
* evaluation: the shorter side resized to ``image_size * 8 // 7`` (256 for 224), then
  the central ``image_size`` x ``image_size`` crop;
* both: resizing is bilinear with antialiasing (the filter widens when shrinking, as
  PIL's ``BILINEAR``, which torchvision uses on PIL images), then ``(x / 255 - mean) / std``
  with the ImageNet statistics.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from deq_jax.data.pipeline import tfds_dir

NAME = "imagenet2012"
IMAGE_SIZE = 224  # the official MODEL.IMAGE_SIZE (cls_mdeq_SMALL_reg.yaml)
NUM_CLASSES = 1000
EVAL_SPLIT = "validation"  # the 50k labelled validation images (the test split has no labels)
# ImageNet channel statistics of images scaled to [0, 1] (the torchvision values).
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

PREPARE_HINT = (
    "ImageNet (TFDS 'imagenet2012') is not prepared in {data_dir!r} (TFDS array_record format), and TFDS "
    "cannot download it. Prepare it once:\n"
    "  1. register at https://image-net.org/download-images and download ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar into one folder, MANUAL_DIR (keep the file names; do not unpack them);\n"
    "  2. then:\n"
    "    python3 -m pip install tensorflow tensorflow-datasets\n"
    "    tfds build imagenet2012 --data_dir {data_dir} --manual_dir MANUAL_DIR --file_format array_record\n"
    "then pass --config.data.data_dir={data_dir} (or set TFDS_DATA_DIR)."
)


# --- preprocessing (one image) ------------------------------------------------------


def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """``[out_size, in_size]`` float32 interpolation weights along one axis.

    Output pixel i samples the input at ``(i + 0.5) * in_size / out_size`` (pixel
    centers aligned) with a triangle (bilinear) filter whose radius is
    ``max(in_size / out_size, 1)`` input pixels, so shrinking averages every input pixel
    (antialiasing). Each row sums to 1; at the borders the filter is cut and renormalized.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got in_size={in_size}, out_size={out_size}")
    scale = in_size / out_size
    radius = max(scale, 1.0)
    centers = (np.arange(out_size) + 0.5) * scale
    pixels = np.arange(in_size) + 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(pixels[None, :] - centers[:, None]) / radius)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _apply_weights(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``[H, W, C]`` -> ``[len(rows), len(cols), C]`` float32: ``rows @ image @ cols^T`` per channel."""
    tmp = np.tensordot(rows, image.astype(np.float32), axes=(1, 0))  # [oh, W, C]
    return np.tensordot(tmp, cols, axes=(1, 1)).transpose(0, 2, 1)  # [oh, ow, C]


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[H, W, C]`` (any dtype, 0..255) -> ``[height, width, C]`` float32, antialiased bilinear."""
    h, w = image.shape[:2]
    return _apply_weights(image, resize_weights(h, height), resize_weights(w, width))


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """``(top, left, crop_height, crop_width)`` of a random crop of a ``height x width`` image.

    Up to ``attempts`` draws of an area fraction uniform in ``scale`` and an aspect ratio
    (width / height) log-uniform in ``ratio``; the first crop that fits is placed
    uniformly. If none fits, the central crop of the whole image with the aspect ratio
    clamped into ``ratio``. (The rule of torchvision's ``RandomResizedCrop``.)
    """
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = float(np.exp(rng.uniform(log_ratio[0], log_ratio[1])))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, min(height, int(round(width / ratio[0])))
    elif in_ratio > ratio[1]:
        h, w = height, min(width, int(round(height * ratio[1])))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image [H, W, 3] (or [H, W, 1]), got shape {image.shape}")
    return np.broadcast_to(image, image.shape[:2] + (3,)) if image.shape[-1] == 1 else image


def train_image(image: np.ndarray, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Training augmentation of one image: ``[H, W, 3]`` uint8 -> ``[S, S, 3]`` float32 in 0..255.

    Random resized crop (:func:`random_resized_crop_box`) to ``S = image_size``, then a
    horizontal flip with probability 1/2. Draws from ``rng`` only.
    """
    image = _rgb(image)
    top, left, h, w = random_resized_crop_box(rng, image.shape[0], image.shape[1])
    out = resize(image[top : top + h, left : left + w], image_size, image_size)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def eval_size(image_size: int) -> int:
    """The shorter side before the central crop: ``image_size / 0.875`` (256 for 224)."""
    return image_size * 8 // 7


def eval_image(image: np.ndarray, image_size: int) -> np.ndarray:
    """Evaluation preprocessing: ``[H, W, 3]`` uint8 -> ``[S, S, 3]`` float32 in 0..255.

    The shorter side is resized to :func:`eval_size` (the longer one in proportion,
    rounded down), then the central ``S x S`` crop is kept (offsets rounded to nearest).
    Only the kept rows and columns are computed.
    """
    image = _rgb(image)
    h, w = image.shape[:2]
    short = eval_size(image_size)
    new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    rows = resize_weights(h, new_h)[top : top + image_size]
    cols = resize_weights(w, new_w)[left : left + image_size]
    return _apply_weights(image, rows, cols)


def normalize(images: np.ndarray) -> np.ndarray:
    """Images in 0..255 (``[..., 3]``) -> float32 ``(x / 255 - MEAN) / STD``."""
    return (np.asarray(images, np.float32) / 255.0 - MEAN) / STD


# --- batches -------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: ``permutation(n)`` from ``(seed, epoch)`` (cached, read-only)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


@functools.cache
def _pool(num_workers: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="deq_jax_images")


def _map(fn: Callable[[int], Any], n: int, num_workers: int) -> list:
    """``[fn(0), ..., fn(n - 1)]``, in order, on ``num_workers`` threads (1: in this thread)."""
    if num_workers <= 1:
        return [fn(k) for k in range(n)]
    return list(_pool(num_workers).map(fn, range(n)))


@dataclasses.dataclass(frozen=True, eq=False)
class StreamingImages:
    """An image classification data set read example by example from random-access sources.

    Same interface as the in-memory :class:`~deq_jax.data.pipeline.Dataset` (``name``,
    ``num_classes``, ``image_shape``, ``steps_per_epoch``, ``train_batch``,
    ``eval_batches``), so a training task uses either.

    Attributes:
      name: data set name.
      train_source, eval_source: ``len()`` and ``source[i] -> {"image": [H, W, 3] uint8,
        "label": int}`` (a ``tfds.data_source``, or any object that behaves so).
      num_classes: number of classes.
      image_size: side S of the square images of every batch.
      num_workers: threads reading and preprocessing the examples of a batch (results do
        not depend on it).
      augment: training images get a random resized crop and flip; if False, the
        evaluation's resize and center crop.
    """

    name: str
    train_source: Sequence[dict]
    eval_source: Sequence[dict]
    num_classes: int
    image_size: int
    num_workers: int = 1
    augment: bool = True

    def __post_init__(self):
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    def steps_per_epoch(self, batch_size: int) -> int:
        n = len(self.train_source)
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples of {self.name}")
        return n // batch_size

    def train_batch(self, step: int, batch_size: int, seed: int, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """The training batch of global step ``step``: ``([B, S, S, 3] float32, [B] int32)``,
        or only its ``rows`` (ascending positions in the batch; the others are not read)."""
        epoch, i = divmod(step, self.steps_per_epoch(batch_size))
        idx = epoch_order(seed, epoch, len(self.train_source))[i * batch_size : (i + 1) * batch_size]
        positions = np.arange(batch_size) if rows is None else np.asarray(rows)

        def one(j):
            k = int(positions[j])  # the example's position in the global batch keys its crop
            example = self.train_source[int(idx[k])]
            if not self.augment:
                return eval_image(example["image"], self.image_size), example["label"]
            rng = np.random.default_rng([seed, step, 1, k])
            return train_image(example["image"], rng, self.image_size), example["label"]

        images, labels = zip(*_map(one, len(positions), self.num_workers))
        return normalize(np.stack(images)), np.asarray(labels, np.int32)

    def eval_batches(self, batch_size: int, rows=None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The evaluation split in order, as ``(images [B, S, S, 3], labels [B], weights [B])``
        (or only the batches' ``rows``).

        As :func:`~deq_jax.data.pipeline.eval_batches`: the last batch is padded with the
        first examples at weight 0, so every batch has exactly ``batch_size`` examples.
        """
        n = len(self.eval_source)
        for start in range(0, n, batch_size):
            idx = np.arange(start, start + batch_size)
            if rows is not None:
                idx = idx[np.asarray(rows)]
            weights = (idx < n).astype(np.float32)
            idx = np.where(idx < n, idx, idx % n)

            def one(k, idx=idx):
                example = self.eval_source[int(idx[k])]
                return eval_image(example["image"], self.image_size), example["label"]

            images, labels = zip(*_map(one, len(idx), self.num_workers))
            yield normalize(np.stack(images)), np.asarray(labels, np.int32), weights


def _split(data_dir: str | None, split: str):
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(NAME, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # TFDS raises several types for "not prepared"; all mean the same here.
        raise FileNotFoundError(PREPARE_HINT.format(data_dir=tfds_dir(data_dir))) from err


def load_imagenet(
    data_dir: str | None = None, image_size: int = IMAGE_SIZE, num_workers: int | None = None
) -> StreamingImages:
    """ImageNet train (1,281,167 images) / validation (50,000), streamed from TFDS.

    Args:
      data_dir: the TFDS data_dir holding ``imagenet2012`` in array_record format.
      image_size: side of the square training crops and evaluation center crops.
      num_workers: decoding threads (default: the machine's CPU count, at most 32).

    Raises:
      FileNotFoundError: with preparation instructions, if the data is not prepared.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    workers = num_workers if num_workers is not None else min(32, os.cpu_count() or 1)
    return StreamingImages(
        name=NAME,
        train_source=_split(data_dir, "train"),
        eval_source=_split(data_dir, EVAL_SPLIT),
        num_classes=NUM_CLASSES,
        image_size=image_size,
        num_workers=workers,
    )
