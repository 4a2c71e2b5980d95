"""FedJAX's Stack Overflow next-word preprocessing (host side, numpy, no TensorFlow).

Raw client arrays, as FedJAX's SQLite files decode them (all per post, `[n]`):
`tokens` (bytes, space-separated words), `type` (`b'question'` or `b'answer'`), and
`title`, `tags`, `score`, `creation_date`, which are dropped.

Token ids (FedJAX's `StackoverflowTokenizer` with a vocabulary of `V` words and one OOV
bucket):

    PAD = 0, BOS = 1, EOS = 2
    word i of the vocabulary (0-based, most frequent first)  ->  i + 3      (3 .. V + 2)
    any other word                                           ->  V + 3      (the OOV id)
    vocabulary size with the special ids                     =   V + 4      (10,004 for V = 10,000)

The default vocabulary is the first `V = 10,000` words of FedJAX's word-count file
(`stackoverflow.word_count`: one `word count` pair per line, most frequent first).

One post becomes one example of length `L` (`max_length`; FedJAX's STACKOVERFLOW_WORD
task uses 20 for training and evaluation; `EVAL_MAX_LENGTH = 30` is the default of its
`load_data` helper for evaluation splits):

    words = tokens.split(b' ')                  # exactly like tf.strings.split(sep=' '):
                                                # b'a  b' -> [b'a', b'', b'b'], b'' -> [b'']
    ids   = [id(w) for w in words]              # n ids
    x     = ([BOS] + ids)[:L], padded with PAD to L
    y     = (ids + [EOS])[:L], padded with PAD to L

so EOS survives only when `n < L`; a longer post keeps its first `L - 1` words in `x`, its
first `L` in `y`, and has no EOS (FedJAX's `truncation_rate` metric counts these).
`domain_id` is 1 for an answer, 0 for a question.

References:
  FedJAX, `fedjax/datasets/stackoverflow.py` (`preprocess_client`, `default_vocab`,
  `StackoverflowTokenizer.as_preprocess_batch`); TFF, `tff.simulation.datasets.stackoverflow`;
  Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
"""

import os
from typing import Iterable, Mapping, Sequence, cast

import numpy as np

PAD = 0
BOS = 1
EOS = 2
NUM_SPECIAL = 3
"""PAD, BOS and EOS come before the words."""
DEFAULT_VOCAB_SIZE = 10_000
NUM_OOV_BUCKETS = 1
TRAIN_MAX_LENGTH = 20
EVAL_MAX_LENGTH = 30
SPLITS = ("train", "held_out", "test")
URL_PREFIX = "https://storage.googleapis.com/gresearch/fedjax/stackoverflow/"
WORD_COUNT_FILE = "stackoverflow.word_count"

Vocab = dict[bytes, int]
"""UTF-8 encoded word -> token id (3 .. V + 2)."""


def _as_bytes(text: bytes | str) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def sqlite_file_name(split: str) -> str:
    """FedJAX's file name for a split, e.g. `stackoverflow_train.sqlite` (under `URL_PREFIX`)."""
    if split not in SPLITS:
        raise ValueError(f"Stack Overflow split must be one of {SPLITS}, got {split!r}")
    return f"stackoverflow_{split}.sqlite"


def parse_word_counts(lines: Iterable[str | bytes]) -> list[tuple[str, int]]:
    """Parses FedJAX's word-count file: one `word count` pair per line, in file order.

    Each line is split on whitespace and must give exactly two fields (FedJAX's
    `word, _ = line.split()`); blank lines are skipped.

    Args:
      lines: the file's lines (str, or bytes decoded as UTF-8).

    Returns:
      `[(word, count), ...]` in file order (most frequent first in FedJAX's file).

    Example:
      >>> parse_word_counts(["the 10\\n", "a 7\\n"])
      [('the', 10), ('a', 7)]
    """
    out = []
    for number, line in enumerate(lines, start=1):
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(f"word-count line {number}: expected 'word count', got {line!r}")
        out.append((fields[0], int(fields[1])))
    return out


def read_word_counts(path: str | os.PathLike) -> list[tuple[str, int]]:
    """`parse_word_counts` of a file on disk (e.g. FedJAX's `stackoverflow.word_count`)."""
    with open(path, encoding="utf-8") as f:
        return parse_word_counts(f)


def vocab_from_words(words: Sequence[str | bytes]) -> Vocab:
    """A vocabulary from an explicit word list: `words[i] -> i + 3`.

    Like FedJAX's `StackoverflowTokenizer(vocab=words)`: the list holds no special tokens.

    Args:
      words: distinct words, most frequent first by convention.

    Returns:
      A `Vocab` (keys UTF-8 encoded).

    Example:
      >>> vocab_from_words(["three", "four"])
      {b'three': 3, b'four': 4}
    """
    vocab: Vocab = {}
    for i, word in enumerate(words):
        key = _as_bytes(word)
        if key in vocab:
            raise ValueError(f"word {word!r} appears twice in the vocabulary")
        vocab[key] = i + NUM_SPECIAL
    return vocab


