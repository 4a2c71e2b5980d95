"""FedJAX's Shakespeare character encoding and next-character preprocessing (host side, numpy).

Labels: `PAD = 0`, `BOS = 1`, `EOS = 2`, then the 86 bytes of `VOCAB` get `3 .. 88` in the
order written, and every other byte is `OOV = 89`; `VOCAB_SIZE = 90`. Text is UTF-8 encoded
before the lookup, so a non-ASCII character becomes one `OOV` per byte, as in FedJAX.

`preprocess_client` turns one client's snippets into fixed-length next-character examples:

    joined  = concat_s (BOS, encode(s), EOS)           over the client's snippets, in order
    x, y    = joined[:-1], joined[1:]
    P       = ceil((len(joined) - 1) / L) * L          both padded with PAD to length P
    x, y    = x.reshape(-1, L), y.reshape(-1, L)

References:
  FedJAX, `fedjax/datasets/shakespeare.py` (the table and the preprocessing);
  Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018 (the Shakespeare task).
"""

from typing import Sequence

import numpy as np

PAD = 0
BOS = 1
EOS = 2
VOCAB = (b'dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#\'/37;?bfjnrvzBFJNRVZ"&*.26:\n'
         b'aeimquyAEIMQUY]!%)-159\r')
"""The 86 in-vocabulary bytes, in label order (`VOCAB[i]` has label `i + 3`); no byte repeats."""
OOV = 3 + len(VOCAB)  # 89
VOCAB_SIZE = OOV + 1  # 90
DEFAULT_SEQUENCE_LENGTH = 80


def _make_table() -> np.ndarray:
    table = np.full(256, OOV, np.int32)
    # Assigned in order, so were a byte listed twice its last label would win; none is.
    for label, byte in enumerate(VOCAB, start=3):
        table[byte] = label
    return table


TABLE = _make_table()
"""`Int[ndarray, "256"]`: byte value -> label."""
TABLE.setflags(write=False)

assert len(VOCAB) == 86 and len(set(VOCAB)) == 86 and VOCAB_SIZE == 90


def _as_bytes(text: bytes | str) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def encode(text: bytes | str) -> np.ndarray:
    """Labels of the bytes of `text` (a `str` is UTF-8 encoded first).

    Args:
      text: bytes, or a string to UTF-8 encode.

    Returns:
      `Int[ndarray, "len(bytes)"]` int32 labels in `[3, 89]`.

    Example:
      >>> encode(b"dh\\xff")
      array([ 3,  4, 89], dtype=int32)
    """
    return TABLE[np.frombuffer(_as_bytes(text), np.uint8)]


def decode(labels: Sequence[int] | np.ndarray) -> bytes:
    """Inverse of `encode` for in-vocabulary labels; PAD/BOS/EOS are dropped, OOV becomes b'?'.

    Meant for printing model samples, not for round trips of arbitrary text.
    """
    out = bytearray()
    for label in np.asarray(labels, np.int64).reshape(-1):
        if 3 <= label < OOV:
            out.append(VOCAB[label - 3])
        elif label == OOV:
            out.extend(b"?")
    return bytes(out)


def preprocess_client(snippets: Sequence[bytes | str],
                      sequence_length: int = DEFAULT_SEQUENCE_LENGTH) -> dict[str, np.ndarray]:
    """One client's snippets -> next-character examples, exactly as FedJAX preprocesses Shakespeare.

    All snippets are joined into one label sequence, each as `BOS + encode(snippet) + EOS`;
    inputs are `joined[:-1]`, targets `joined[1:]`, both padded with PAD to a multiple of
    `sequence_length` and cut into rows.

    Args:
      snippets: the client's texts in order (bytes, or strings to UTF-8 encode).
      sequence_length: `L`, the length of each row.

    Returns:
      `{'x': Int[ndarray, "M L"], 'y': Int[ndarray, "M L"]}` int32, with
      `M = ceil((len(joined) - 1) / L)`; a client without snippets gives `M = 0`.

    Example (L = 3):
      >>> out = preprocess_client([b"ABCD", b"E"], 3)   # A,B,C,D,E -> 73,51,29,10,74
      >>> out["x"].tolist()
      [[1, 73, 51], [29, 10, 2], [1, 74, 0]]
      >>> out["y"].tolist()
      [[73, 51, 29], [10, 2, 1], [74, 2, 0]]
    """
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
    length = sequence_length
    if len(snippets) == 0:
        empty = np.zeros((0, length), np.int32)
        return {"x": empty, "y": empty.copy()}
    pieces: list[np.ndarray] = []
    bos, eos = np.array([BOS], np.int32), np.array([EOS], np.int32)
    for snippet in snippets:
        pieces += [bos, encode(snippet), eos]
    joined = np.concatenate(pieces)
    n = joined.shape[0] - 1  # >= 1: each snippet contributes at least BOS and EOS
    padded = -(-n // length) * length
    x = np.full(padded, PAD, np.int32)
    y = np.full(padded, PAD, np.int32)
    x[:n] = joined[:-1]
    y[:n] = joined[1:]
    return {"x": x.reshape(-1, length), "y": y.reshape(-1, length)}
