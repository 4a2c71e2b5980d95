"""A data file's client index (ids and sizes), built once and kept in a cache (host side).

Opening a FedJAX SQLite file needs every client's id and `num_examples`. FedJAX's schema
stores `num_examples` after the `data` blob, so SQLite's query for them walks every overflow
page: it reads the whole file. This module keeps what that query returned (and, for tasks whose
preprocessing changes the number of examples, the preprocessed sizes) in a small `.npz` entry,
so that later opens read the entry and the file's first page instead.

An entry is keyed by the file's resolved path, size, `mtime_ns`, inode and the SHA-256 of its
first `HEADER_BYTES` (for SQLite: the header, whose file change counter at offset 24 changes
at every committed write, and the schema page). When any of them differs the entry is rebuilt
from the file and replaced. A file with a write-ahead log (`-wal`) or a hot journal
(`-journal`) beside it is never cached: its pages may differ from the main file's.

Where entries live: `$FEDJAX_INDEX_CACHE` if it names a folder; nowhere (caching off) if it is
`0`; else `index/` in the data cache (`$FEDJAX_DATA` or `~/.cache/fedjax`). One entry per file
path (and per path and preprocessing version), at most `MAX_ENTRIES` in all, the least
recently used removed first.

Entries are written with `fedjax_core.atomic` (whole, never through a link), read with
`np.load(..., allow_pickle=False)` from a descriptor opened with `O_NOFOLLOW`, and checked
field by field. An entry that is missing, unreadable, corrupt, a link or stale is rebuilt
silently; a cache folder that cannot be created or written only means nothing is cached.

Example:
  >>> key = file_key("train.sqlite")
  >>> cache = default_dir()                       # ~/.cache/fedjax/index
  >>> load_index(cache, key) is None              # first time: build it from the file
  True
  >>> store_index(cache, key, [b"a", b"b"], np.array([3, 5]))
  True
  >>> load_index(cache, key)
  ([b'a', b'b'], array([3, 5]))
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from fedjax_core import atomic

ENV = "FEDJAX_INDEX_CACHE"
"""Set to `0` to turn the index cache off, or to a folder to keep the entries there."""

FORMAT = "fedjax-index-v1"
"""The layout of an entry; an entry of another layout is rebuilt."""

HEADER_BYTES = 4096
"""How much of the file's beginning its key hashes (SQLite's header and first page)."""

MAX_ENTRIES = 256
"""The most entries kept in one cache folder; storing one more removes the least recently used."""

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_KIND_BYTES, _KIND_TEXT, _KIND_INT = 0, 1, 2
_SUFFIX = ".npz"


class FileKey(NamedTuple):
    """What identifies one version of a data file: an entry is valid only for an equal key."""

    path: str           # the resolved absolute path
    size: int           # st_size, bytes
    mtime_ns: int       # st_mtime_ns
    inode: int          # st_ino (a file renamed into place is a new inode)
    header_sha256: str  # hex SHA-256 of the first HEADER_BYTES bytes


def data_dir() -> Path:
    """The data cache: `$FEDJAX_DATA` if set, else `~/.cache/fedjax` (not created here)."""
    env = os.environ.get("FEDJAX_DATA", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedjax"


def default_dir() -> Path | None:
    """`$FEDJAX_INDEX_CACHE` if it names a folder, None (off) if it is `0`, else
    `data_dir() / "index"` (`$FEDJAX_DATA/index` or `~/.cache/fedjax/index`)."""
    env = os.environ.get(ENV, "").strip()
    if env == "0":
        return None
    return Path(env).expanduser() if env else data_dir() / "index"


def resolve_dir(setting: bool | str | os.PathLike | None) -> Path | None:
    """The cache folder a caller's `index_cache=` argument names.

    Args:
      setting: True (or None) for `default_dir()`, False for no cache, or a folder.

    Returns:
      The folder, or None when caching is off.

    Example:
      >>> resolve_dir(False) is None
      True
    """
    if setting is None or setting is True:
        return default_dir()
    if setting is False:
        return None
    return Path(os.fspath(setting)).expanduser()


def cacheable(path: str | os.PathLike) -> bool:
    """False where SQLite may read pages that are not in the main file (a `-wal` or
    `-journal` file beside it): such a file is read afresh every time."""
    path = os.fspath(path)
    return not (os.path.exists(path + "-wal") or os.path.exists(path + "-journal"))


def file_key(path: str | os.PathLike) -> FileKey:
    """The key of the file at `path` as it is now (one `stat` and one read of its header).

    Example:
      >>> file_key("train.sqlite").size
      2048000
    """
    resolved = str(Path(path).resolve())
    with open(resolved, "rb") as f:
        st = os.fstat(f.fileno())
        head = f.read(HEADER_BYTES)
    return FileKey(resolved, int(st.st_size), int(st.st_mtime_ns), int(st.st_ino),
                   hashlib.sha256(head).hexdigest())


def _entry_path(folder: Path, key: FileKey, version: str | None) -> Path:
    name = key.path if version is None else f"{key.path}\0{version}"
    stem = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return folder / (stem + (".index" if version is None else ".sizes") + _SUFFIX)


def _meta(key: FileKey, version: str | None, count: int) -> str:
    return json.dumps({"format": FORMAT, "key": list(key), "version": version, "count": count},
                      sort_keys=True)


def _root(folder: Path) -> Path | None:
    """The folder below which no component may be a link: the data cache for the default
    folder (the user may make the data cache a link; its `index/` must be a real folder), the
    folder itself for a folder the user names (theirs, link or not). None if the default
    folder is a link: it is then neither read nor written."""
    if folder != data_dir() / "index":
        return folder
    return None if folder.is_symlink() else folder.parent


def _read(folder: Path | None, key: FileKey, version: str | None) -> dict[str, np.ndarray] | None:
    """The arrays of the entry for (`key`, `version`), or None (absent, unreadable, stale)."""
    if folder is None or _root(folder) is None:
        return None
    entry = _entry_path(folder, key, version)
    try:
        fd = os.open(entry, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            with np.load(f, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
            with contextlib.suppress(OSError):
                os.utime(f.fileno())  # recently used: pruned last
    except Exception:  # a corrupt entry (zip, npy or I/O error): rebuilt by the caller
        return None
    meta = arrays.get("meta")
    if meta is None or meta.shape != () or meta.dtype.kind != "U":
        return None
    try:
        stored = json.loads(str(meta))
    except ValueError:
        return None
    if not isinstance(stored, dict) or stored.get("format") != FORMAT or \
            stored.get("key") != list(key) or stored.get("version") != version:
        return None
    count = stored.get("count")
    sizes = arrays.get("sizes")
    if not isinstance(count, int) or sizes is None or sizes.shape != (count,) or \
            sizes.dtype.kind not in "iu" or (count and int(sizes.min()) < 0):
        return None
    arrays["count"] = np.array(count)
    return arrays


def _prune(folder: Path, keep: Path) -> None:
    """Removes the least recently used entries beyond `MAX_ENTRIES` (never `keep`)."""
    try:
        entries = [e for e in os.scandir(folder)
                   if e.name.endswith(_SUFFIX) and e.is_file(follow_symlinks=False)]
    except OSError:
        return
    if len(entries) <= MAX_ENTRIES:
        return
    def last_used(e: os.DirEntry) -> int:
        try:
            return e.stat(follow_symlinks=False).st_mtime_ns
        except OSError:  # removed meanwhile
            return 0

    entries.sort(key=last_used)
    for e in entries[:len(entries) - MAX_ENTRIES]:
        if e.path != str(keep):
            with contextlib.suppress(OSError):
                os.unlink(e.path)


def _write(folder: Path | None, key: FileKey, version: str | None, count: int,
           arrays: dict[str, np.ndarray]) -> bool:
    """Stores an entry, replacing the path's previous one; False if the cache cannot be written."""
    if folder is None:
        return False
    entry = _entry_path(folder, key, version)
    root = _root(folder)
    if root is None:
        return False
    try:
        atomic.make_dir(folder, root=root)
        members: dict[str, Any] = {"meta": np.array(_meta(key, version, count)), **arrays}
        with atomic.replace(entry) as f:
            np.savez(f, **members)
    except (OSError, ValueError):
        return False
    _prune(folder, entry)
    return True


