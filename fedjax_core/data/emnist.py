"""FedJAX's federated EMNIST preprocessing (host side, numpy).

FedJAX's SQLite files (`federated_emnist_{train,test}.sqlite`, and the digits-only
`federated_emnist_digitsonly_{train,test}.sqlite`) hold, per client:

    pixels   float32 [n, 28, 28]   in [0, 1], white background = 1
    label    int32   [n]           0-9 digits, 10-35 'A'-'Z', 36-61 'a'-'z'

`preprocess_client` does what FedJAX's `preprocess_client` + `preprocess_batch` do together:

    x         = 1 - pixels[..., None]            float32 [n, 28, 28, 1], background 0
    y         = label                            int32 [n]
    domain_id = domain_id(client_id), repeated   int32 [n]   (only when a client id is given)

Digits only: FedJAX does not filter anything; `load_data(only_digits=True)` just opens the
other published files (`digitsonly_` prefix), whose labels are 0-9, and the models then
have 10 classes instead of 62. TFF documents those files as 3,383 writers with 341,873
train / 40,832 test examples, against 3,400 writers with 671,585 / 77,483 for the full
files. `preprocess_client(..., only_digits=True)` keeps the examples with label < 10,
which gives a 10-class task from the full files; nothing here checks that this equals
the published digits-only files example for example.

References:
  FedJAX, `fedjax/datasets/emnist.py` (`load_split`, `domain_id`, `preprocess_client`,
  `preprocess_batch`); Cohen et al., "EMNIST: Extending MNIST to handwritten letters", 2017;
  Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018.
"""

from typing import Mapping

import numpy as np

NUM_CLASSES = 62
"""Classes of the full task: 10 digits, 26 upper case, 26 lower case letters."""
NUM_DIGIT_CLASSES = 10
"""Classes of the digits-only task."""
HIGH_SCHOOL = 0
"""Domain id of writers 2100-2599 (NIST: Bethesda high school students)."""
CENSUS = 1
"""Domain id of every other writer (NIST: Census Bureau employees in Suitland)."""
SPLITS = ("train", "test")
URL_PREFIX = "https://storage.googleapis.com/gresearch/fedjax/emnist/"


def num_classes(only_digits: bool = False) -> int:
    """10 for the digits-only task, else 62."""
    return NUM_DIGIT_CLASSES if only_digits else NUM_CLASSES


def sqlite_file_name(split: str, only_digits: bool = False) -> str:
    """FedJAX's file name for a split, e.g. `federated_emnist_digitsonly_train.sqlite`.

    The file is published at `URL_PREFIX + sqlite_file_name(split, only_digits)`.

    Args:
      split: `'train'` or `'test'`.
      only_digits: the digits-only file instead of the 62-class one.

    Returns:
      The file name.
    """
    if split not in SPLITS:
        raise ValueError(f"EMNIST split must be one of {SPLITS}, got {split!r}")
    return f"federated_emnist_{'digitsonly_' if only_digits else ''}{split}.sqlite"


def domain_id(client_id: bytes | str) -> int:
    """FedJAX's EMNIST domain of a writer: 0 (high school) or 1 (census).

    The writer number `NNNN` is read from a client id `[16 hex digits]:fNNNN_MM` (25
    characters, FedJAX's SQLite files) or `fNNNN_MM` (8 characters); writers 2100 to 2599
    are `HIGH_SCHOOL` (0), all others `CENSUS` (1).

    Args:
      client_id: the client id, bytes (as stored) or str.

    Returns:
      0 or 1.

    Example:
      >>> domain_id(b"0123456789abcdef:f2100_07"), domain_id(b"f2600_00")
      (0, 1)
    """
    if len(client_id) == 25:
        writer = client_id[18:22]
    elif len(client_id) == 8:
        writer = client_id[1:5]
    else:
        raise ValueError(f"Invalid EMNIST client_id: {client_id!r}")
    try:
        number = int(writer)
    except ValueError:
        raise ValueError(f"Invalid EMNIST client_id: {client_id!r}") from None
    return HIGH_SCHOOL if 2100 <= number <= 2599 else CENSUS


def preprocess_client(examples: Mapping[str, np.ndarray],
                      client_id: bytes | str | None = None,
                      only_digits: bool = False) -> dict[str, np.ndarray]:
    """One client's raw EMNIST arrays -> model features, as FedJAX preprocesses them.

    `x = 1 - pixels[..., None]`, `y = label`, and `domain_id` when `client_id` is given.

    Args:
      examples: `{'pixels': [n, 28, 28] floats in [0, 1], 'label': [n] ints}` as decoded
        from FedJAX's SQLite files; other keys are dropped.
      client_id: the client's id; when given, `domain_id(client_id)` is attached to every
        example as `'domain_id'`.
      only_digits: keep only the examples with label < 10 (see the module docstring).

    Returns:
      `{'x': float32 [m, 28, 28, 1], 'y': int32 [m]}` (+ `'domain_id': int32 [m]`), `m = n`
      unless `only_digits` drops letters.

    Example:
      >>> out = preprocess_client({'pixels': np.ones((2, 28, 28)), 'label': np.array([3, 40])},
      ...                         client_id=b'f2222_01')
      >>> out['x'].shape, float(out['x'].max()), out['y'].tolist(), out['domain_id'].tolist()
      ((2, 28, 28, 1), 0.0, [3, 40], [0, 0])
    """
    pixels = np.asarray(examples["pixels"], np.float32)
    label = np.asarray(examples["label"]).astype(np.int32)
    if pixels.ndim != 3 or pixels.shape[0] != label.shape[0]:
        raise ValueError(f"EMNIST expects pixels [n, 28, 28] and label [n], got "
                         f"{pixels.shape} and {label.shape}")
    if only_digits:
        keep = label < NUM_DIGIT_CLASSES
        pixels, label = pixels[keep], label[keep]
    out = {"x": (np.float32(1.0) - pixels)[..., None], "y": label}
    if client_id is not None:
        out["domain_id"] = np.full(label.shape, domain_id(client_id), np.int32)
    return out


__all__ = ["CENSUS", "HIGH_SCHOOL", "NUM_CLASSES", "NUM_DIGIT_CLASSES", "SPLITS", "URL_PREFIX",
           "domain_id", "num_classes", "preprocess_client", "sqlite_file_name"]
