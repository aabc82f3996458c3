"""Text data: pydoc split (characters and words), frequency-ordered vocabularies, WikiText-style
token files, tiny_shakespeare via mock_data, batching."""

import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from deq_jax.data import text


def test_pydoc_corpus_split_is_deterministic():
    a, b = text.load_pydoc(), text.load_pydoc()
    np.testing.assert_array_equal(a.valid, b.valid)
    assert a.level == "char" and 60 < a.vocab_size < 200
    n = len(a.train) + len(a.valid) + len(a.test)
    assert n > 300_000 and abs(len(a.train) / n - 0.9) < 1e-3
    # Split by position: decoding the three streams gives back the corpus in order.
    from pydoc_data.topics import topics

    corpus = "\n\n".join(topics[k] for k in sorted(topics))
    assert a.decode(a.train[:200]) == corpus[:200]
    assert a.decode(a.test[-100:]) == corpus[-100:]
    np.testing.assert_array_equal(a.encode(corpus[:50]), a.train[:50])


def test_wikitext_token_files(tmp_path):
    (tmp_path / "wiki.train.tokens").write_text(" = Valkyria = \n the game is a <unk> game \n")
    (tmp_path / "wiki.valid.tokens").write_text(" the new game \n")
    (tmp_path / "wiki.test.tokens").write_text(" = game = \n")
    ds = text.load_wikitext103(tmp_path)
    # Frequency order: <eos> first, then "=" and "game" (2 each; "=" appears first), then
    # the words seen once in order of first appearance, <unk> among them by its count.
    assert ds.vocab == ("<eos>", "=", "game", "Valkyria", "the", "is", "a", "<unk>") and ds.level == "word"
    assert ds.decode(ds.train) == "= Valkyria = <eos> the game is a <unk> game <eos>"
    assert ds.decode(ds.valid) == "the <unk> game <eos>"  # "new" is not in the training vocabulary
    assert ds.decode(ds.test) == "= game = <eos>"
    assert ds.train.dtype == ds.valid.dtype == np.int32
    (tmp_path / "wiki.test.tokens").unlink()
    with pytest.raises(FileNotFoundError, match="wiki.test.tokens"):
        text.load_wikitext103(tmp_path)


def test_tiny_shakespeare_with_mock_data():
    with tfds.testing.mock_data(num_examples=1, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = text.load_tiny_shakespeare(data_dir="/nonexistent")
    assert ds.level == "char" and len(ds.train) > 0 and ds.train.dtype == np.int32
    assert ds.train.max() < ds.vocab_size


def test_missing_tiny_shakespeare_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build tiny_shakespeare"):
        text.load_tiny_shakespeare(data_dir=str(tmp_path))


def test_stream_batches_are_contiguous_next_token_windows():
    tokens = np.arange(103, dtype=np.int32)
    x0, y0 = text.stream_batch(tokens, 0, batch_size=4, seq_len=5)
    x1, _ = text.stream_batch(tokens, 1, batch_size=4, seq_len=5)
    np.testing.assert_array_equal(y0, x0 + 1)  # targets are the next tokens
    np.testing.assert_array_equal(x0[:, 0], [0, 25, 50, 75])  # 4 streams of 25
    np.testing.assert_array_equal(x1[:, 0], x0[:, -1] + 1)  # window 1 continues window 0
    x5, _ = text.stream_batch(tokens, 5, batch_size=4, seq_len=5)
    np.testing.assert_array_equal(x5, x0)  # 5 windows per stream, then it cycles
    with pytest.raises(ValueError, match="too few"):
        text.stream_batch(tokens, 0, batch_size=50, seq_len=5)


@pytest.mark.parametrize("n, batch, seq_len", [(103, 4, 5), (50, 8, 16), (7, 4, 3)])
def test_eval_windows_score_every_prediction_exactly_once(n, batch, seq_len):
    tokens = np.arange(n, dtype=np.int32) * 3  # distinct tokens: a pair identifies a position
    seen = []
    for inputs, targets, weights in text.eval_windows(tokens, batch, seq_len):
        assert inputs.shape == targets.shape == weights.shape == (batch, seq_len)
        real = weights > 0
        np.testing.assert_array_equal(targets[real], inputs[real] + 3)  # next tokens
        seen.extend(inputs[real] // 3)
        # Within a row, real positions form one contiguous run from the window's start.
        for row in real:
            assert not np.any(row[1:] & ~row[:-1])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n - 1))


