"""FedJAX's SQLite federated dataset format, read and written byte-compatibly (host side, numpy).

A file holds one table, created by FedJAX's `SQLiteFederatedDataBuilder` with exactly

    CREATE TABLE federated_data (
        client_id BLOB NOT NULL PRIMARY KEY,
        data BLOB NOT NULL,
        num_examples INTEGER NOT NULL );

one row per client, in insertion (`rowid`) order, which is the order FedJAX lists clients in.
`client_id` is usually a BLOB (FedJAX's client ids are `bytes`), but FedJAX's own conversion of
TFF's CIFAR-100 stores TEXT; both are read, and exposed here as `str` (UTF-8).

A client's `data` is

    data  = zlib.compress(msgpack.packb({feature: ext(array), ...}, use_bin_type=True))
    ext(a) = ExtType(1, packb((a.shape, a.dtype.name, a.tobytes("C"))))   numeric arrays
    ext(a) = ExtType(4, packb((a.shape, [bytes, ...])))                   object arrays of bytes

with zlib's default level (6), the features in the dict's own order (not sorted), dtype names
as numpy writes them (`"float32"`, `"int64"`, `"bfloat16"`) and native (little-endian) bytes.
Encoding the arrays FedJAX decodes from its files gives back the stored blobs bit for bit, and
`write_sqlite` issues the same SQL in the same transactions, so a file it writes from the same
clients equals FedJAX's, page for page (the SQLite library version is in the file header).

Nothing is unpickled: only msgpack maps, arrays, strings, integers and bytes are decoded.

References:
  FedJAX, `fedjax/core/sqlite_federated_data.py` and `fedjax/core/serialization.py`.
"""

from __future__ import annotations

import collections
import math
import operator
import os
import sqlite3
import threading
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, cast

import msgpack
import numpy as np

from fedjax_core import atomic
from fedjax_core.data import index_cache as _index_cache
from fedjax_core.data.errors import DataFormatError
from fedjax_core.data.federated_data import ClientArrays

EXT_NDARRAY = 1
"""msgpack ExtType code of a numeric array: payload `packb((shape, dtype name, C-order bytes))`."""
EXT_BYTES_NDARRAY = 4
"""msgpack ExtType code of an object array of bytes: payload `packb((shape, [bytes, ...]))`."""

CREATE_TABLE = ("CREATE TABLE federated_data (\n"
                "    client_id BLOB NOT NULL PRIMARY KEY,\n"
                "    data BLOB NOT NULL,\n"
                "    num_examples INTEGER NOT NULL )")
"""The table definition, character for character as FedJAX's builder creates it."""

MAX_CLIENT_BYTES = 256 * 2**20
"""The most bytes one client's `data` blob may decompress to (256 MiB), decoded or refused.

A blob's msgpack headers declare the size of every feature; decoding reads no more than they
declare (`zlib.decompressobj().decompress(data, max_length)`, never an unbounded
`zlib.decompress`) and refuses a blob that declares more than this, so a crafted file (a
"decompression bomb": zlib's ratio reaches about 1000:1) costs at most this much memory. The
largest client of FedJAX's published files decodes to a few MB (an EMNIST writer: under 2 MB).
Decoding a client takes about three times its decompressed size at its peak. Set
`fedjax_core.data.sqlite.MAX_CLIENT_BYTES` to read a file of larger clients.
"""
_MAX_UNDECLARED = 2**20
"""A blob that is not a map of encoded arrays is an error; this much of it is decompressed to
say which error (msgpack's message)."""
MAX_FEATURES = 1024
"""The most features one client's blob may declare; a real client has a handful."""

_COLUMNS = ("client_id", "data", "num_examples")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_NUMERIC_KINDS = frozenset("biufc")
_FEDJAX_EXT_NAMES = {2: "a complex scalar", 3: "a numpy scalar"}


class _BlobError(Exception):
    """What is wrong with one blob; the caller adds the file and the client to the message."""


# ---------------------------------------------------------------------------------------------
# One client's blob.


