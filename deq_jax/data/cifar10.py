"""CIFAR-10 through ``tfds.data_source`` (random access; TensorFlow is not needed to train)."""

from __future__ import annotations

import numpy as np

from deq_jax.data.pipeline import Dataset, tfds_dir

# Per-channel statistics of the CIFAR-10 training set (images scaled to [0, 1]).
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)

PREPARE_HINT = (
    "CIFAR-10 is not prepared in {data_dir!r} (TFDS array_record format). Prepare it once, on a "
    "machine with internet access:\n"
    "    python3 -m pip install tensorflow tensorflow-datasets\n"
    "    tfds build cifar10 --data_dir {data_dir} --file_format array_record\n"
    "then pass --config.data.data_dir={data_dir} (or set TFDS_DATA_DIR)."
)


def _split(data_dir: str | None, split: str):
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source("cifar10", split=split, data_dir=data_dir, download=False)
    except Exception as err:  # TFDS raises several types for "not prepared"; all mean the same here.
        raise FileNotFoundError(PREPARE_HINT.format(data_dir=tfds_dir(data_dir))) from err


def _to_arrays(source, desc: str) -> tuple[np.ndarray, np.ndarray]:
    from tqdm.auto import tqdm

    n = len(source)
    images = np.zeros((n, 32, 32, 3), np.uint8)
    labels = np.zeros((n,), np.int32)
    for i in tqdm(range(n), desc=desc, leave=False, disable=n < 10000):
        example = source[i]
        images[i] = example["image"]
        labels[i] = example["label"]
    return images, labels


def load_cifar10(data_dir: str | None = None) -> Dataset:
    """CIFAR-10 train (50k) / test (10k) as uint8 arrays in memory.

    Training batches get a random 32x32 crop of the image zero-padded by 4 pixels and a
    random horizontal flip; all batches are normalized by the training statistics.

    Raises:
      FileNotFoundError: with preparation instructions, if the data is not prepared.
    """
    train_x, train_y = _to_arrays(_split(data_dir, "train"), "reading CIFAR-10 train")
    test_x, test_y = _to_arrays(_split(data_dir, "test"), "reading CIFAR-10 test")
    return Dataset(
        name="cifar10",
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        num_classes=10,
        mean=MEAN,
        std=STD,
        crop_padding=4,
        flip=True,
    )