def test_unigram_baseline_is_the_smoothed_training_frequency_cross_entropy():
    ds = text.TextDataset("toy", "char", ("a", "b", "c"), train=np.array([0, 0, 0, 1], np.int32),
                          valid=np.array([0, 2], np.int32), test=np.array([1], np.int32))
    p = np.array([4, 2, 1]) / 7  # counts + 1
    expected = -(np.log2(p[0]) + np.log2(p[2])) / 2
    assert text.unigram_bits(ds, "valid") == pytest.approx(expected)


def test_load_text_names_and_missing_wikitext_folder():
    assert text.load_text("pydoc").name == "pydoc"
    assert "pydoc_words" in text.TEXT_DATA and text.load_text("pydoc_words").level == "word"
    with pytest.raises(FileNotFoundError, match="data.data_dir"):
        text.load_text("wikitext103", None)
    with pytest.raises(ValueError, match="unknown text data set"):
        text.load_text("ptb")


def _train_counts(ds):
    return np.bincount(ds.train, minlength=ds.vocab_size)


def test_wikitext_vocabulary_is_in_training_frequency_order(tmp_path):
    train = " <unk> b <unk> \n a b <unk> c \n\n c a <unk> \n"  # <unk> 4, <eos> 4, a/b/c 2 each
    (tmp_path / "wiki.train.tokens").write_text(train)
    (tmp_path / "wiki.valid.tokens").write_text(" c zebra \n")
    (tmp_path / "wiki.test.tokens").write_text(" a \n")
    ds = text.load_wikitext103(tmp_path)
    # <eos> is id 0 whatever its count; <unk> is an ordinary (here the most frequent) word;
    # ties keep the order of first appearance (b before a before c).
    assert ds.vocab == ("<eos>", "<unk>", "b", "a", "c")
    counts = _train_counts(ds)
    assert counts[0] == 4 and np.all(np.diff(counts[1:]) <= 0)
    np.testing.assert_array_equal(ds.valid, [4, 1, 0])  # "zebra" never occurs in train -> <unk>
    assert ds.decode(ds.valid) == "c <unk> <eos>"
    # Blank lines are a lone <eos>, as in the WikiText files.
    assert ds.decode(ds.train) == "<unk> b <unk> <eos> a b <unk> c <eos> <eos> c a <unk> <eos>"


def test_wikitext_without_unk_in_train_still_has_unk_last(tmp_path):
    for split, line in (("train", " x y y \n"), ("valid", " z y \n"), ("test", " x \n")):
        (tmp_path / f"wiki.{split}.tokens").write_text(line)
    ds = text.load_wikitext103(tmp_path)
    assert ds.vocab == ("<eos>", "y", "x", "<unk>")  # <unk> by its count: 0
    assert ds.decode(ds.valid) == "<unk> y <eos>"


def test_frequency_vocab_truncation_counts_rare_words_as_unk():
    tokens = "a b c a b a d e <eos> f".split()
    assert text.frequency_vocab(tokens) == ("<eos>", "a", "b", "c", "d", "e", "f", "<unk>")
    # Keep the 2 most frequent words; c, d, e, f (4 tokens) become <unk>, which outranks a (3).
    assert text.frequency_vocab(tokens, max_size=4) == ("<eos>", "<unk>", "a", "b")
    # Tie with a kept word: <unk> takes the first appearance of its first member ("c").
    assert text.frequency_vocab("a a b c".split(), max_size=3) == ("<eos>", "a", "<unk>")
    assert text.frequency_vocab("c a a b".split(), max_size=3) == ("<eos>", "<unk>", "a")
    assert text.frequency_vocab(iter(tokens), max_size=100) == text.frequency_vocab(tokens)  # any iterable
    with pytest.raises(ValueError, match="max_size must be >= 2"):
        text.frequency_vocab(tokens, max_size=1)