def _smallest_uint(values: np.ndarray) -> np.ndarray:
    top = int(values.max()) if values.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.int64)


def store_index(folder: Path | None, key: FileKey, raw_ids: Sequence[Any],
                sizes: np.ndarray) -> bool:
    """Stores a file's raw client ids (bytes, str or int, in order) and sizes under `key`.

    Args:
      folder: the cache folder (None: caching off, nothing is stored).
      key: the file's key (`file_key`) from before its index was read.
      raw_ids: the ids as SQLite returned them: `bytes` (BLOB), `str` (TEXT) or `int`.
      sizes: `Int[ndarray, "clients"]`, non-negative.

    Returns:
      True if the entry was written; False if caching is off, the folder cannot be written,
      or an id is of another type (then nothing is cached).

    Example:
      >>> store_index(default_dir(), file_key("train.sqlite"), [b"a"], np.array([3]))
      True
    """
    kinds = np.empty(len(raw_ids), np.uint8)
    pieces = []
    for i, raw in enumerate(raw_ids):
        if isinstance(raw, bytes):
            kinds[i], piece = _KIND_BYTES, raw
        elif isinstance(raw, str):
            try:
                kinds[i], piece = _KIND_TEXT, raw.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(raw, int) and not isinstance(raw, bool):
            kinds[i], piece = _KIND_INT, str(raw).encode("ascii")
        else:
            return False
        pieces.append(piece)
    lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
    sizes = np.asarray(sizes, np.int64)
    uniform = kinds.size and bool((kinds == kinds[0]).all())
    return _write(folder, key, None, len(pieces), {
        "id_bytes": np.frombuffer(b"".join(pieces), np.uint8),
        "id_lengths": _smallest_uint(lengths),
        "id_kinds": kinds[:1] if uniform else kinds,
        "sizes": _smallest_uint(sizes),
    })


