"""TensorFlow Federated's SQLite datasets, read without TensorFlow (host side, numpy).

TFF publishes datasets as `NAME.sqlite.lzma`; decompressed, a file holds

    examples(split_name TEXT, client_id TEXT, serialized_example_proto BLOB)   one row per example
    client_metadata(client_id TEXT, split_name TEXT, num_examples INTEGER)    one row per client

and each `serialized_example_proto` is a `tf.train.Example` protocol buffer. A split's clients
come in sorted order (TFF sorts its client ids, FedJAX's converter selects `ORDER BY
client_id`, the same order), and a client's examples in `rowid` order.

`tf.train.Example` on the wire (proto3, every length-delimited field a varint length + bytes):

    Example   { Features features = 1; }
    Features  { map<string, Feature> feature = 1; }  entries { string key = 1; Feature value = 2; }
    Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                             Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1 [packed]; }  little-endian float32, packed or one by one
    Int64List { repeated int64 value = 1 [packed]; }  varints (negatives take 10 bytes), likewise

TFF's CIFAR-100 stores `image` as an int64 list of 32*32*3 values (parsed by TFF and FedJAX with
`FixedLenFeature((32, 32, 3), tf.int64)` and cast to uint8) and `label`, `coarse_label` as
one int64 each; see `CIFAR100_SPEC`.

References:
  TFF, `tensorflow_federated/python/simulation/datasets/sql_client_data.py`, `cifar100.py`;
  FedJAX, `fedjax/core/sqlite_federated_data.py` (`TFFSQLiteClientsIterator`),
  `fedjax/datasets/cifar100.py`;
  https://protobuf.dev/programming-guides/encoding/ ;
  TensorFlow, `tensorflow/core/example/example.proto` and `feature.proto`.
"""

from __future__ import annotations

import math
import os
import sqlite3
import struct
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple

import numpy as np

from fedjax_core.data.errors import DataFormatError
from fedjax_core.data.federated_data import ClientArrays
from fedjax_core.data.sqlite import check_header

FeatureSpec = Mapping[str, tuple[np.dtype | type, tuple[int, ...]]]
"""feature name -> (dtype, shape of one example), like TF's `FixedLenFeature`s."""

CIFAR100_SPEC: FeatureSpec = {
    "coarse_label": (np.int64, ()),
    "image": (np.uint8, (32, 32, 3)),
    "label": (np.int64, ()),
}
"""TFF's CIFAR-100 features, as TFF and FedJAX parse them (image cast from int64 to uint8)."""

_EXAMPLES_COLUMNS = ("split_name", "client_id", "serialized_example_proto")
_METADATA_COLUMNS = ("client_id", "split_name", "num_examples")


class Feature(NamedTuple):
    """One decoded `tf.train.Feature`.

    Attributes:
      kind: "bytes", "float" or "int64"; None when no list is set.
      values: list of bytes, `float32[n]` or `int64[n]` (empty `float32` when `kind` is None).
    """

    kind: str | None
    values: list[bytes] | np.ndarray


