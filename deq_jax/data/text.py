"""Text for language modelling: the embedded pydoc corpus (characters or words),
tiny_shakespeare, WikiText-103.

All give a :class:`TextDataset` of int32 token streams; :func:`stream_batch` cuts a
stream into B contiguous sub-streams and serves length-T windows in order (the usual
language-modelling batching, so a window continues where the previous one ended).

Word-level vocabularies (``pydoc_words``, ``wikitext103``) are in frequency order, as
the adaptive softmax's cutoffs assume: ``<eos>`` is id 0, then the words by descending
training count (ties: first appearance), ``<unk>`` placed by its own count; see
:func:`frequency_vocab`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from deq_jax.data.pipeline import tfds_dir

TEXT_DATA = ("pydoc", "pydoc_words", "tiny_shakespeare", "wikitext103")
SPLITS = ("train", "valid", "test")
# The pydoc corpora are split by position: the first 90% train, then 5% valid, 5% test
# (of the characters for "pydoc", of the word tokens for "pydoc_words").
PYDOC_FRACTIONS = (0.9, 0.05, 0.05)
EOS, UNK = "<eos>", "<unk>"
# pydoc_words tokenizer: runs of word characters (letters, digits, "_"), or one
# punctuation/symbol character; whitespace separates tokens and is dropped.
WORD_PATTERN = r"\w+|[^\w\s]"
# Default pydoc_words vocabulary size, <eos> and <unk> included. 2048 keeps the training
# words seen at least 3 times (WikiText-103's own rule for <unk>), so <unk> is as common
# in train (~2.6%) as in valid (~2.4%) and a model learns to predict it.
PYDOC_WORDS_VOCAB = 2048


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """Token streams of one corpus.

    Attributes:
      name: corpus name.
      level: ``"char"`` or ``"word"``.
      vocab: token strings; token id i is ``vocab[i]``.
      train: ``[N]`` int32 token ids of the training split.
      valid: the same for the validation split.
      test: the same for the test split.
      word_pattern: for word level, the regex that :meth:`encode` splits text with
        (``None``: split on whitespace, for corpora that come tokenized).
    """

    name: str
    level: str
    vocab: tuple[str, ...]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    word_pattern: str | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode(self, ids) -> str:
        sep = "" if self.level == "char" else " "
        return sep.join(self.vocab[int(i)] for i in ids)

    def encode(self, text: str) -> np.ndarray:
        """Text -> ids; characters/words outside the vocabulary are an error (char) or ``<unk>`` (word).

        Word level: the text is split with ``word_pattern`` (literal ``<eos>``/``<unk>``
        are read as those tokens, so ``encode(decode(ids))`` gives back ``ids``) or on
        whitespace; line ends add no ``<eos>``.
        """
        index = {t: i for i, t in enumerate(self.vocab)}
        if self.level == "char":
            missing = sorted(set(text) - set(index))
            if missing:
                raise ValueError(f"characters not in the {self.name} vocabulary: {missing}")
            return np.array([index[ch] for ch in text], np.int32)
        if self.word_pattern is None:
            words = text.split()
        else:
            words = re.findall(f"{re.escape(EOS)}|{re.escape(UNK)}|{self.word_pattern}", text)
        return _word_ids(words, index)


def _char_dataset(name: str, train: str, valid: str, test: str) -> TextDataset:
    vocab = tuple(sorted(set(train) | set(valid) | set(test)))
    index = {ch: i for i, ch in enumerate(vocab)}

    def ids(text):
        return np.array([index[ch] for ch in text], np.int32)

    return TextDataset(name, "char", vocab, ids(train), ids(valid), ids(test))


def frequency_vocab(tokens: Iterable[str], max_size: int | None = None) -> tuple[str, ...]:
    """Frequency-ordered vocabulary of a training token stream.

    ``<eos>`` is id 0; then every type by descending count in ``tokens``, ties broken by
    first appearance. With ``max_size`` (``<eos>`` and ``<unk>`` included) only the
    ``max_size - 2`` most frequent types are kept and the others count as ``<unk>``.
    ``<unk>`` (which may also occur in ``tokens`` itself, as in WikiText) is placed by
    its count after that mapping (its first appearance: that of its first member); it is
    last, with count 0, if nothing maps to it. So the training counts of ids 1, 2, ...
    never increase.
    """
    if max_size is not None and max_size < 2:
        raise ValueError(f"a vocabulary needs room for {EOS} and {UNK}: max_size must be >= 2, got {max_size}")
    counts = collections.Counter(tokens)  # keys in order of first appearance
    counts.pop(EOS, None)
    first = {w: i for i, w in enumerate(counts)}
    words = sorted((w for w in counts if w != UNK), key=lambda w: (-counts[w], first[w]))
    cut = len(words) if max_size is None else max_size - 2
    unk_members = words[cut:] + ([UNK] if UNK in counts else [])
    key = {w: (-counts[w], first[w]) for w in words[:cut]}
    key[UNK] = (-sum(counts[w] for w in unk_members), min((first[w] for w in unk_members), default=len(first)))
    return (EOS,) + tuple(sorted(key, key=key.__getitem__))


def _word_ids(words: Iterable[str], index: dict[str, int]) -> np.ndarray:
    """Words -> int32 ids; words outside ``index`` become ``<unk>``."""
    unk = index[UNK]
    return np.fromiter((index.get(w, unk) for w in words), np.int32)


def word_tokens(text: str, pattern: str = WORD_PATTERN) -> Iterator[str]:
    """The pydoc_words tokenization: for each line (``str.splitlines``), its matches of
    ``pattern`` and then ``<eos>``; a blank line gives a lone ``<eos>``. Case is kept."""
    compiled = re.compile(pattern)
    for line in text.splitlines():
        yield from compiled.findall(line)
        yield EOS


def _split_points(n: int) -> tuple[int, int]:
    return int(n * PYDOC_FRACTIONS[0]), int(n * (PYDOC_FRACTIONS[0] + PYDOC_FRACTIONS[1]))


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_pydoc() -> TextDataset:
    """Character-level English text of ``pydoc_data.topics`` (ships with CPython, ~465k chars).

    Topics are joined in sorted order and split by position (90/5/5), so the split is
    the same everywhere for a given Python version.
    """
    text = _pydoc_text()
    a, b = _split_points(len(text))
    return _char_dataset("pydoc", text[:a], text[a:b], text[b:])


def load_pydoc_words(max_vocab: int = PYDOC_WORDS_VOCAB) -> TextDataset:
    """Word-level ``pydoc_data.topics``: the text of :func:`load_pydoc`, as word tokens.

    The whole text is tokenized by :func:`word_tokens` (words and single punctuation
    marks, case kept, ``<eos>`` after every line, a blank line a lone ``<eos>``) and the
    *token stream* is split by position, 90/5/5 (so the splits are disjoint and
    contiguous; valid may begin mid-line). The vocabulary comes from the training split
    only (:func:`frequency_vocab` with ``max_size=max_vocab``); other words are
    ``<unk>`` in every split. About 126k tokens; 4071 types in train.
    """
    tokens = list(word_tokens(_pydoc_text()))
    a, b = _split_points(len(tokens))
    vocab = frequency_vocab(tokens[:a], max_vocab)
    index = {w: i for i, w in enumerate(vocab)}
    train, valid, test = (_word_ids(part, index) for part in (tokens[:a], tokens[a:b], tokens[b:]))
    return TextDataset("pydoc_words", "word", vocab, train, valid, test, word_pattern=WORD_PATTERN)


def load_tiny_shakespeare(data_dir: str | None = None) -> TextDataset:
    """Character-level tiny_shakespeare through ``tfds.data_source`` (prepared beforehand)."""
    import tensorflow_datasets as tfds

    texts = {}
    for split, tfds_split in zip(SPLITS, ("train", "validation", "test"), strict=True):
        try:
            source = tfds.data_source("tiny_shakespeare", split=tfds_split, data_dir=data_dir, download=False)
            text = source[0]["text"]
        except Exception as err:  # TFDS raises several types for "not prepared"; all mean the same here.
            where = tfds_dir(data_dir)
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

    Each line ends with ``<eos>``. The vocabulary is every word of the training file (it
    already maps rare words to ``<unk>``, an ordinary word of it) in frequency order, as
    the official adaptive-softmax code has it: ``<eos>`` id 0, then the words by
    descending training count, ties by first appearance (:func:`frequency_vocab`).
    Words of valid/test outside the vocabulary become ``<unk>``.
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

    vocab = frequency_vocab(words(paths["train"]))
    index = {w: i for i, w in enumerate(vocab)}
    streams = {split: _word_ids(words(p), index) for split, p in paths.items()}
    return TextDataset("wikitext103", "word", vocab, streams["train"], streams["valid"], streams["test"])


def stream_windows(tokens: np.ndarray, batch_size: int, seq_len: int) -> int:
    """How many windows :func:`stream_batch` serves before it starts over (>= 1)."""
    windows = ((len(tokens) - 1) // batch_size) // seq_len
    if windows < 1:
        raise ValueError(
            f"{len(tokens)} tokens are too few for batch_size {batch_size} x seq_len {seq_len} (+1 for targets)"
        )
    return windows


def stream_batch(tokens: np.ndarray, step: int, batch_size: int, seq_len: int,
                 rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Window ``step`` of B contiguous streams: ``(inputs [B, T], targets [B, T])``, or of
    the streams ``rows`` only (one process's share; row k is always stream k).

    The stream is cut into B equal parts (the remainder dropped); window w covers
    positions ``[w T, (w + 1) T)`` of each part and the targets are the next tokens.
    Windows cycle over the parts, so ``step`` may grow without bound.
    """
    per_stream = (len(tokens) - 1) // batch_size
    start = (step % stream_windows(tokens, batch_size, seq_len)) * seq_len
    streams = np.arange(batch_size) if rows is None else np.asarray(rows)
    positions = streams[:, None] * per_stream + start + np.arange(seq_len)[None, :]
    return tokens[positions], tokens[positions + 1]


def eval_windows(tokens: np.ndarray, batch_size: int, seq_len: int, rows: np.ndarray | None = None):
    """Every next-token prediction of a stream exactly once: ``(inputs, targets, weights)``,
    each ``[B, T]`` (or the parts ``rows`` only).

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
    parts = np.arange(batch_size) if rows is None else np.asarray(rows)
    pos = parts[:, None] * per_part + np.arange(windows * seq_len)[None, :]  # [B, W T]
    part_end = np.minimum((parts[:, None] + 1) * per_part, targets_n)
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
    """Loads ``"pydoc"`` (embedded, characters), ``"pydoc_words"`` (embedded, words),
    ``"tiny_shakespeare"`` (TFDS, prepared in ``data_dir``) or ``"wikitext103"`` (token
    files in the folder ``data_dir``)."""
    if name == "pydoc":
        return load_pydoc()
    if name == "pydoc_words":
        return load_pydoc_words()
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
