"""scikit-learn's 8x8 handwritten digits: the embedded default (ships with scikit-learn)."""

from __future__ import annotations

import numpy as np

from deq_jax.data.pipeline import Dataset

TEST_FRACTION = 0.2


def load_digits(seed: int = 0) -> Dataset:
    """1797 grayscale 8x8 digits split into train/test (80/20, stratified by class).

    The split depends only on ``seed`` (the same seed gives the same split on every
    machine). Images are float32 in [0, 1], ``[N, 8, 8, 1]``; normalization uses the
    training set's mean and standard deviation.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    raw = sk_load_digits()
    images = (raw.images.astype(np.float32) / 16.0)[..., None]
    labels = raw.target.astype(np.int32)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=seed, stratify=labels
    )
    return Dataset(
        name="digits",
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        num_classes=10,
        mean=np.array([train_x.mean()], np.float32),
        std=np.array([train_x.std()], np.float32),
    )