class _Truncated(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Protocol buffer wire format.


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise DataFormatError("tf.train.Example: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
        if shift >= 70:
            raise DataFormatError("tf.train.Example: varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """`(field number, wire type, value)`: an int for varints, bytes otherwise."""
    pos = 0
    end = len(buf)
    while pos < end:
        tag, pos = _read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise DataFormatError("tf.train.Example: field number 0 is invalid")
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > end:
                raise DataFormatError("tf.train.Example: length-delimited field runs past the end")
            value = buf[pos:pos + length]
            pos += length
        elif wire == 5 or wire == 1:
            width = 4 if wire == 5 else 8
            if pos + width > end:
                raise DataFormatError("tf.train.Example: fixed-width field runs past the end")
            value = buf[pos:pos + width]
            pos += width
        else:
            raise DataFormatError(f"tf.train.Example: unsupported wire type {wire} "
                                  f"(field {number})")
        yield number, wire, value


def _blob(value: int | bytes) -> bytes:
    """The bytes of a `_fields` value whose wire type (2, 1 or 5) the caller has checked."""
    if isinstance(value, int):
        raise DataFormatError("tf.train.Example: a varint where bytes were expected")
    return value


def _varint(value: int | bytes) -> int:
    """The int of a `_fields` value whose wire type (0) the caller has checked."""
    if not isinstance(value, int):
        raise DataFormatError("tf.train.Example: bytes where a varint was expected")
    return value


def _packed_varints(buf: bytes) -> np.ndarray:
    """Decodes packed varints into int64 (two's complement), vectorized."""
    b = np.frombuffer(buf, np.uint8)
    if b.size == 0:
        return np.empty(0, np.int64)
    if b[-1] & 0x80:
        raise DataFormatError("tf.train.Example: packed int64 list ends inside a varint")
    more = b >= 0x80
    if not more.any():
        return b.astype(np.int64)
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 10:
        raise DataFormatError("tf.train.Example: varint longer than 10 bytes")
    position = np.arange(b.size) - np.repeat(starts, lengths)
    groups = (b & 0x7F).astype(np.uint64) << (7 * position).astype(np.uint64)
    return np.bitwise_or.reduceat(groups, starts).view(np.int64)


def _to_int64(u: int) -> int:
    return u - (1 << 64) if u >= (1 << 63) else u


def _parse_feature(buf: bytes, previous: Feature | None = None) -> Feature:
    kind = previous.kind if previous else None
    chunks: list = [previous.values] if previous and previous.kind else []
    for number, wire, value in _fields(buf):
        if number not in (1, 2, 3) or wire != 2:
            continue  # unknown field: skipped, as protobuf does
        new_kind = ("bytes", "float", "int64")[number - 1]
        if new_kind != kind:  # a oneof: setting another member clears the previous one
            kind, chunks = new_kind, []
        for n, w, v in _fields(_blob(value)):
            if n != 1:
                continue
            if kind == "bytes":
                if w != 2:
                    raise DataFormatError("tf.train.Example: bytes_list value is not bytes")
                chunks.append([_blob(v)])
            elif kind == "float":
                if w == 2:
                    v = _blob(v)
                    if len(v) % 4:
                        raise DataFormatError("tf.train.Example: packed float list length "
                                              f"{len(v)} is not a multiple of 4")
                    chunks.append(np.frombuffer(v, "<f4").astype(np.float32))
                elif w == 5:
                    chunks.append(np.array(struct.unpack("<f", _blob(v)), np.float32))
                else:
                    raise DataFormatError(f"tf.train.Example: float_list value has wire type {w}")
            else:
                if w == 2:
                    chunks.append(_packed_varints(_blob(v)))
                elif w == 0:
                    chunks.append(np.array([_to_int64(_varint(v))], np.int64))
                else:
                    raise DataFormatError(f"tf.train.Example: int64_list value has wire type {w}")
    if kind is None:
        return Feature(None, np.empty(0, np.float32))
    if kind == "bytes":
        return Feature(kind, [b for chunk in chunks for b in chunk])
    dtype = np.float32 if kind == "float" else np.int64
    values = np.concatenate(chunks) if chunks else np.empty(0, dtype)
    return Feature(kind, values.astype(dtype, copy=False))


def parse_example(serialized: bytes) -> dict[str, Feature]:
    """Decodes one serialized `tf.train.Example` into `{name: Feature}`.

    Follows protobuf's rules: unknown fields are skipped, a repeated map key keeps its last
    value, a message field given twice is merged.

    Raises:
      DataFormatError: the bytes are not a well-formed `tf.train.Example`.

    Example:
      >>> parse_example(b"\\n\\x0e\\n\\x0c\\n\\x01y\\x12\\x07\\x1a\\x05\\n\\x03\\x01\\x02\\x03")
      {'y': Feature(kind='int64', values=array([1, 2, 3]))}
    """
    serialized = bytes(serialized)
    features: dict[str, Feature] = {}
    for number, wire, value in _fields(serialized):
        if number != 1 or wire != 2:
            continue
        for n, w, entry in _fields(_blob(value)):
            if n != 1 or w != 2:
                continue
            key = b""
            feature: Feature | None = None
            for en, ew, ev in _fields(_blob(entry)):
                if en == 1 and ew == 2:
                    key = _blob(ev)
                elif en == 2 and ew == 2:
                    feature = _parse_feature(_blob(ev), feature)
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError:
                raise DataFormatError(f"tf.train.Example: feature name {key!r} is not UTF-8"
                                      ) from None
            if feature is None:  # an entry without a value holds the default (empty) Feature
                feature = Feature(None, np.empty(0, np.float32))
            features[name] = feature
    return features


# ---------------------------------------------------------------------------------------------
# Stacking a client's examples.


def _stack_with_spec(examples: list[dict[str, Feature]], spec: FeatureSpec) -> ClientArrays:
    arrays: ClientArrays = {}
    for name in sorted(spec):
        dtype, shape = np.dtype(spec[name][0]), tuple(spec[name][1])
        size = math.prod(shape)
        flats = []
        for i, example in enumerate(examples):
            feature = example.get(name)
            if feature is None:
                raise DataFormatError(f"example {i} lacks feature {name!r}")
            values = feature.values
            expected = "bytes" if dtype.kind == "O" else ("float" if dtype.kind == "f" else "int64")
            if dtype == np.uint8 and feature.kind == "bytes" and len(values) == 1 \
                    and len(values[0]) == size:
                values = np.frombuffer(values[0], np.uint8)  # raw pixel bytes
            elif feature.kind not in (expected, None):
                raise DataFormatError(f"example {i}: feature {name!r} is a {feature.kind} list, "
                                      f"expected a {expected} list for dtype {dtype}")
            if len(values) != size:
                raise DataFormatError(f"example {i}: feature {name!r} has {len(values)} values, "
                                      f"expected {size} for shape {list(shape)}")
            flats.append(values)
        if dtype.kind == "O":
            stacked = np.empty(len(examples) * size, dtype=object)
            stacked[:] = [b for flat in flats for b in flat]
        else:
            stacked = np.concatenate(flats) if flats else np.empty(0, np.int64)
            if dtype.kind in "iu" and stacked.size:
                info = np.iinfo(dtype)
                lo, hi = stacked.min(), stacked.max()
                if lo < info.min or hi > info.max:
                    raise DataFormatError(f"feature {name!r} has values in [{lo}, {hi}], outside "
                                          f"{dtype}'s range")
            stacked = stacked.astype(dtype)
        arrays[name] = stacked.reshape((len(examples),) + shape)
    return arrays


def _stack_inferred(examples: list[dict[str, Feature]]) -> ClientArrays:
    if not examples:
        return {}
    names = sorted(examples[0])
    arrays: ClientArrays = {}
    for name in names:
        kinds, flats = set(), []
        for i, example in enumerate(examples):
            feature = example.get(name)
            if feature is None:
                raise DataFormatError(f"example {i} lacks feature {name!r}, which example 0 has; "
                                      "pass a spec")
            kinds.add(feature.kind)
            flats.append(feature.values)
        kinds.discard(None)
        if len(kinds) > 1:
            raise DataFormatError(f"feature {name!r} mixes {sorted(kinds)} lists")
        kind = kinds.pop() if kinds else "float"
        lengths = {len(f) for f in flats}
        if len(lengths) != 1:
            raise DataFormatError(f"feature {name!r} has examples of lengths {sorted(lengths)}; "
                                  "pass a spec with its fixed shape")
        length = lengths.pop()
        if kind == "bytes":
            stacked = np.empty(len(examples) * length, dtype=object)
            stacked[:] = [b for flat in flats for b in flat]
        else:
            stacked = np.concatenate(flats).astype(np.float32 if kind == "float" else np.int64)
        arrays[name] = stacked.reshape((len(examples),) if length == 1 else (len(examples), length))
    return arrays


# ---------------------------------------------------------------------------------------------
# The file.


def _columns(connection: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in connection.execute(f"PRAGMA table_info({table})")]


def read_tff_sqlite(path: str | os.PathLike, split: str, *,
                    spec: FeatureSpec | None = None) -> Iterator[tuple[str, ClientArrays]]:
    """`(client id, {feature: array})` for every client of `split` in a TFF SQLite file, lazily.

    Clients come in sorted id order, examples in stored order; features in sorted name order
    (as `tf.io.parse_example` returns them). With `spec`, each feature is checked and shaped to
    `(examples, *shape)` and cast (integers range-checked) to its dtype, as TF's
    `FixedLenFeature` does; features outside `spec` are dropped. Without it, int64 lists become
    int64, float lists float32, bytes lists object arrays of bytes, of shape `(examples,)` when
    every example has one value and `(examples, length)` otherwise.

    Args:
      path: a decompressed TFF `.sqlite` file (e.g. from `cifar100.sqlite.lzma`).
      split: the `split_name` to read ("train", "test", ...).
      spec: optional fixed shapes and dtypes, e.g. `CIFAR100_SPEC`.

    Raises:
      FileNotFoundError: no file at `path`.
      DataFormatError: not a TFF SQLite file or no such split (raised by this call); a
        malformed or inconsistent client (raised while iterating).

    Example:
      >>> for cid, arrays in read_tff_sqlite("cifar100.sqlite", "test", spec=CIFAR100_SPEC):
      ...     print(cid, arrays["image"].shape)   # 0 (100, 32, 32, 3)
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file; check the path or download it")
    check_header(path)
    with _connect(path) as connection:  # check the file and the split now, not on first use
        sizes = _split_sizes(connection, path, split)
    return _clients(path, split, spec, sizes)


class _connect:  # noqa: N801  (used as a function)
    """A read-only connection; sqlite errors become one-line DataFormatErrors."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.connection = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
        except sqlite3.Error as e:
            raise DataFormatError(f"{path}: cannot open as SQLite ({e})") from None

    def __enter__(self) -> sqlite3.Connection:
        return self.connection

    def __exit__(self, kind, error, traceback) -> None:
        self.connection.close()
        if isinstance(error, sqlite3.Error):
            raise DataFormatError(f"{self.path}: corrupt SQLite file (sqlite: {error}); download "
                                  "and decompress it again") from None


def _split_sizes(connection: sqlite3.Connection, path: str, split: str) -> dict:
    tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not {"examples", "client_metadata"} <= tables:
        hint = ("it is already in FedJAX's format, open it with SQLiteFederatedData"
                if "federated_data" in tables else "not a TensorFlow Federated SQLite file")
        raise DataFormatError(f"{path}: no tables examples and client_metadata "
                              f"(tables: {sorted(tables)}); {hint}")
    for table, needed in (("examples", _EXAMPLES_COLUMNS), ("client_metadata", _METADATA_COLUMNS)):
        columns = _columns(connection, table)
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataFormatError(f"{path}: table {table} has columns {columns} but lacks "
                                  f"{missing}; not a TensorFlow Federated SQLite file")
    rows = connection.execute(
        "SELECT client_id, num_examples FROM client_metadata WHERE split_name = ?",
        (split,)).fetchall()
    if not rows:
        splits = sorted(r[0] for r in connection.execute(
            "SELECT DISTINCT split_name FROM client_metadata"))
        raise DataFormatError(f"{path}: no clients in split {split!r}; the file has splits "
                              f"{splits}")
    sizes: dict = {}
    for cid, n in rows:
        sizes[cid] = sizes.get(cid, 0) + n
    return sizes


def _clients(path: str, split: str, spec: FeatureSpec | None,
             sizes: dict) -> Iterator[tuple[str, ClientArrays]]:
    with _connect(path) as connection:
        for cid in sorted(sizes, key=lambda c: (type(c).__name__, c)):
            blobs = [r[0] for r in connection.execute(
                "SELECT serialized_example_proto FROM examples WHERE split_name = ? AND "
                "client_id = ? ORDER BY rowid", (split, cid))]
            name = cid if isinstance(cid, str) else (
                cid.decode("utf-8", errors="backslashreplace") if isinstance(cid, bytes)
                else str(cid))
            if len(blobs) != sizes[cid]:
                raise DataFormatError(f"{path}: split {split!r} client {name!r} has {len(blobs)} "
                                      f"examples but client_metadata says {sizes[cid]}; the file "
                                      "is inconsistent, download it again")
            try:
                examples = [parse_example(b) for b in blobs]
                arrays = (_stack_with_spec(examples, spec) if spec is not None
                          else _stack_inferred(examples))
            except DataFormatError as e:
                raise DataFormatError(f"{path}: split {split!r} client {name!r}: {e}") from None
            yield name, arrays
