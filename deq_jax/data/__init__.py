"""Data: images (digits default, CIFAR-10 and ImageNet through TFDS) and text (pydoc default,
pydoc_words, tiny_shakespeare through TFDS, WikiText-103 token files; see ``deq_jax.data.text``).

    dataset = deq_jax.data.load("digits", seed=0)
    images, labels = deq_jax.data.train_batch(dataset, step, batch_size, seed)

Every batch is a pure function of ``(seed, step)``, so a resumed run sees exactly the
batches the uninterrupted run would have seen.
"""

from deq_jax.data.cifar10 import load_cifar10
from deq_jax.data.digits import load_digits
from deq_jax.data.imagenet import StreamingImages, load_imagenet
from deq_jax.data.pipeline import Dataset, eval_batches, hold_out, load, train_batch
from deq_jax.data.text import (
    TextDataset,
    eval_windows,
    frequency_vocab,
    load_pydoc,
    load_pydoc_words,
    load_text,
    load_tiny_shakespeare,
    load_wikitext103,
    stream_batch,
    stream_windows,
    unigram_bits,
)

__all__ = [
    "Dataset",
    "StreamingImages",
    "TextDataset",
    "eval_batches",
    "eval_windows",
    "frequency_vocab",
    "hold_out",
    "load",
    "load_cifar10",
    "load_digits",
    "load_imagenet",
    "load_pydoc",
    "load_pydoc_words",
    "load_text",
    "load_tiny_shakespeare",
    "load_wikitext103",
    "stream_batch",
    "stream_windows",
    "train_batch",
    "unigram_bits",
]