def load_index(folder: Path | None, key: FileKey) -> tuple[list[Any], np.ndarray] | None:
    """The raw client ids and sizes stored for `key`, or None to build them from the file.

    Args:
      folder: the cache folder (None: caching off).
      key: the file's key now (`file_key`).

    Returns:
      `(raw ids, Int64[ndarray, "clients"] sizes)` exactly as `store_index` was given them
      (same order, same types), or None when there is no valid entry for this key.

    Example:
      >>> load_index(default_dir(), file_key("train.sqlite"))
      ([b'a'], array([3]))
    """
    arrays = _read(folder, key, None)
    if arrays is None:
        return None
    count = int(arrays["count"])
    data, lengths, kinds = (arrays.get(k) for k in ("id_bytes", "id_lengths", "id_kinds"))
    if data is None or lengths is None or kinds is None or data.dtype != np.uint8 or \
            data.ndim != 1 or lengths.shape != (count,) or lengths.dtype.kind not in "iu" or \
            kinds.dtype != np.uint8 or kinds.shape not in ((count,), (min(count, 1),)):
        return None
    ends = np.cumsum(lengths, dtype=np.int64)
    if (count and (int(lengths.min()) < 0 or int(ends[-1]) != data.size)) or \
            (not count and data.size) or (kinds.size and int(kinds.max()) > _KIND_INT):
        return None
    blob = data.tobytes()
    starts = (ends - lengths).tolist()
    ends_list = ends.tolist()
    raw_ids: list[Any] = [blob[s:e] for s, e in zip(starts, ends_list)]
    try:
        if kinds.size == 1 and count:
            kind = int(kinds[0])
            if kind == _KIND_TEXT:
                raw_ids = [b.decode("utf-8") for b in raw_ids]
            elif kind == _KIND_INT:
                raw_ids = [int(b) for b in raw_ids]
        else:
            for i in np.flatnonzero(kinds != _KIND_BYTES).tolist():
                b = raw_ids[i]
                raw_ids[i] = b.decode("utf-8") if kinds[i] == _KIND_TEXT else int(b)
    except ValueError:  # bad UTF-8 or a bad integer: a corrupt entry
        return None
    return raw_ids, arrays["sizes"].astype(np.int64)


def store_sizes(folder: Path | None, key: FileKey, version: str, sizes: np.ndarray) -> bool:
    """Stores the sizes of a file's clients after preprocessing `version` (see `load_sizes`).

    Returns:
      True if the entry was written (False: caching off or the folder cannot be written).
    """
    sizes = np.asarray(sizes, np.int64)
    return _write(folder, key, version, int(sizes.shape[0]), {"sizes": _smallest_uint(sizes)})


def load_sizes(folder: Path | None, key: FileKey, version: str,
               count: int) -> np.ndarray | None:
    """The preprocessed client sizes stored for (`key`, `version`), or None.

    Args:
      folder: the cache folder (None: caching off).
      key: the source file's key now.
      version: names the preprocessing (e.g. `"shakespeare-v1/seq80"`); change it whenever
        the preprocessing could change a client's number of examples.
      count: the number of clients the file has; an entry of another count is stale.

    Returns:
      `Int64[ndarray, "clients"]`, or None when there is no valid entry.
    """
    arrays = _read(folder, key, version)
    if arrays is None or int(arrays["count"]) != count:
        return None
    return arrays["sizes"].astype(np.int64)


class IndexSource(NamedTuple):
    """Where a dataset's index came from: what `cached_sizes` needs to cache derived sizes."""

    folder: Path   # the cache folder
    key: FileKey   # the file's key when it was opened


def cached_sizes(base: Any, version: str | None, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """`compute()`, cached per source file and preprocessing `version` where `base` has one.

    `base.index_source` (an `IndexSource`, set by `SQLiteFederatedData` when its cache is on)
    names the file; without it, or without a `version`, this is just `compute()`.

    Args:
      base: the dataset the sizes derive from.
      version: names the preprocessing (None: never cached).
      compute: computes `Int[ndarray, "clients"]` (e.g. by preprocessing every client).

    Returns:
      `Int64[ndarray, "clients"]`, equal to `compute()`'s.

    Example:
      >>> sizes = cached_sizes(raw, "shakespeare-v1/seq80", count_every_client)
    """
    source = getattr(base, "index_source", None)
    if version is None or not isinstance(source, IndexSource):
        return np.asarray(compute(), np.int64)
    count = len(base.client_ids)
    try:
        stored = load_sizes(source.folder, source.key, version, count)
    except OSError:
        stored = None
    if stored is not None:
        return stored
    sizes = np.asarray(compute(), np.int64)
    try:
        if file_key(source.key.path) == source.key:  # unchanged since it was opened
            store_sizes(source.folder, source.key, version, sizes)
    except OSError:
        pass
    return sizes
