"""Text data: pydoc split, WikiText-style token files, tiny_shakespeare via mock_data, batching."""

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
    assert ds.vocab[:2] == ("<eos>", "<unk>") and ds.level == "word"
    assert ds.decode(ds.train) == "= Valkyria = <eos> the game is a <unk> game <eos>"
    assert ds.decode(ds.valid) == "the <unk> game <eos>"  # "new" is not in the training vocabulary
    assert ds.decode(ds.test) == "= game = <eos>"
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
    with pytest.raises(FileNotFoundError, match="data.data_dir"):
        text.load_text("wikitext103", None)
    with pytest.raises(ValueError, match="unknown text data set"):
        text.load_text("ptb")
