"""Converters into FedJAX's SQLite format: from clients, flat arrays, LEAF JSON and TFF SQLite.

Every converter writes through `write_sqlite`: atomically, refusing to overwrite an existing
file unless `overwrite=True`, leaving nothing behind on error.

Text becomes what FedJAX stores for text: object arrays of UTF-8 `bytes` (`to_fedjax_arrays`).
"""

from __future__ import annotations

import lzma
import os
import shutil
from typing import Any, Mapping

import numpy as np

from fedjax_core import atomic
from fedjax_core.data.errors import DataFormatError
from fedjax_core.data.federated_data import ClientArrays
from fedjax_core.data.sqlite import write_sqlite
from fedjax_core.data.tff_sqlite import CIFAR100_SPEC, FeatureSpec, read_tff_sqlite

clients_to_sqlite = write_sqlite
"""`clients_to_sqlite(path, clients, *, overwrite=False, text_ids=False)`: see `write_sqlite`."""

TFF_CIFAR100_LZMA = ("https://storage.googleapis.com/tff-datasets-public/cifar100.sqlite.lzma",
                     153019920,
                     "23d3916c9caa33395737ee560cc7cb77bbd05fc7b73647ee7be3a7e764172939")
"""TFF's CIFAR-100 file: (url, size in bytes, sha256), as FedJAX checks it before converting."""

FEDJAX_CIFAR100_SQLITE = {
    "train": (140521472, "a4dc2f4ac4c9b6e7bd5234a1b568389384c00c903dcd34001c3cf50a4a81c713"),
    "test": (28135424, "74416c6ee8f41b1086f0e0e3c5289ac6df5a641100df48e8b583411a55de891f"),
}
"""(size, sha256) of FedJAX's conversion of each split. `tff_to_sqlite` issues the same SQL
with the same rows, so it should match these; the sha256 also covers the SQLite header, which
records the version of the SQLite library that wrote the file, so it can differ by that alone."""


def _text_to_bytes(key: str, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "U":
        flat = [s.encode("utf-8") for s in array.reshape(-1).tolist()]
    elif array.dtype.kind == "S":
        flat = array.reshape(-1).tolist()
    elif array.dtype.hasobject:
        flat = []
        for x in array.reshape(-1).tolist():
            if isinstance(x, str):
                x = x.encode("utf-8")
            elif not isinstance(x, bytes):
                raise ValueError(f"feature {key!r} holds a {type(x).__name__}; text features "
                                 "must hold str or bytes")
            flat.append(x)
    else:
        return array
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape)


def to_fedjax_arrays(arrays: Mapping[str, Any]) -> ClientArrays:
    """`{feature: array}` with text (str/unicode/fixed-bytes arrays) as object arrays of bytes.

    Numeric arrays pass through unchanged; `str` is encoded as UTF-8, as FedJAX stores text.

    Example:
      >>> to_fedjax_arrays({"x": np.array(["hé"])})["x"]
      array([b'h\\xc3\\xa9'], dtype=object)
    """
    return {key: _text_to_bytes(key, np.asarray(value)) for key, value in arrays.items()}