def _dtype_from_name(name: str) -> np.dtype:
    if name == "bfloat16":
        try:
            import ml_dtypes  # noqa: PLC0415  (comes with jax)
        except ImportError as e:  # pragma: no cover - jax always brings ml_dtypes
            raise _BlobError("dtype bfloat16 needs the ml_dtypes package (install jax)") from e
        return np.dtype(ml_dtypes.bfloat16)
    try:
        dtype = np.dtype(name)
    except TypeError as e:
        raise _BlobError(f"unknown dtype name {name!r}") from e
    if dtype.kind not in _NUMERIC_KINDS:
        raise _BlobError(f"dtype {name!r} is not numeric")
    return dtype


def _check_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _BlobError(f"array shape {shape!r} is not a list of non-negative integers")
    return tuple(shape)


def _unpack_payload(payload: bytes, what: str) -> list:
    try:
        value = msgpack.unpackb(payload, raw=True)
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise _BlobError(f"{what} payload is not msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(value, list):
        raise _BlobError(f"{what} payload is a {type(value).__name__}, not a list")
    return value


def _array_from_ext(code: int, payload: bytes) -> np.ndarray:
    if code == EXT_NDARRAY:
        value = _unpack_payload(payload, "numeric array")
        if len(value) != 3 or not isinstance(value[1], bytes) or not isinstance(value[2], bytes):
            raise _BlobError("numeric array payload is not (shape, dtype name, bytes)")
        shape = _check_shape(value[0])
        try:
            name = value[1].decode("ascii")
        except UnicodeDecodeError:
            raise _BlobError(f"dtype name {value[1]!r} is not ASCII") from None
        dtype = _dtype_from_name(name)
        buffer = value[2]
        expected = math.prod(shape) * dtype.itemsize
        if len(buffer) != expected:
            raise _BlobError(f"array of shape {list(shape)} and dtype {name} needs {expected} "
                             f"bytes but {len(buffer)} are stored")
        try:
            return np.frombuffer(buffer, dtype=dtype).reshape(shape)
        except ValueError as e:  # e.g. more than numpy's 64 dimensions
            raise _BlobError(f"array of shape {list(shape)}: {e}") from None
    if code == EXT_BYTES_NDARRAY:
        value = _unpack_payload(payload, "bytes array")
        if len(value) != 2 or not isinstance(value[1], list):
            raise _BlobError("bytes array payload is not (shape, list of bytes)")
        shape = _check_shape(value[0])
        flat = value[1]
        if len(flat) != math.prod(shape):
            raise _BlobError(f"bytes array of shape {list(shape)} holds {len(flat)} elements")
        if not all(isinstance(b, bytes) for b in flat):
            raise _BlobError("bytes array holds elements that are not bytes")
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        try:
            return array.reshape(shape)
        except ValueError as e:
            raise _BlobError(f"bytes array of shape {list(shape)}: {e}") from None
    if code in _FEDJAX_EXT_NAMES:
        raise _BlobError(f"msgpack ExtType {code} ({_FEDJAX_EXT_NAMES[code]}) is not a client "
                         "array; every feature must be an array with a leading examples axis")
    raise _BlobError(f"unknown msgpack ExtType {code}; FedJAX stores arrays as ExtType "
                     f"{EXT_NDARRAY} (numeric) or {EXT_BYTES_NDARRAY} (bytes)")


class _Inflater:
    """Decompresses a zlib stream on demand, never more than asked for."""

    def __init__(self, blob: bytes):
        self._d = zlib.decompressobj()
        self._tail = blob
        self.size = 0

    def read(self, n: int) -> bytes:
        """Up to `n` more bytes of output (fewer only where the stream ends or is cut short)."""
        pieces = []
        try:
            while n > 0 and not self._d.eof:
                piece = self._d.decompress(self._tail, n)
                self._tail = self._d.unconsumed_tail
                if not piece:
                    break
                pieces.append(piece)
                n -= len(piece)
        except zlib.error as e:
            raise _BlobError(f"data blob is not zlib-compressed ({e})") from None
        out = b"".join(pieces)
        self.size += len(out)
        return out

    def check_end(self) -> None:
        if not self._d.eof:
            raise _BlobError("data blob is not zlib-compressed (incomplete or truncated stream)")


def _too_big(size: int) -> _BlobError:
    return _BlobError(f"data blob declares {size} bytes once decompressed, more than the "
                      f"{MAX_CLIENT_BYTES} bytes (MAX_CLIENT_BYTES) a client may hold")


# msgpack type bytes -> how many bytes of length follow (the headers the walk below reads).
_MAP_LENGTH = {0xde: 2, 0xdf: 4}
_KEY_LENGTH = {0xd9: 1, 0xda: 2, 0xdb: 4, 0xc4: 1, 0xc5: 2, 0xc6: 4}
_EXT_LENGTH = {0xc7: 1, 0xc8: 2, 0xc9: 4}
_FIXEXT_SIZE = {0xd4: 1, 0xd5: 2, 0xd6: 4, 0xd7: 8, 0xd8: 16}


def _inflate(blob: bytes) -> bytes:
    """The decompressed blob, reading no more than its msgpack headers declare.

    A blob holds a map of `name -> ExtType`; the walk reads each header, checks the declared
    total against `MAX_CLIENT_BYTES` before decompressing the bytes it announces, and so never
    holds more than the blob declares. Anything else (not such a map) is decompressed up to
    `MAX_CLIENT_BYTES` and left to msgpack's own errors.
    """
    z = _Inflater(blob)
    out = bytearray()

    def take(n: int) -> bytes:
        if z.size + n > MAX_CLIENT_BYTES:
            raise _too_big(z.size + n)
        got = z.read(n)
        out.extend(got)
        return got

    def length(t: int, table: dict[int, int]) -> int | None:
        width = table[t]
        raw = take(width)
        return int.from_bytes(raw, "big") if len(raw) == width else None

    def walk() -> bool:
        """Reads the whole map; False where the blob is not a map of ExtTypes (or is cut)."""
        head = take(1)
        if not head:
            return False
        t = head[0]
        if 0x80 <= t <= 0x8f:
            count: int | None = t & 0x0f
        elif t in _MAP_LENGTH:
            count = length(t, _MAP_LENGTH)
        else:
            return False
        if count is None:
            return False
        if count > MAX_FEATURES:
            raise _BlobError(f"data blob declares {count} features; at most {MAX_FEATURES}")
        for _ in range(count):
            for table, fixed in ((_KEY_LENGTH, None), (_EXT_LENGTH, _FIXEXT_SIZE)):
                head = take(1)
                if not head:
                    return False
                t = head[0]
                if table is _KEY_LENGTH and 0xa0 <= t <= 0xbf:
                    size: int | None = t & 0x1f
                elif t in table:
                    size = length(t, table)
                elif fixed is not None and t in fixed:
                    size = fixed[t]
                else:
                    return False
                if size is None:
                    return False
                body = size + (1 if table is _EXT_LENGTH else 0)  # an ExtType's type code
                if len(take(body)) != body:
                    return False
        return True

    if walk():
        if z.read(1):
            raise _BlobError("data blob holds bytes after its map of features")
        z.check_end()
    else:  # not the format FedJAX writes, so an error: msgpack says which, from a bounded part
        out.extend(z.read(_MAX_UNDECLARED - z.size + 1))
        if z.size > _MAX_UNDECLARED:
            raise _BlobError("data blob is not a msgpack map of feature name -> encoded array "
                             "(FedJAX's format)")
        z.check_end()
    return bytes(out)


def _decode(blob: bytes) -> ClientArrays:
    if not isinstance(blob, bytes):
        raise _BlobError(f"data is stored as {type(blob).__name__}, not a BLOB")
    raw = _inflate(blob)
    try:
        value = msgpack.unpackb(raw, raw=False)
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise _BlobError(f"data blob is not msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise _BlobError(f"data blob holds a {type(value).__name__}, not a dict of arrays")
    arrays: ClientArrays = {}
    for key, ext in value.items():
        if isinstance(key, bytes):
            try:
                key = key.decode("utf-8")
            except UnicodeDecodeError:
                raise _BlobError(f"feature name {key!r} is not UTF-8") from None
        if not isinstance(key, str):
            raise _BlobError(f"feature name {key!r} is not a string")
        if not isinstance(ext, msgpack.ExtType):
            raise _BlobError(f"feature {key!r} is a {type(ext).__name__}, not an encoded array")
        try:
            arrays[key] = _array_from_ext(ext.code, ext.data)
        except _BlobError as e:
            raise _BlobError(f"feature {key!r}: {e}") from None
    return arrays


def _num_examples(arrays: Mapping[str, np.ndarray]) -> int:
    """The shared leading axis of `arrays`, or `_BlobError` naming what disagrees."""
    if not arrays:
        raise _BlobError("no features")
    lengths = {}
    for key, array in arrays.items():
        if array.ndim == 0:
            raise _BlobError(f"feature {key!r} is a scalar, not an array with an examples axis")
        lengths[key] = array.shape[0]
    if len(set(lengths.values())) != 1:
        raise _BlobError(f"features disagree on the number of examples {lengths}")
    return next(iter(lengths.values()))


def decode_client(blob: bytes) -> ClientArrays:
    """Decodes one `data` blob into `{feature: array}` (the features in stored order).

    Numeric arrays are read-only views of the decompressed bytes. No more is decompressed than
    the blob's msgpack headers declare, and a blob declaring more than `MAX_CLIENT_BYTES` is
    refused (a decompression bomb costs no memory).

    Raises:
      DataFormatError: the blob is not zlib-compressed msgpack of FedJAX arrays, or declares
        more than `MAX_CLIENT_BYTES` bytes.
    """
    try:
        return _decode(blob)
    except _BlobError as e:
        raise DataFormatError(f"client blob: {e}") from None


def _ext_of(key: str, value: Any) -> msgpack.ExtType:
    array = np.asarray(value)
    dtype = array.dtype
    if dtype.hasobject:
        flat = list(array.reshape(-1))
        if not all(isinstance(b, bytes) for b in flat):
            bad = next(type(b).__name__ for b in flat if not isinstance(b, bytes))
            raise ValueError(f"feature {key!r} is an object array holding {bad}; FedJAX stores "
                             "only bytes in object arrays, encode text with str.encode('utf-8')")
        flat = [bytes(b) for b in flat]  # exact bytes, not subclasses such as np.bytes_
        payload = msgpack.packb(([int(d) for d in array.shape], flat), use_bin_type=True)
        return msgpack.ExtType(EXT_BYTES_NDARRAY, payload)
    if dtype.kind not in _NUMERIC_KINDS and dtype.name != "bfloat16":
        hint = (" (use an object array of bytes for text)" if dtype.kind in "SU" else "")
        raise ValueError(f"feature {key!r} has dtype {dtype}, which the FedJAX format cannot "
                         f"store; use a numeric dtype or an object array of bytes{hint}")
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    payload = msgpack.packb(([int(d) for d in array.shape], array.dtype.name, array.tobytes("C")),
                            use_bin_type=True)
    return msgpack.ExtType(EXT_NDARRAY, payload)


def _check_arrays(arrays: Any) -> int:
    if not isinstance(arrays, Mapping):
        raise ValueError(f"client data is a {type(arrays).__name__}; give a dict feature -> array")
    for key in arrays:
        if not isinstance(key, str):
            raise ValueError(f"feature name {key!r} is not a str")
    try:
        return _num_examples({k: np.asarray(v) for k, v in arrays.items()})
    except _BlobError as e:
        raise ValueError(f"{e}; every feature needs the same leading examples axis") from None


def encode_client(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Encodes `{feature: array}` into a `data` blob, as FedJAX's builder does.

    Features keep the mapping's order. Numeric arrays are stored in native byte order; object
    arrays must hold `bytes`.

    Example:
      >>> blob = encode_client({"x": np.zeros((2, 3), np.float32), "y": np.array([1, 2])})
      >>> decode_client(blob)["y"]
      array([1, 2])
    """
    _check_arrays(arrays)
    packed = {key: _ext_of(key, value) for key, value in arrays.items()}
    return zlib.compress(_packb(packed))


def _packb(obj: Any) -> bytes:
    # msgpack's pure-Python fallback, which type checkers read, says `bytes | None`: None only
    # comes from a `Packer(autoreset=False)`, never from `packb`.
    return cast(bytes, msgpack.packb(obj, use_bin_type=True))


# ---------------------------------------------------------------------------------------------
# Reading a file.


def _compressed_hint(head: bytes) -> str:
    if head.startswith(b"\xfd7zXZ\x00") or head.startswith(b"\x5d\x00\x00"):
        return "it is LZMA/XZ-compressed; decompress it first (xz -dk FILE)"
    if head.startswith(b"\x1f\x8b"):
        return "it is gzip-compressed; decompress it first (gunzip -k FILE)"
    if head.startswith(b"BZh"):
        return "it is bzip2-compressed; decompress it first (bunzip2 -k FILE)"
    return "check the path, or download the file again"


def check_header(path: str) -> None:
    """Raises DataFormatError if `path` is not a whole SQLite database file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(100)
    if size == 0:
        raise DataFormatError(f"{path}: empty file (0 bytes), not a FedJAX SQLite file; "
                              "download or convert it again")
    if not head.startswith(_SQLITE_MAGIC):
        raise DataFormatError(f"{path}: not an SQLite database ({_compressed_hint(head)})")
    if len(head) < 100:
        raise DataFormatError(f"{path}: truncated SQLite file ({size} bytes, shorter than the "
                              "100-byte header); download or copy it again")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    change_counter = int.from_bytes(head[24:28], "big")
    pages = int.from_bytes(head[28:32], "big")
    valid_for = int.from_bytes(head[92:96], "big")
    if os.path.exists(path + "-wal") or page_size < 512 or page_size & (page_size - 1):
        return  # a write-ahead log may hold pages the main file lacks; leave it to SQLite
    expected = pages * page_size if (pages and change_counter == valid_for) else None
    if size % page_size or (expected is not None and size < expected):
        says = f", the header says {expected}" if expected is not None else ""
        raise DataFormatError(f"{path}: truncated SQLite file ({size} bytes{says}); the download "
                              "or copy was cut short, fetch the file again")


def _client_id_str(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="backslashreplace")
    if isinstance(raw, str):
        return raw
    if isinstance(raw, int):
        return str(raw)
    raise _BlobError(f"client_id {raw!r} is a {type(raw).__name__}, not bytes or text")


class SQLiteFederatedData:
    """`FederatedData` over a FedJAX SQLite file, read lazily and read-only.

    Opening reads only the client ids and sizes (in FedJAX's order, by `rowid`); a client's
    blob is fetched and decoded when asked for. One read-only connection is shared under a
    lock, so a cohort may be packed from another thread. Returned arrays are read-only.

    SQLite's query for the ids and sizes reads the whole file (FedJAX's schema stores
    `num_examples` after the blob), so its result is kept in the index cache
    (`fedjax_core.data.index_cache`), keyed by the file's path, size, mtime, inode and header
    hash: a later open of the unchanged file reads the cache entry and the file's first
    pages only. A changed file is read again and its entry replaced.

    Args:
      path: a `.sqlite` file in FedJAX's format.
      cache_size: how many decoded clients to keep (least recently used first out); 0: none.
      index_cache: keep the id/size index in the cache (True: `index_cache.default_dir()`,
        i.e. `$FEDJAX_INDEX_CACHE`, off if that is `0`, else `$FEDJAX_DATA/index` or
        `~/.cache/fedjax/index`), in a folder given here, or not at all (False).

    Attributes:
      index_source: `index_cache.IndexSource(folder, key)` when the index cache is on for
        this file, else None; `PreprocessedFederatedData` caches derived sizes with it.

    Raises:
      FileNotFoundError: no file at `path`.
      DataFormatError: the file is not a FedJAX SQLite file, is truncated or corrupt; a
        client's blob is bad (raised by `get_client`).

    Example:
      >>> data = SQLiteFederatedData("emnist_train.sqlite")
      >>> data.client_ids[0], data.client_sizes[0]
      ('f0000_14', 106)
      >>> data.get_client(0)["x"].shape
      (106, 28, 28)
    """

    def __init__(self, path: str | os.PathLike, *, cache_size: int = 0,
                 index_cache: bool | str | os.PathLike = True):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: no such file; check the path or download it")
        if os.path.isdir(self.path):
            raise DataFormatError(f"{self.path}: is a directory, not a FedJAX SQLite file")
        if cache_size < 0:
            raise ValueError(f"cache_size={cache_size} must be >= 0")
        check_header(self.path)
        uri = Path(self.path).resolve().as_uri() + "?mode=ro"
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[int, ClientArrays] = collections.OrderedDict()
        self._cache_size = cache_size
        self._features: tuple[str, ...] | None = None
        self._closed = False
        self.index_source: _index_cache.IndexSource | None = None
        folder = _index_cache.resolve_dir(index_cache)
        key = self._index_key(folder)  # before connecting: a file replaced later is seen
        try:
            self._connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
        except sqlite3.Error as e:
            raise DataFormatError(f"{self.path}: cannot open as SQLite ({e})") from None
        try:
            self._check_schema()
            self._load_index(folder, key)
        except BaseException:
            self._connection.close()
            raise

    def _corrupt(self, e: sqlite3.Error) -> DataFormatError:
        return DataFormatError(f"{self.path}: corrupt SQLite file (sqlite: {e}); download or "
                               "convert the file again")

    def _check_schema(self) -> None:
        try:
            tables = [r[0] for r in self._connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            if "federated_data" not in tables:
                if {"examples", "client_metadata"} <= set(tables):
                    raise DataFormatError(
                        f"{self.path}: a TensorFlow Federated SQLite file, not FedJAX's format; "
                        "convert it with fedjax_core.data.convert.tff_to_sqlite")
                raise DataFormatError(f"{self.path}: no table federated_data (tables: {tables}); "
                                      "not a FedJAX SQLite file")
            columns = [r[1] for r in self._connection.execute("PRAGMA table_info(federated_data)")]
        except sqlite3.Error as e:
            raise self._corrupt(e) from None
        missing = [c for c in _COLUMNS if c not in columns]
        if missing:
            raise DataFormatError(
                f"{self.path}: table federated_data has columns {columns} but lacks {missing}; "
                "FedJAX's format needs (client_id BLOB, data BLOB, num_examples INTEGER)")

    def _index_key(self, folder: Path | None) -> _index_cache.FileKey | None:
        """The file's cache key, or None where its index is not cached."""
        if folder is None or not _index_cache.cacheable(self.path):
            return None
        try:
            return _index_cache.file_key(self.path)
        except OSError:
            return None

    def _load_index(self, folder: Path | None, key: _index_cache.FileKey | None) -> None:
        """Reads the ids and sizes from the cache entry for `key` (the file's key from before
        the connection was opened), or from the file, then stores them for `key`; the file's
        key is taken again after, and a file that changed meanwhile is neither read from
        the cache nor stored."""
        cached = _index_cache.load_index(folder, key) if key is not None else None
        if cached is not None and self._index_key(folder) != key:
            cached, key = None, None  # changed while opening: read what the connection sees
        if cached is None:
            raw_ids, ids, sizes = self._read_index()
            if key is not None and self._index_key(folder) != key:
                key = None  # changed while read: nothing cached
        else:
            raw_ids, sizes = cached
            try:  # BLOB ids (FedJAX's usual), as `_client_id_str` decodes them, but faster
                ids = [raw.decode("utf-8", "backslashreplace") for raw in raw_ids]
            except AttributeError:  # some TEXT or INTEGER ids
                ids = [_client_id_str(raw) for raw in raw_ids]  # never fails on these types
        self._raw_ids = tuple(raw_ids)
        self._ids = tuple(ids)
        self._index: dict[str, int] | None = None
        if cached is None:  # checked here; a cached index was checked when it was stored
            self._id_index()
        if key is not None and folder is not None:
            self.index_source = _index_cache.IndexSource(folder, key)
            if cached is None:
                _index_cache.store_index(folder, key, raw_ids, np.asarray(sizes, np.int64))
        self._sizes = np.array(sizes, np.int64)
        self._sizes.setflags(write=False)

    def _id_index(self) -> dict[str, int]:
        """`{client id: position}` (built on first use after a cached open: 1M ids take a
        second), or DataFormatError where two ids decode to the same text."""
        if self._index is None:
            ids = self._ids
            index = dict(zip(ids, range(len(ids))))
            if len(index) != len(ids):
                dup = next(c for c in ids if ids.count(c) > 1)
                raise DataFormatError(f"{self.path}: client id {dup!r} appears twice once "
                                      "decoded as UTF-8; the file's ids are not valid UTF-8 text")
            self._index = index
        return self._index

    def _read_index(self) -> tuple[list[Any], list[str], list[int]]:
        """Raw ids, ids and sizes from the file itself, in `rowid` order, checked."""
        try:
            rows = self._connection.execute(
                "SELECT client_id, num_examples FROM federated_data ORDER BY rowid").fetchall()
        except sqlite3.Error as e:
            raise self._corrupt(e) from None
        raw_ids, ids, sizes = [], [], []
        for raw, n in rows:
            try:
                cid = _client_id_str(raw)
            except _BlobError as e:
                raise DataFormatError(f"{self.path}: {e}; the file is corrupt") from None
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise DataFormatError(f"{self.path}: client {cid!r} has num_examples={n!r}, not "
                                      "a non-negative integer; the file is corrupt")
            raw_ids.append(raw)
            ids.append(cid)
            sizes.append(n)
        return raw_ids, ids, sizes

    @property
    def client_ids(self) -> tuple[str, ...]:
        return self._ids

    @property
    def client_sizes(self) -> np.ndarray:
        return self._sizes

    @property
    def features(self) -> tuple[str, ...]:
        """Sorted feature names of the first client (read on first use); `()` if no clients."""
        if self._features is None:
            self._features = tuple(sorted(self.get_client(0))) if self._ids else ()
        return self._features

    def __len__(self) -> int:
        return len(self._ids)

    def get_client(self, index: int) -> ClientArrays:
        """The examples of the client at position `index` (`0 <= index < len(self)`)."""
        i = operator.index(index)
        if not -len(self._ids) <= i < len(self._ids):
            raise IndexError(f"client index {index} out of range for {len(self._ids)} clients")
        i %= len(self._ids)
        with self._lock:
            cached = self._cache.get(i)
            if cached is not None:
                self._cache.move_to_end(i)
                return cached
            if self._closed:
                raise ValueError(f"{self.path}: reading from a closed SQLiteFederatedData; "
                                 "open the file again")
            try:
                row = self._connection.execute(
                    "SELECT data FROM federated_data WHERE client_id = ?",
                    (self._raw_ids[i],)).fetchone()
            except sqlite3.Error as e:
                raise self._corrupt(e) from None
        cid = self._ids[i]
        if row is None:
            raise DataFormatError(f"{self.path}: client {cid!r} vanished from the file; was it "
                                  "changed while open? open it again")
        try:
            arrays = _decode(row[0])
            n = _num_examples(arrays)
        except _BlobError as e:
            raise DataFormatError(f"{self.path}: client {cid!r}: {e}; the file is corrupt, "
                                  "download or convert it again") from None
        if n != self._sizes[i]:
            raise DataFormatError(
                f"{self.path}: client {cid!r} has {n} examples but num_examples says "
                f"{int(self._sizes[i])}; the file is inconsistent, convert it again")
        for array in arrays.values():
            array.setflags(write=False)
        if self._cache_size:
            with self._lock:
                self._cache[i] = arrays
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return arrays

    def get_client_by_id(self, client_id: str) -> ClientArrays:
        """The examples of the client named `client_id`."""
        try:
            i = self._id_index()[client_id]
        except KeyError:
            raise KeyError(f"no client {client_id!r} in {self.path}") from None
        return self.get_client(i)

    def items(self) -> Iterator[tuple[str, ClientArrays]]:
        """`(client id, arrays)` for every client, in order."""
        for i, cid in enumerate(self._ids):
            yield cid, self.get_client(i)

    def close(self) -> None:
        """Closes the connection; the object can no longer read clients."""
        with self._lock:
            self._closed = True
            self._connection.close()
            self._cache.clear()

    def __enter__(self) -> "SQLiteFederatedData":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SQLiteFederatedData({self.path!r}, {len(self)} clients, "
                f"{int(self._sizes.sum())} examples)")


# ---------------------------------------------------------------------------------------------
# Writing a file.


def _remove_quietly(path: str) -> None:
    for p in (path, path + "-journal", path + "-wal", path + "-shm"):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _raw_id(client_id: Any, text_ids: bool) -> bytes | str:
    if isinstance(client_id, bytes):
        return client_id.decode("utf-8") if text_ids else client_id
    if isinstance(client_id, str):
        return client_id if text_ids else client_id.encode("utf-8")
    raise ValueError(f"client id {client_id!r} is a {type(client_id).__name__}; give str or bytes")


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    """Moves the finished `tmp` to `path` atomically; without `overwrite`, never clobbers."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails if `path` appeared meanwhile
    except FileExistsError:
        raise FileExistsError(f"{path}: already exists; pass overwrite=True to replace it"
                              ) from None
    except OSError:  # no hard links on this file system
        if os.path.exists(path):
            raise FileExistsError(
                f"{path}: already exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_sqlite(path: str | os.PathLike,
                 clients: Iterable[tuple[str | bytes, Mapping[str, np.ndarray]]],
                 *, overwrite: bool = False, text_ids: bool = False) -> int:
    """Writes clients to a FedJAX SQLite file, as FedJAX's `SQLiteFederatedDataBuilder` does.

    Rows are inserted in the order given (FedJAX lists clients by `rowid`), in one transaction
    after the table's own. The file is built under a new temporary name next to `path`
    (`fedjax_core.atomic`) and renamed into place when complete; on any error the temporary
    file is removed and nothing is left.
    Clients are consumed one at a time, so `clients` may be a generator over a large dataset.

    Args:
      path: the `.sqlite` file to create.
      clients: `(client id, {feature: array})` pairs; ids are `str` (stored as UTF-8) or bytes.
        Every feature needs the same leading examples axis; object arrays must hold bytes.
      overwrite: replace an existing file at `path` (otherwise `FileExistsError`).
      text_ids: store ids as SQLite TEXT rather than BLOB. FedJAX stores BLOBs, except in its
        conversion of TFF's files (CIFAR-100), which keeps TFF's TEXT ids.

    Returns:
      The number of clients written.

    Raises:
      FileExistsError: `path` exists and `overwrite` is False.
      IsADirectoryError / FileNotFoundError / PermissionError: `path` is a folder, or its
        folder does not exist or is not writable.
      OSError: the file cannot be written (e.g. the disk is full); nothing is left behind.
      ValueError: a client's arrays cannot be stored, or an id repeats.

    Example:
      >>> write_sqlite("tiny.sqlite", [("a", {"x": np.ones((2, 3), np.float32)})])
      1
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory; give a file name ending in .sqlite")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path}: already exists; pass overwrite=True to replace it")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{path}: directory {directory} does not exist; create it first")
    tmp = os.fspath(atomic.temp_path(path))
    seen: set[bytes | str] = set()
    count = 0

    def rows():
        nonlocal count
        for item in clients:
            try:
                client_id, arrays = item
            except (TypeError, ValueError):
                raise ValueError(f"expected (client id, arrays) pairs, got {item!r:.80}") from None
            raw = _raw_id(client_id, text_ids)
            if raw in seen:
                raise ValueError(f"client id {client_id!r} appears twice; ids must be unique")
            seen.add(raw)
            try:
                n = _check_arrays(arrays)
                blob = zlib.compress(_packb(
                    {key: _ext_of(key, value) for key, value in arrays.items()}))
            except ValueError as e:
                raise ValueError(f"client {client_id!r}: {e}") from None
            count += 1
            yield raw, blob, n

    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"{path}: cannot write in {directory} (permission denied); "
                              "give a path in a folder you can write to")
    try:
        atomic.create(tmp).close()  # a new file of this process, never a planted link
        try:
            connection = sqlite3.connect(tmp)
            try:
                connection.execute(CREATE_TABLE + ";")
                connection.commit()
                connection.executemany("INSERT INTO federated_data VALUES (?, ?, ?);", rows())
                connection.commit()
            finally:
                connection.close()
        except sqlite3.Error as e:  # cannot create the file, the disk is full, ...
            raise OSError(f"{path}: cannot write it in {directory} (sqlite: {e}); check that "
                          "the folder is writable and the disk has room") from None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
        atomic.fsync_dir(directory)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return count
