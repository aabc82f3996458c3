"""Image classification data: the embedded digits default and CIFAR-10 through TFDS.

    dataset = deq_jax.data.load("digits", seed=0)
    images, labels = deq_jax.data.train_batch(dataset, step, batch_size, seed)

Every batch is a pure function of ``(seed, step)``, so a resumed run sees exactly the
batches the uninterrupted run would have seen.
"""

from deq_jax.data.cifar10 import load_cifar10
from deq_jax.data.digits import load_digits
from deq_jax.data.pipeline import Dataset, eval_batches, load, train_batch

__all__ = ["Dataset", "eval_batches", "load", "load_cifar10", "load_digits", "train_batch"]