def build_vocab(word_counts: Mapping[str, int] | Iterable[tuple[str, int]],
                size: int = DEFAULT_VOCAB_SIZE) -> Vocab:
    """The `size` most frequent words -> ids `3 .. size + 2`.

    Words are ordered by count, largest first, ties kept in input order (a stable sort).
    FedJAX's file is already in that order, so this equals FedJAX's `default_vocab(size)`:
    its first `size` lines.

    Args:
      word_counts: `word -> count`, or `(word, count)` pairs (`parse_word_counts` output).
      size: `V`, the number of words kept.

    Returns:
      A `Vocab` of `min(size, number of words)` words.

    Example:
      >>> build_vocab([("a", 5), ("b", 9), ("c", 5)], size=2)
      {b'b': 3, b'a': 4}
    """
    if size < 0:
        raise ValueError(f"vocabulary size must be >= 0, got {size}")
    if isinstance(word_counts, Mapping):  # (pyright widens a Mapping that is also an Iterable)
        pairs = list(cast(Mapping[str, int], word_counts).items())
    else:
        pairs = list(word_counts)
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i][1])  # sorted() is stable
    return vocab_from_words([pairs[i][0] for i in order[:size]])


def oov_id(vocab: Vocab) -> int:
    """The OOV token id, `len(vocab) + 3` (10,003 for the default vocabulary)."""
    return len(vocab) + NUM_SPECIAL


def vocab_size(vocab: Vocab) -> int:
    """Number of token ids, `len(vocab) + 4`: PAD, BOS, EOS, the words, one OOV bucket."""
    return len(vocab) + NUM_SPECIAL + NUM_OOV_BUCKETS


def tokenize(tokens: bytes | str, vocab: Vocab, max_length: int = TRAIN_MAX_LENGTH
             ) -> tuple[np.ndarray, np.ndarray]:
    """One post -> `(x, y)`, each `int32 [max_length]` (rules in the module docstring).

    Example:
      >>> vocab = vocab_from_words(["three", "four", "five"])
      >>> x, y = tokenize(b"five three four five six", vocab, 5)
      >>> x.tolist(), y.tolist()
      ([1, 5, 3, 4, 5], [5, 3, 4, 5, 6])
    """
    out = preprocess_client({"tokens": [tokens]}, vocab, max_length)
    return out["x"][0], out["y"][0]


def preprocess_client(examples: Mapping[str, Sequence], vocab: Vocab,
                      max_length: int = TRAIN_MAX_LENGTH) -> dict[str, np.ndarray]:
    """One client's posts -> next-word examples, exactly as FedJAX tokenizes them.

    Args:
      examples: `{'tokens': [n] bytes (or str)}`, optionally `'type': [n]` (`b'question'`
        / `b'answer'`); other keys are dropped.
      vocab: from `build_vocab` / `vocab_from_words`; words outside it map to `oov_id(vocab)`.
      max_length: `L`.

    Returns:
      `{'x': int32 [n, L], 'y': int32 [n, L]}`, plus `'domain_id': int32 [n]`
      (1 = answer, 0 = question) when `examples` has `'type'`.

    Example:
      >>> vocab = vocab_from_words(["three", "four", "five"])
      >>> out = preprocess_client({"tokens": [b"three four five"], "type": [b"answer"]}, vocab, 5)
      >>> out["x"].tolist(), out["y"].tolist(), out["domain_id"].tolist()
      ([[1, 3, 4, 5, 0]], [[3, 4, 5, 2, 0]], [1])
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    length = max_length
    tokens = examples["tokens"]
    n = len(tokens)
    oov = oov_id(vocab)
    x = np.zeros((n, length), np.int32)
    y = np.zeros((n, length), np.int32)
    x[:, 0] = BOS
    get = vocab.get
    for row, text in enumerate(tokens):
        # Only the first `length` words can reach x or y; maxsplit leaves the rest in
        # one extra part, whose presence means the post has more than `length` words.
        parts = _as_bytes(text).split(b" ", length)
        words = len(parts)  # == number of words when <= length
        ids = [get(w, oov) for w in parts[:length]]
        k = min(words, length)
        y[row, :k] = ids
        if words < length:
            y[row, words] = EOS
        m = min(k, length - 1)
        x[row, 1:1 + m] = ids[:m]
    out = {"x": x, "y": y}
    if "type" in examples:
        out["domain_id"] = domain_ids(examples["type"])
    return out


def domain_ids(types: Sequence[bytes | str]) -> np.ndarray:
    """FedJAX's Stack Overflow domain: 1 for `b'answer'`, 0 otherwise, `int32 [n]`."""
    return np.array([_as_bytes(t) == b"answer" for t in types], np.int32)


__all__ = ["BOS", "DEFAULT_VOCAB_SIZE", "EOS", "EVAL_MAX_LENGTH", "NUM_OOV_BUCKETS", "PAD",
           "SPLITS", "TRAIN_MAX_LENGTH", "URL_PREFIX", "Vocab", "WORD_COUNT_FILE", "build_vocab",
           "domain_ids", "oov_id", "parse_word_counts", "preprocess_client", "read_word_counts",
           "sqlite_file_name", "tokenize", "vocab_from_words", "vocab_size"]
