"""FedJAX's Shakespeare table and preprocessing, against hand-computed labels."""

import numpy as np
import pytest

from fedjax_core.data import shakespeare as sh

# Label = 3 + position of the byte in the vocabulary string, counted by hand:
# 'D' 7 -> 10, 'C' 26 -> 29, 'B' 48 -> 51, 'A' 70 -> 73, 'E' 71 -> 74.
A, B, C, D, E = 73, 51, 29, 10, 74


def test_constants():
    assert (sh.PAD, sh.BOS, sh.EOS, sh.OOV, sh.VOCAB_SIZE) == (0, 1, 2, 89, 90)
    assert len(sh.VOCAB) == 86
    assert len(set(sh.VOCAB)) == 86  # no byte listed twice, so no "last one wins" case


@pytest.mark.parametrize("char, label", [
    ("d", 3), ("h", 4), ("x", 8), ("@", 9), ("D", 10), (" ", 16), ("$", 17), ("c", 23),
    ("C", 29), ("o", 26), ("G", 30), ("[", 35), ("b", 44), ("B", 51), ('"', 58), (".", 61),
    ("\n", 65), ("a", 66), ("e", 67), ("A", 73), ("E", 74), ("]", 80), ("9", 87), ("\r", 88),
])
def test_table_entries(char, label):
    assert sh.TABLE[ord(char)] == label


def test_table_shape_and_oov():
    assert sh.TABLE.shape == (256,) and sh.TABLE.dtype == np.int32
    assert np.sum(sh.TABLE != sh.OOV) == 86
    assert sorted(sh.TABLE[sh.TABLE != sh.OOV].tolist()) == list(range(3, 89))
    for byte in (b"\x00", b"\t", b"^", b"`", b"{", b"|", b"}", b"~", b"\x7f", b"\xff"):
        assert sh.TABLE[byte[0]] == sh.OOV, byte


def test_encode_utf8_bytes_are_oov():
    assert sh.encode("é").tolist() == [89, 89]  # 0xC3 0xA9
    assert sh.encode("—").tolist() == [89, 89, 89]
    assert sh.encode(b"dh\xff").tolist() == [3, 4, 89]
    assert sh.encode("da").tolist() == sh.encode(b"da").tolist() == [3, 66]
    assert sh.encode(b"").shape == (0,) and sh.encode(b"").dtype == np.int32


def test_decode_inverts_encode():
    text = b"dhlptx@DHLPTX $(,048\n\r"
    assert sh.decode(sh.encode(text)) == text
    assert sh.decode([sh.BOS, 3, sh.EOS, sh.PAD, sh.OOV]) == b"d?"


def test_preprocess_brief_example():
    out = sh.preprocess_client([b"ABCD", b"E"], sequence_length=3)
    BOS, EOS, PAD = 1, 2, 0
    assert out["x"].tolist() == [[BOS, A, B], [C, D, EOS], [BOS, E, PAD]]
    assert out["y"].tolist() == [[A, B, C], [D, EOS, BOS], [E, EOS, PAD]]
    assert out["x"].dtype == out["y"].dtype == np.int32


def test_preprocess_strings_equal_bytes():
    a = sh.preprocess_client(["ABCD", "E"], 3)
    b = sh.preprocess_client([b"ABCD", b"E"], 3)
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["y"], b["y"])


def test_preprocess_exact_multiple_has_no_padding_row():
    # joined = BOS A B C EOS (5); 4 inputs fill one row of 4 exactly.
    out = sh.preprocess_client([b"ABC"], 4)
    assert out["x"].tolist() == [[1, A, B, C]]
    assert out["y"].tolist() == [[A, B, C, 2]]


def test_preprocess_empty_snippet_and_one_long_row():
    out = sh.preprocess_client([b""], 80)  # BOS EOS -> one input, one target
    assert out["x"].shape == (1, 80)
    assert out["x"][0, :2].tolist() == [1, 0] and out["y"][0, :2].tolist() == [2, 0]
    assert not out["x"][0, 1:].any() and not out["y"][0, 1:].any()


def test_preprocess_client_without_snippets():
    out = sh.preprocess_client([], 5)
    assert out["x"].shape == out["y"].shape == (0, 5)
    assert out["x"].dtype == out["y"].dtype == np.int32


def test_preprocess_rejects_bad_length():
    with pytest.raises(ValueError, match="sequence_length"):
        sh.preprocess_client([b"a"], 0)