def arrays_to_sqlite(path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
                     client_of_example: np.ndarray, *, overwrite: bool = False) -> int:
    """Writes examples held as flat arrays, split into clients by `client_of_example`.

    Clients are written in sorted order of their label (`np.unique`), named `str(label)`; each
    client's examples keep their order in `arrays` (a stable grouping).

    Args:
      path: the `.sqlite` file to create.
      arrays: feature -> `[examples, ...]`, every feature with the same leading axis.
      client_of_example: `[examples]` client label (int or str) of each example.
      overwrite: replace an existing file.

    Returns:
      The number of clients written.

    Example:
      >>> arrays_to_sqlite("p.sqlite", {"x": np.arange(4.0)}, np.array([1, 0, 1, 0]))
      2                                            # client "0": x = [1., 3.]; "1": x = [0., 2.]
    """
    owners = np.asarray(client_of_example)
    if owners.ndim != 1:
        raise ValueError(f"client_of_example has shape {owners.shape}; give one label per example")
    if owners.dtype.kind not in "iuUSO":
        raise ValueError(f"client_of_example has dtype {owners.dtype}; give integer or str labels")
    arrays = to_fedjax_arrays(arrays)
    if not arrays:
        raise ValueError("arrays is empty; give at least one feature")
    for key, array in arrays.items():
        if array.ndim == 0 or array.shape[0] != owners.shape[0]:
            raise ValueError(f"feature {key!r} has shape {array.shape} but client_of_example has "
                             f"{owners.shape[0]} labels; every feature needs one row per example")
    if owners.dtype.kind == "O":
        owners = owners.astype(str)
    labels, inverse = np.unique(owners, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(labels)))[:-1]
    groups = np.split(order, bounds)

    def clients():
        for label, rows in zip(labels.tolist(), groups):
            name = label.decode("utf-8") if isinstance(label, bytes) else str(label)
            yield name, {key: array[rows] for key, array in arrays.items()}

    return write_sqlite(path, clients(), overwrite=overwrite)


def leaf_to_sqlite(leaf_path: str | os.PathLike, out_path: str | os.PathLike, *,
                   overwrite: bool = False) -> int:
    """Converts a LEAF JSON dataset (`users`, `num_samples`, `user_data`) to FedJAX's SQLite.

    Clients keep the order `load_leaf` gives them; text features become UTF-8 bytes.

    Returns:
      The number of clients written.
    """
    from fedjax_core.data.leaf import load_leaf  # noqa: PLC0415  (optional dependency on LEAF)

    data = load_leaf(leaf_path)
    clients = ((cid, to_fedjax_arrays(data.get_client(i))) for i, cid in enumerate(data.client_ids))
    return write_sqlite(out_path, clients, overwrite=overwrite)


def tff_to_sqlite(tff_path: str | os.PathLike, split: str, out_path: str | os.PathLike, *,
                  spec: FeatureSpec | None = CIFAR100_SPEC, overwrite: bool = False) -> int:
    """Converts one split of a TensorFlow Federated SQLite file (default: CIFAR-100) to FedJAX's.

    Does what FedJAX's `cifar100.load_split` does without TensorFlow: clients in sorted id order,
    ids kept as TEXT, features `coarse_label` int64 `[n]`, `image` uint8 `[n, 32, 32, 3]`,
    `label` int64 `[n]` (in that order). A `.lzma`/`.xz` input is decompressed first, to a
    temporary file next to `out_path` that is removed afterwards.

    Args:
      tff_path: TFF's `cifar100.sqlite` (or `cifar100.sqlite.lzma`).
      split: "train" or "test".
      out_path: the FedJAX `.sqlite` file to create.
      spec: feature shapes and dtypes; None infers them (see `read_tff_sqlite`).
      overwrite: replace an existing file.

    Returns:
      The number of clients written.
    """
    tff_path, out_path = os.fspath(tff_path), os.fspath(out_path)
    if os.path.exists(out_path) and not overwrite:
        raise FileExistsError(f"{out_path}: already exists; pass overwrite=True to replace it")
    if not tff_path.endswith((".lzma", ".xz")):
        return write_sqlite(out_path, read_tff_sqlite(tff_path, split, spec=spec),
                            overwrite=overwrite, text_ids=True)
    if not os.path.exists(tff_path):
        raise FileNotFoundError(f"{tff_path}: no such file; check the path or download it")
    directory = os.path.dirname(os.path.abspath(out_path))
    tmp = os.path.join(directory, atomic.temp_path(out_path).name + ".tff")
    try:
        try:
            with lzma.open(tff_path) as src, atomic.create(tmp) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (lzma.LZMAError, EOFError) as e:
            raise DataFormatError(f"{tff_path}: not a complete LZMA file ({e}); download it "
                                  "again") from None
        return write_sqlite(out_path, read_tff_sqlite(tmp, split, spec=spec),
                            overwrite=overwrite, text_ids=True)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
