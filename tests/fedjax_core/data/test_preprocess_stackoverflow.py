"""FedJAX's Stack Overflow tokenizer, re-derived by hand on a 3-word vocabulary."""

import numpy as np
import pytest

from fedjax_core.data import stackoverflow as so

# vocab ["three", "four", "five"] -> ids 3, 4, 5; OOV = 3 + 3 = 6; PAD 0, BOS 1, EOS 2.
VOCAB = so.vocab_from_words(["three", "four", "five"])
EXAMPLES = {"tokens": np.array([b"three four five", b"five three four five six"], object)}


def test_special_ids_and_sizes():
    assert (so.PAD, so.BOS, so.EOS) == (0, 1, 2)
    assert VOCAB == {b"three": 3, b"four": 4, b"five": 5}
    assert so.oov_id(VOCAB) == 6 and so.vocab_size(VOCAB) == 7
    big = so.vocab_from_words([f"w{i}" for i in range(10_000)])
    assert so.oov_id(big) == 10_003 and so.vocab_size(big) == 10_004
    assert big[b"w0"] == 3 and big[b"w9999"] == 10_002


@pytest.mark.parametrize("length, x, y", [
    # Truncation only: x keeps BOS + 1 word, y the first 2 words, no EOS anywhere.
    (2, [[1, 3], [1, 5]], [[3, 4], [5, 3]]),
    # Row 0 (3 words) fits with its EOS; row 1 (5 words) loses EOS, x loses its last word.
    (5, [[1, 3, 4, 5, 0], [1, 5, 3, 4, 5]], [[3, 4, 5, 2, 0], [5, 3, 4, 5, 6]]),
    # Padding only.
    (7, [[1, 3, 4, 5, 0, 0, 0], [1, 5, 3, 4, 5, 6, 0]],
     [[3, 4, 5, 2, 0, 0, 0], [5, 3, 4, 5, 6, 2, 0]]),
])
def test_padding_and_truncation(length, x, y):
    out = so.preprocess_client(EXAMPLES, VOCAB, length)
    assert set(out) == {"x", "y"}
    assert out["x"].dtype == np.int32 and out["y"].dtype == np.int32
    assert out["x"].tolist() == x and out["y"].tolist() == y


@pytest.mark.parametrize("text, x, y", [
    (b"three four five", [1, 3, 4, 5], [3, 4, 5, 2]),   # n = L - 1: EOS survives
    (b"three four five three", [1, 3, 4, 5], [3, 4, 5, 3]),   # n = L: EOS cut
    (b"three seven five four three", [1, 3, 6, 5], [3, 6, 5, 4]),  # 'seven' is OOV
    (b"", [1, 6, 0, 0], [6, 2, 0, 0]),            # b''.split(b' ') == [b''] -> one OOV
    (b"three  four", [1, 3, 6, 4], [3, 6, 4, 2]),  # two spaces delimit an empty word
    ("four five", [1, 4, 5, 0], [4, 5, 2, 0]),     # str is UTF-8 encoded
])
def test_tokenize_by_hand(text, x, y):
    got_x, got_y = so.tokenize(text, VOCAB, 4)
    assert got_x.tolist() == x and got_y.tolist() == y


def test_max_length_one():
    out = so.preprocess_client({"tokens": [b"five", b"five four"]}, VOCAB, 1)
    assert out["x"].tolist() == [[1], [1]] and out["y"].tolist() == [[5], [5]]


def test_domain_id_and_dropped_features():
    out = so.preprocess_client(
        {"tokens": [b"this is a test", b"may it not fail"], "type": [b"answer", b"question"],
         "creation_date": [b"1970-01-01", b"2021-04-20"], "score": np.array([1, 2])},
        VOCAB, 3)
    assert set(out) == {"x", "y", "domain_id"}
    assert out["domain_id"].tolist() == [1, 0] and out["domain_id"].dtype == np.int32


def test_empty_client():
    out = so.preprocess_client({"tokens": np.array([], object), "type": []}, VOCAB, 20)
    assert out["x"].shape == (0, 20) and out["y"].shape == (0, 20)
    assert out["domain_id"].shape == (0,)


def test_word_counts_and_vocab():
    pairs = so.parse_word_counts(["the 30\n", b"a 7\n", "\n", "is 7\n", "zebra 9\n"])
    assert pairs == [("the", 30), ("a", 7), ("is", 7), ("zebra", 9)]
    # Most frequent first, ties in input order: the(30), zebra(9), a(7), is(7).
    assert so.build_vocab(pairs, size=3) == {b"the": 3, b"zebra": 4, b"a": 5}
    assert so.build_vocab(dict(pairs), size=10) == {b"the": 3, b"zebra": 4, b"a": 5, b"is": 6}
    # A file already in descending order gives its first `size` lines (FedJAX's default_vocab).
    assert list(so.build_vocab([("x", 3), ("y", 2), ("z", 1)], 2)) == [b"x", b"y"]
    with pytest.raises(ValueError):
        so.parse_word_counts(["one two three\n"])
    with pytest.raises(ValueError):
        so.vocab_from_words(["a", "b", "a"])


def test_read_word_counts(tmp_path):
    path = tmp_path / "stackoverflow.word_count"
    path.write_text("the 3\nof 2\n")
    assert so.read_word_counts(path) == [("the", 3), ("of", 2)]


def test_file_names():
    assert so.sqlite_file_name("held_out") == "stackoverflow_held_out.sqlite"
    with pytest.raises(ValueError):
        so.sqlite_file_name("valid")
