"""What the training loop needs to know about a data set and its model.

Two tasks share one loop, one train step and one eval step:

* image classification (``digits``, ``cifar10`` in memory; ``imagenet2012`` streamed)
  with an :class:`~deq_jax.models.MDEQ`: inputs ``[B, H, W, C]`` float32, targets ``[B]``
  int32;
* language modelling (``pydoc``, ``pydoc_words``, ``tiny_shakespeare``, ``wikitext103``) with a
  :class:`~deq_jax.models.DEQTransformer`: inputs and targets ``[B, T]`` int32 (the next
  tokens).

Evaluation batches carry weights shaped like the targets (0 marks padding), so loss and
accuracy are means over real targets and solver statistics are means over examples that
hold at least one real target.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import numpy as np

from deq_jax.data import pipeline, text
from deq_jax.models import MDEQ, DEQTransformer
from deq_jax.train import config as config_lib

Batch = tuple[np.ndarray, np.ndarray]
EvalBatch = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Task:
    """A data set, its model and its batches.

    Attributes:
      name: data set name (``data.name``).
      data: the loaded :class:`~deq_jax.data.Dataset`, :class:`~deq_jax.data.StreamingImages`
        or :class:`~deq_jax.data.TextDataset`.
      model: the Flax module (methods inject / initial_state / cell / head).
      sample_input: ``[1, ...]`` zeros of the model's input shape and dtype (for ``init``).
      train_batch: ``(step, rows) -> (inputs, targets)``: the global batch of a step, or its
        ``rows`` (ascending positions; None: all), what one process loads.
      eval_sets: split name -> a function of ``rows`` returning ``(inputs, targets,
        weights)`` batches (their ``rows``); the first split is evaluated during
        training, the others once at the end.
      language: report perplexity ``exp(loss)``.
      char_level: also report bits per character ``loss / ln 2``.
      baselines: reference numbers for the summary (e.g. ``unigram_bpc``).
      stream_start: ``step -> bool``, true where the training windows start over from the
        beginning of their streams (a model's segment memory is then emptied).
      batch_size, eval_batch_size: the global batch sizes of ``train_batch`` and ``eval_sets``.
    """

    name: str
    data: Any
    model: nn.Module
    sample_input: np.ndarray
    train_batch: Callable[[int, np.ndarray | None], Batch]
    eval_sets: dict[str, Callable[[np.ndarray | None], Iterator[EvalBatch]]]
    language: bool = False
    char_level: bool = False
    baselines: dict[str, float] = dataclasses.field(default_factory=dict)
    stream_start: Callable[[int], bool] = lambda step: False
    batch_size: int = 0
    eval_batch_size: int = 0

    @property
    def eval_split(self) -> str:
        return next(iter(self.eval_sets))

    @property
    def main_metric(self) -> str:
        """The quality metric shown first: ``bpc``, ``perplexity`` or ``accuracy``."""
        if self.char_level:
            return "bpc"
        return "perplexity" if self.language else "accuracy"

    def derived(self, loss: float) -> dict[str, float]:
        """Metrics derived from a mean cross-entropy (nats per target)."""
        if not self.language:
            return {}
        out = {"perplexity": math.exp(min(loss, 700.0))}
        if self.char_level:
            out["bpc"] = loss / math.log(2.0)
        return out


def cell_compute_dtype(c):
    """The cell's compute dtype for the models: None (no casts) for float32."""
    return None if c.model.compute_dtype == "float32" else c.model.compute_dtype


def make_task(c) -> Task:
    """The task of a resolved config: loads the data and builds the model."""
    name = c.data.name
    data_dir = c.data.data_dir or None
    if name in pipeline.IMAGE_DATA:
        ds = pipeline.load(name, seed=c.seed, data_dir=data_dir, image_size=c.data.image_size or None)
        if not c.data.augment:
            changes = {"augment": False} if name == "imagenet2012" else {"crop_padding": 0, "flip": False}
            ds = dataclasses.replace(ds, **changes)
        split = "validation" if name == "imagenet2012" else "test"  # ImageNet's test labels are not public
        eval_sets = {split: lambda rows=None: ds.eval_batches(c.eval.batch_size, rows)}
        if c.data.validation_fraction:  # held out of the training set: evaluated first, the test set after
            ds, held = pipeline.hold_out(ds, c.data.validation_fraction, seed=c.seed)
            eval_sets = {"validation": lambda rows=None: held.eval_batches(c.eval.batch_size, rows)} | eval_sets
        ds.steps_per_epoch(c.train.batch_size)  # fails early if the batch is too large
        return Task(
            name=name,
            data=ds,
            model=MDEQ(c.model.size, num_classes=ds.num_classes, dropout=c.model.dropout,
                       compute_dtype=cell_compute_dtype(c)),
            sample_input=np.zeros((1,) + ds.image_shape, np.float32),
            train_batch=lambda step, rows=None: ds.train_batch(step, c.train.batch_size, c.seed, rows),
            eval_sets=eval_sets,
            batch_size=c.train.batch_size,
            eval_batch_size=c.eval.batch_size,
        )
    ds = text.load_text(name, data_dir)
    m, seq_len = c.model, c.train.seq_len
    windows = text.stream_windows(ds.train, c.train.batch_size, seq_len)  # fails early if the corpus is too short
    model = DEQTransformer(
        ds.vocab_size,
        d_model=m.d_model,
        num_heads=m.num_heads,
        d_ff=m.d_ff,
        pre_ln=m.pre_ln,
        tie_embeddings=m.tie_embeddings,
        dropout=m.dropout,
        mem_len=m.mem_len,
        cutoffs=config_lib.cutoffs(c),
        div_val=m.div_val,
        compute_dtype=cell_compute_dtype(c),
    )
    if model.cutoffs and model.cutoffs[-1] >= ds.vocab_size:
        raise ValueError(f"model.cutoffs {model.cutoffs} must lie below the {name} vocabulary size {ds.vocab_size}")
    char = ds.level == "char"
    unigram = text.unigram_bits(ds, "valid")
    return Task(
        name=name,
        data=ds,
        model=model,
        sample_input=np.zeros((1, seq_len), np.int32),
        train_batch=lambda step, rows=None: text.stream_batch(ds.train, step, c.train.batch_size, seq_len, rows),
        eval_sets={
            "valid": lambda rows=None: text.eval_windows(ds.valid, c.eval.batch_size, seq_len, rows),
            "test": lambda rows=None: text.eval_windows(ds.test, c.eval.batch_size, seq_len, rows),
        },
        language=True,
        char_level=char,
        baselines={"unigram_bpc" if char else "unigram_perplexity": unigram if char else 2.0**unigram},
        stream_start=lambda step: step % windows == 0,
        batch_size=c.train.batch_size,
        eval_batch_size=c.eval.batch_size,
    )
