"""Text for language modelling: the embedded pydoc corpus, tiny_shakespeare, WikiText-103.

All three give a :class:`TextDataset` of int32 token streams; :func:`stream_batch` cuts a
stream into B contiguous sub-streams and serves length-T windows in order (the usual
language-modelling batching, so a window continues where the previous one ended).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

TEXT_DATA = ("pydoc", "tiny_shakespeare", "wikitext103")
SPLITS = ("train", "valid", "test")
# The pydoc corpus is split by position: the first 90% train, then 5% valid, 5% test.
PYDOC_FRACTIONS = (0.9, 0.05, 0.05)


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """Token streams of one corpus.

    Attributes:
      name: corpus name.
      level: ``"char"`` or ``"word"``.
      vocab: token strings; token id i is ``vocab[i]``.
      train, valid, test: ``[N]`` int32 token ids.
    """

    name: str
    level: str
    vocab: tuple[str, ...]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode(self, ids) -> str:
        sep = "" if self.level == "char" else " "
        return sep.join(self.vocab[int(i)] for i in ids)

    def encode(self, text: str) -> np.ndarray:
        """Text -> ids; characters/words outside the vocabulary are an error (char) or ``<unk>`` (word)."""
        index = {t: i for i, t in enumerate(self.vocab)}
        if self.level == "char":
            missing = sorted(set(text) - set(index))
            if missing:
                raise ValueError(f"characters not in the {self.name} vocabulary: {missing}")
            return np.array([index[ch] for ch in text], np.int32)
        return np.array([index.get(w, index["<unk>"]) for w in text.split()], np.int32)


def _char_dataset(name: str, train: str, valid: str, test: str) -> TextDataset:
    vocab = tuple(sorted(set(train) | set(valid) | set(test)))
    index = {ch: i for i, ch in enumerate(vocab)}

    def ids(text):
        return np.array([index[ch] for ch in text], np.int32)

    return TextDataset(name, "char", vocab, ids(train), ids(valid), ids(test))


def load_pydoc() -> TextDataset:
    """Character-level English text of ``pydoc_data.topics`` (ships with CPython, ~465k chars).

    Topics are joined in sorted order and split by position (90/5/5), so the split is
    the same everywhere for a given Python version.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    n = len(text)
    a, b = int(n * PYDOC_FRACTIONS[0]), int(n * (PYDOC_FRACTIONS[0] + PYDOC_FRACTIONS[1]))
    return _char_dataset("pydoc", text[:a], text[a:b], text[b:])


def load_tiny_shakespeare(data_dir: str | None = None) -> TextDataset:
    """Character-level tiny_shakespeare through ``tfds.data_source`` (prepared beforehand)."""
    import tensorflow_datasets as tfds

    texts = {}
    for split, tfds_split in zip(SPLITS, ("train", "validation", "test"), strict=True):
        try:
            source = tfds.data_source("tiny_shakespeare", split=tfds_split, data_dir=data_dir, download=False)
            text = source[0]["text"]
        except Exception as err:  # TFDS raises several types for "not prepared"; all mean the same here.
            where = data_dir or "~/tensorflow_datasets"
            raise FileNotFoundError(
                f"tiny_shakespeare is not prepared in {where!r} (TFDS array_record format). Prepare it once, "
                f"on a machine with internet access:\n"
                f"    python3 -m pip install tensorflow tensorflow-datasets\n"
                f"    tfds build tiny_shakespeare --data_dir {where} --file_format array_record"
            ) from err
        texts[split] = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    return _char_dataset("tiny_shakespeare", texts["train"], texts["valid"], texts["test"])