def test_word_tokenizer():
    toks = list(text.word_tokens('Call f(x, y_2)  -- "ok".\n\n  def __init__(self):'))
    assert toks == ["Call", "f", "(", "x", ",", "y_2", ")", "-", "-", '"', "ok", '"', ".", "<eos>",
                    "<eos>", "def", "__init__", "(", "self", ")", ":", "<eos>"]


@pytest.fixture(scope="module")
def pydoc_words():
    return text.load_pydoc_words()


def test_pydoc_words_splits_cover_the_corpus_in_order(pydoc_words):
    ds = pydoc_words
    assert ds.name == "pydoc_words" and ds.level == "word" and ds.vocab_size == text.PYDOC_WORDS_VOCAB
    assert all(getattr(ds, s).dtype == np.int32 for s in text.SPLITS)
    n = len(ds.train) + len(ds.valid) + len(ds.test)
    assert n > 100_000 and len(ds.train) == int(0.9 * n) and len(ds.train) + len(ds.valid) == int(0.95 * n)
    # Walk the raw corpus with the concatenated streams: every token is the next word or
    # punctuation mark (<unk>: any), every <eos> a line end, and nothing is left over.
    from pydoc_data.topics import topics

    corpus = "\n\n".join(topics[k] for k in sorted(topics))
    word = re.compile(r"\w+|[^\w\s]")
    space = re.compile(r"[^\S\n]*")
    pos = 0
    for tok in (ds.vocab[i] for s in text.SPLITS for i in getattr(ds, s)):
        pos = space.match(corpus, pos).end()
        if tok == "<eos>":
            assert corpus[pos] == "\n", pos
            pos += 1
        else:
            m = word.match(corpus, pos)
            assert m is not None and tok in (m.group(), "<unk>"), (pos, tok)
            pos = m.end()
    assert pos == len(corpus)
    assert ds.decode(ds.train[:8]) == 'The " assert " statement <eos> * *'


def test_pydoc_words_vocabulary(pydoc_words):
    ds = pydoc_words
    assert ds.vocab[0] == "<eos>" and len(set(ds.vocab)) == ds.vocab_size
    unk = ds.vocab.index("<unk>")
    counts = _train_counts(ds)
    assert counts[unk] > 0 and np.all(np.diff(counts[1:]) <= 0)  # <unk> sits by its training count
    assert all(getattr(ds, s).max() < ds.vocab_size for s in text.SPLITS)
    # Every word of the training split outside the vocabulary is <unk>: compare with the tokens.
    from pydoc_data.topics import topics

    tokens = list(text.word_tokens("\n\n".join(topics[k] for k in sorted(topics))))[: len(ds.train)]
    index = {w: i for i, w in enumerate(ds.vocab)}
    np.testing.assert_array_equal(ds.train, [index.get(w, unk) for w in tokens])
    rare = [w for w in tokens if w not in index]
    assert rare and len(rare) == counts[unk]
    for split in ("valid", "test"):
        assert 0 < np.mean(getattr(ds, split) == unk) < 0.05
    assert 2 < 2 ** text.unigram_bits(ds, "valid") < ds.vocab_size


def test_pydoc_words_encode_decode(pydoc_words):
    ds = pydoc_words
    ids = ds.encode('The "assert" statement is used in the function.')
    assert ds.decode(ids) == 'The " assert " statement is used in the function .'
    assert "<unk>" not in ds.decode(ids)
    np.testing.assert_array_equal(ds.encode(ds.decode(ids)), ids)
    np.testing.assert_array_equal(ds.encode(ds.decode(ds.valid[:500])), ds.valid[:500])  # <eos>, <unk> too
    assert ds.decode(ds.encode("the qwzxv word")) == "the <unk> word"


def test_pydoc_words_vocabulary_size_is_configurable():
    small, full = text.load_pydoc_words(max_vocab=100), text.load_pydoc_words(max_vocab=100_000)
    assert small.vocab_size == 100 and np.all(np.diff(_train_counts(small)[1:]) <= 0)
    # The same most frequent words, whatever the cut; here <unk> (all the rest) ranks high.
    assert [w for w in small.vocab if w != "<unk>"] == list(full.vocab[:99])
    assert full.vocab[-1] == "<unk>" and _train_counts(full)[-1] == 0  # nothing rare to map