def load_wikitext103(folder: str | os.PathLike) -> TextDataset:
    """Word-level WikiText-103 from ``wiki.{train,valid,test}.tokens`` in ``folder``.

    The vocabulary is every word of the training file (it already maps rare words to
    ``<unk>``), in order of first appearance after ``<eos>`` and ``<unk>``; each line
    ends with ``<eos>``; words outside the vocabulary become ``<unk>``.
    """
    folder = Path(folder).expanduser()
    paths = {split: folder / f"wiki.{split}.tokens" for split in SPLITS}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"WikiText-103 files not found: {missing}. Download wikitext-103-v1.zip (the tokenized "
            "version, from the Salesforce/wikitext release), unzip it, and pass the folder holding "
            "wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens as --config.data.data_dir."
        )

    def words(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                yield from line.split()
                yield "<eos>"

    vocab = {"<eos>": 0, "<unk>": 1}
    for w in words(paths["train"]):
        vocab.setdefault(w, len(vocab))

    def ids(path):
        return np.fromiter((vocab.get(w, 1) for w in words(path)), np.int32)

    streams = {split: ids(p) for split, p in paths.items()}
    return TextDataset("wikitext103", "word", tuple(vocab), streams["train"], streams["valid"], streams["test"])


def stream_batch(tokens: np.ndarray, step: int, batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Window ``step`` of B contiguous streams: ``(inputs [B, T], targets [B, T])``.

    The stream is cut into B equal parts (the remainder dropped); window w covers
    positions ``[w T, (w + 1) T)`` of each part and the targets are the next tokens.
    Windows cycle over the parts, so ``step`` may grow without bound.
    """
    per_stream = (len(tokens) - 1) // batch_size
    windows = per_stream // seq_len
    if windows < 1:
        raise ValueError(
            f"{len(tokens)} tokens are too few for batch_size {batch_size} x seq_len {seq_len} (+1 for targets)"
        )
    start = (step % windows) * seq_len
    rows = np.arange(batch_size)[:, None] * per_stream + start + np.arange(seq_len)[None, :]
    return tokens[rows], tokens[rows + 1]


def eval_windows(tokens: np.ndarray, batch_size: int, seq_len: int):
    """Every next-token prediction of a stream exactly once: ``(inputs, targets, weights)``,
    each ``[B, T]``.

    The ``N - 1`` predictions are cut into B contiguous parts of ``ceil((N - 1) / B)``,
    served in length-T windows; positions past a part's end are padding with weight 0
    (so every batch has one shape). Each window is scored on its own: a prediction sees
    the preceding tokens of its window only (no memory across windows).
    """
    targets_n = len(tokens) - 1
    if targets_n < 1:
        raise ValueError(f"a stream of {len(tokens)} tokens has nothing to predict")
    per_part = -(-targets_n // batch_size)
    windows = -(-per_part // seq_len)
    pos = np.arange(batch_size)[:, None] * per_part + np.arange(windows * seq_len)[None, :]  # [B, W T]
    part_end = np.minimum((np.arange(batch_size)[:, None] + 1) * per_part, targets_n)
    valid = pos < part_end
    pos = np.where(valid, pos, 0)
    for w in range(windows):
        cols = slice(w * seq_len, (w + 1) * seq_len)
        p = pos[:, cols]
        yield tokens[p], tokens[p + 1], valid[:, cols].astype(np.float32)


def unigram_bits(dataset: TextDataset, split: str = "valid") -> float:
    """Bits per token of ``split`` under the training set's token frequencies (add-one
    smoothed): the baseline a language model must beat."""
    counts = np.bincount(dataset.train, minlength=dataset.vocab_size).astype(np.float64) + 1.0
    log_p = np.log2(counts / counts.sum())
    return float(-np.mean(log_p[getattr(dataset, split)]))


def load_text(name: str, data_dir: str | None = None) -> TextDataset:
    """Loads ``"pydoc"`` (embedded), ``"tiny_shakespeare"`` (TFDS, prepared in ``data_dir``)
    or ``"wikitext103"`` (token files in the folder ``data_dir``)."""
    if name == "pydoc":
        return load_pydoc()
    if name == "tiny_shakespeare":
        return load_tiny_shakespeare(data_dir)
    if name == "wikitext103":
        if not data_dir:
            raise FileNotFoundError(
                "wikitext103 needs data.data_dir: the folder holding wiki.{train,valid,test}.tokens "
                "(unzipped wikitext-103-v1.zip), e.g. --config.data.data_dir=~/data/wikitext-103"
            )
        return load_wikitext103(data_dir)
    raise ValueError(f"unknown text data set {name!r}; choose one of {TEXT_DATA}")
