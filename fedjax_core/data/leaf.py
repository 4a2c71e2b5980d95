"""LEAF JSON datasets (FEMNIST, Shakespeare, Sent140) as `InMemoryFederatedData` (host side, numpy).

A LEAF file is one JSON object (optionally gzip-compressed):

    {"users": [id, ...], "num_samples": [n, ...],
     "user_data": {id: {"x": [example, ...], "y": [label, ...]}, ...}}

`load_leaf(path)` reads one such file, or every `*.json` and `*.json.gz` file directly inside
a folder (LEAF writes a split as a folder of shards), in sorted file-name order. Clients keep
the order of `users` within a file, files in sorted order. A user may appear in ONE file only:
LEAF's sampling scripts put every user in exactly one shard, so a user found in two files means
mixed-up folders (train next to test, a shard copied twice) and is an error, not a merge.

What each layout becomes (one dict of arrays per user, features `x` and `y`):

| layout        | LEAF example `x`                    | `x` here                             | `y` here                |
| ------------- | ----------------------------------- | ------------------------------------ | ----------------------- |
| `femnist`     | 784 floats, a 28x28 image row-major | `float32 [n, 28, 28]`, as stored     | `int32 [n]`, 0..61      |
| `shakespeare` | a string (80 characters in LEAF)    | `bytes_ [n]` (`S` dtype), UTF-8      | `bytes_ [n]`, next char |
| `sent140`     | a tweet's fields, text at index 4   | `bytes_ [n]` (`S` dtype), UTF-8 text | `int32 [n]`, 0 or 1     |

- FEMNIST pixels are kept exactly as the file has them (values k/255 in [0, 1], background 1.0,
  ink dark), only reshaped; no channel axis is added and nothing is inverted. Labels: 0-9
  digits, 10-35 `A`-`Z`, 36-61 `a`-`z`.
- Shakespeare and Sent140 text is kept as numpy fixed-width bytes (`np.bytes_`, dtype `S<w>`),
  not as Python objects, so a client stays a plain dict of numeric-like arrays. Decode one with
  `x[i].decode("utf-8")`; a Shakespeare client whose snippets are all 80 ASCII characters has
  dtype `S80` and `x.view(np.uint8).reshape(n, 80)` gives its bytes, ready for
  `shakespeare.TABLE`. (numpy drops trailing NUL bytes of `S` items; LEAF text has none.)
- Sent140 `x` is LEAF's row `[id, date, query, user, text, split]`; only the text (index 4, what
  LEAF's models read) is kept. Labels are 1 for positive and 0 otherwise: files from current
  LEAF already hold 0/1; older preprocessing kept Sentiment140's raw polarity (`"0"`, `"2"`,
  `"4"`, strings or numbers), which is mapped as LEAF's own script does, 4 -> 1, else 0.
- `layout="auto"` looks at the first example: numbers -> `femnist`, a string -> `shakespeare`,
  a list holding strings -> `sent140`. The first file with an example decides for all files.

Every problem with a file raises `DataFormatError` with one line naming the file, what is wrong
(e.g. "user 'f0001_41': num_samples says 12 but x has 11 examples") and what to do.

References:
  Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018 (the format and the tasks).
"""

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedjax_core.data.errors import DataFormatError
from fedjax_core.data.federated_data import ClientArrays, InMemoryFederatedData

Layout = Literal["auto", "femnist", "shakespeare", "sent140"]
LAYOUTS = ("femnist", "shakespeare", "sent140")
"""The layouts `load_leaf` understands (besides `"auto"`)."""

FEMNIST_SIDE = 28
FEMNIST_PIXELS = FEMNIST_SIDE * FEMNIST_SIDE  # 784
FEMNIST_CLASSES = 62
SENT140_TEXT_FIELD = 4
"""Index of the tweet text in a LEAF Sent140 example `[id, date, query, user, text, split]`."""

_GZIP_MAGIC = b"\x1f\x8b"
_FIX_FORMAT = ("LEAF files hold {\"users\": [...], \"num_samples\": [...], "
               "\"user_data\": {user: {\"x\": [...], \"y\": [...]}}}")


def leaf_files(path: str | os.PathLike) -> list[Path]:
    """The LEAF files `load_leaf(path)` reads: `path` itself, or a folder's shards sorted by name.

    Args:
      path: a `.json` / `.json.gz` file, or a folder holding such files (not searched
        recursively).

    Returns:
      The files, sorted by name for a folder.

    Raises:
      FileNotFoundError: `path` does not exist, or the folder holds no `*.json` / `*.json.gz`.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.iterdir()
                        if p.is_file() and p.name.endswith((".json", ".json.gz"))),
                       key=lambda p: p.name)
        if not files:
            raise FileNotFoundError(
                f"{path}: the folder holds no *.json or *.json.gz files; point at a LEAF split "
                "folder such as data/train or at one of its files")
        return files
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"{path}: no such file or folder; give a LEAF .json/.json.gz file "
                            "or a folder of them")


def read_leaf_json(file: str | os.PathLike) -> Any:
    """Parses one LEAF file, gunzipping it when it is gzip data (by content, not by name).

    Args:
      file: path of a `.json` or `.json.gz` file.

    Returns:
      The parsed JSON value (not yet checked against the LEAF layout).

    Raises:
      DataFormatError: the file is a truncated or corrupt gzip stream, not UTF-8, or not JSON.
    """
    file = Path(file)
    raw = file.read_bytes()
    if raw[:2] == _GZIP_MAGIC or file.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            raise DataFormatError(
                f"{file}: not a complete gzip file ({reason}); the download was probably cut "
                "short or corrupted, fetch the file again") from None
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise DataFormatError(f"{file}: not UTF-8 text, so not a LEAF JSON file; "
                              "check that the path points at a LEAF .json file") from None
    except json.JSONDecodeError as e:
        raise DataFormatError(
            f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); the file is "
            "truncated or not a LEAF JSON file, fetch or regenerate it") from None


def _fail(file: Path, problem: str, fix: str) -> DataFormatError:
    message = f"{file}: {problem}; {fix}"
    return DataFormatError(message.replace("\r", " ").replace("\n", " "))


def _check_structure(file: Path, doc: Any) -> list[tuple[str, list, list]]:
    """`[(user, x, y)]` in `users` order, after the checks that do not depend on the layout."""
    if not isinstance(doc, dict):
        raise _fail(file, f"the top-level JSON value is a {type(doc).__name__}, not an object",
                    _FIX_FORMAT)
    missing = [k for k in ("users", "num_samples", "user_data") if k not in doc]
    if missing:
        raise _fail(file, f"missing key(s) {', '.join(repr(k) for k in missing)}", _FIX_FORMAT)
    users, num_samples, user_data = doc["users"], doc["num_samples"], doc["user_data"]
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise _fail(file, "'users' is not a list of strings", _FIX_FORMAT)
    if not isinstance(num_samples, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in num_samples):
        raise _fail(file, "'num_samples' is not a list of non-negative integers", _FIX_FORMAT)
    if not isinstance(user_data, dict):
        raise _fail(file, "'user_data' is not an object", _FIX_FORMAT)
    if len(num_samples) != len(users):
        raise _fail(file, f"'users' lists {len(users)} users but 'num_samples' has "
                          f"{len(num_samples)} entries", "each user needs one count, in order")
    seen: set[str] = set()
    for u in users:
        if u in seen:
            raise _fail(file, f"user {u!r} is listed twice in 'users'",
                        "each user must appear once per file")
        seen.add(u)
    for u in users:
        if u not in user_data:
            raise _fail(file, f"user {u!r} is in 'users' but not in 'user_data'",
                        "'users' and the keys of 'user_data' must name the same users")
    for u in user_data:
        if u not in seen:
            raise _fail(file, f"user {u!r} is in 'user_data' but not in 'users'",
                        "'users' and the keys of 'user_data' must name the same users")
    out = []
    for u, n in zip(users, num_samples):
        entry = user_data[u]
        if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
            raise _fail(file, f"user {u!r}: user_data entry lacks 'x' or 'y'",
                        "each user_data entry is {\"x\": [...], \"y\": [...]}")
        x, y = entry["x"], entry["y"]
        if not isinstance(x, list) or not isinstance(y, list):
            raise _fail(file, f"user {u!r}: 'x' and 'y' must be lists",
                        "each user_data entry is {\"x\": [...], \"y\": [...]}")
        if len(x) != len(y):
            raise _fail(file, f"user {u!r}: x has {len(x)} examples but y has {len(y)} labels",
                        "x and y must have one entry per example")
        if n != len(x):
            raise _fail(file, f"user {u!r}: num_samples says {n} but x has {len(x)} examples",
                        "fix num_samples or regenerate the file")
        out.append((u, x, y))
    return out


def _detect(file: Path, records: list[tuple[str, list, list]]) -> str | None:
    for u, x, _ in records:
        if not x:
            continue
        first = x[0]
        if isinstance(first, str):
            return "shakespeare"
        if isinstance(first, list) and first:
            if any(isinstance(f, str) for f in first):
                return "sent140"
            if all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in first):
                return "femnist"
        raise _fail(file, f"cannot tell the LEAF layout from user {u!r}'s first x "
                          f"(a {type(first).__name__})",
                    f"pass layout= one of {', '.join(LAYOUTS)}")
    return None


def _femnist(file: Path, user: str, x: list, y: list) -> ClientArrays:
    n = len(x)
    try:
        pixels = np.asarray(x) if n else np.zeros((0, FEMNIST_PIXELS), np.float32)
    except (ValueError, TypeError):
        pixels = None
    if pixels is None or pixels.ndim != 2 or pixels.shape[1] != FEMNIST_PIXELS:
        for i, row in enumerate(x):
            if not isinstance(row, list) or len(row) != FEMNIST_PIXELS:
                got = f"{len(row)} values" if isinstance(row, list) else f"a {type(row).__name__}"
                raise _fail(file, f"user {user!r} example {i}: x has {got}, FEMNIST needs "
                                  f"{FEMNIST_PIXELS} (a flattened 28x28 image)",
                            "pass the right layout= or regenerate the file")
        raise _fail(file, f"user {user!r}: x is not a list of {FEMNIST_PIXELS} numbers per example",
                    "FEMNIST pixels are numbers k/255 in [0, 1]")
    if pixels.dtype.kind not in "fiu":
        raise _fail(file, f"user {user!r}: x holds {pixels.dtype} values, not numbers",
                    "FEMNIST pixels are numbers k/255 in [0, 1]")
    pixels = pixels.astype(np.float32, copy=False)
    if not np.all((pixels >= 0) & (pixels <= 1)):
        raise _fail(file, f"user {user!r}: x has pixel values outside [0, 1] (or NaN)",
                    "FEMNIST pixels are k/255 in [0, 1]; rescale the images")
    labels = _int_labels(file, user, y)
    if n and (labels.min() < 0 or labels.max() >= FEMNIST_CLASSES):
        raise _fail(file, f"user {user!r}: y has labels outside 0..{FEMNIST_CLASSES - 1}",
                    "FEMNIST has 62 classes (10 digits, 26 upper, 26 lower case)")
    return {"x": pixels.reshape(n, FEMNIST_SIDE, FEMNIST_SIDE), "y": labels}


def _int_labels(file: Path, user: str, y: list) -> np.ndarray:
    if not y:
        return np.zeros((0,), np.int32)
    try:
        arr = np.asarray(y)
        bad = arr.ndim != 1 or arr.dtype.kind not in "fiu" or (
            arr.dtype.kind == "f" and not np.all(arr == np.round(arr)))
    except (ValueError, TypeError):
        bad = True
    if bad:
        raise _fail(file, f"user {user!r}: y is not a list of integer labels",
                    "labels are integers, one per example")
    return arr.astype(np.int32)


def _text(file: Path, user: str, what: str, items: list) -> np.ndarray:
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise _fail(file, f"user {user!r} example {i}: {what} is a {type(s).__name__}, "
                              "not a string", "pass the right layout= or regenerate the file")
    return np.array([s.encode("utf-8") for s in items], dtype=np.bytes_) if items else \
        np.zeros((0,), "S1")


def _shakespeare(file: Path, user: str, x: list, y: list) -> ClientArrays:
    xs = _text(file, user, "x", x)
    for i, c in enumerate(y):
        if not isinstance(c, str) or len(c) != 1:
            raise _fail(file, f"user {user!r} example {i}: y is {c!r}, not one character",
                        "Shakespeare labels are the single next character")
    return {"x": xs, "y": _text(file, user, "y", y)}


def _as_int_label(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v)
    return None


def _sent140_label_map(file: Path, records: list[tuple[str, list, list]]) -> dict:
    """Raw label -> 0/1 for one file: 0/1 kept; raw polarities 0/2/4 mapped 4 -> 1, else 0."""
    numbers: dict[Any, int] = {}
    for u, _, y in records:
        for v in y:
            key = (type(v), v) if isinstance(v, (int, float, str)) else None
            if key in numbers:
                continue
            k = None if key is None else _as_int_label(v)
            if k is None:
                raise _fail(file, f"user {u!r}: label {v!r} is not 0/1 or a polarity 0/2/4",
                            "Sent140 labels are 0/1 (or raw polarities 0, 2, 4)")
            numbers[key] = k
    found = set(numbers.values())
    if found <= {0, 1}:
        return numbers
    if found <= {0, 2, 4}:
        return {key: int(k == 4) for key, k in numbers.items()}
    raise _fail(file, f"labels {sorted(found)} are neither 0/1 nor polarities 0/2/4",
                "Sent140 labels are 0/1 (or raw polarities 0, 2, 4)")


def _sent140(file: Path, user: str, x: list, y: list, label_map: dict) -> ClientArrays:
    texts = []
    for i, fields in enumerate(x):
        if (not isinstance(fields, list) or len(fields) <= SENT140_TEXT_FIELD
                or not isinstance(fields[SENT140_TEXT_FIELD], str)):
            raise _fail(file, f"user {user!r} example {i}: x is not a list of tweet fields with "
                              f"the text at index {SENT140_TEXT_FIELD}",
                        "LEAF Sent140 examples are [id, date, query, user, text, split]")
        texts.append(fields[SENT140_TEXT_FIELD])
    return {"x": _text(file, user, "the text", texts),
            "y": np.array([label_map[(type(v), v)] for v in y], np.int32)}


def load_leaf(path: str | os.PathLike, layout: Layout = "auto") -> InMemoryFederatedData:
    """Loads a LEAF JSON file, or a folder of shards, as one client per LEAF user.

    Args:
      path: a `.json` / `.json.gz` file, or a folder whose `*.json` and `*.json.gz` files
        (sorted by name, not recursive) are the shards of one split.
      layout: `"femnist"`, `"shakespeare"`, `"sent140"`, or `"auto"` to detect it from the
        first example (see the module docstring for the arrays each layout gives).

    Returns:
      `InMemoryFederatedData`, client ids = LEAF user ids, in file order then `users` order.
      `femnist`: `x` `float32 [n, 28, 28]` (values as stored), `y` `int32 [n]`.
      `shakespeare`: `x` and `y` `bytes_ [n]` (UTF-8). `sent140`: `x` `bytes_ [n]` (the tweet
      text, UTF-8), `y` `int32 [n]` in {0, 1}.

    Raises:
      FileNotFoundError: no such path, or a folder without LEAF files.
      DataFormatError: a malformed file (one line naming the file): not JSON or a truncated
        gzip, missing keys, `users` disagreeing with `user_data`, `num_samples` disagreeing
        with `x`, `x`/`y` lengths differing, wrong shapes (FEMNIST rows of 784 values), a
        user present in two files, or no example to detect the layout from.

    Example:
      >>> train = load_leaf("leaf/data/femnist/data/train")   # a folder of shards
      >>> train.get_client(0)["x"].shape, train.get_client(0)["y"].dtype
      ((155, 28, 28), dtype('int32'))

    References:
      Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018.
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {', '.join(LAYOUTS)}, got {layout!r}")
    files = leaf_files(path)
    clients: dict[str, ClientArrays | None] = {}
    origin: dict[str, Path] = {}
    chosen = None if layout == "auto" else layout
    for file in files:
        records = _check_structure(file, read_leaf_json(file))
        for u, _, _ in records:
            if u in origin:
                raise _fail(file, f"user {u!r} also appears in {origin[u]}",
                            "load one split at a time; a LEAF user lives in exactly one shard")
            origin[u] = file
        if chosen is None:
            chosen = _detect(file, records)
            if chosen is None:  # every user here is empty: keep the order, fill in at the end
                clients.update({u: None for u, _, _ in records})
                continue
        label_map = _sent140_label_map(file, records) if chosen == "sent140" else {}
        for u, x, y in records:
            if chosen == "femnist":
                clients[u] = _femnist(file, u, x, y)
            elif chosen == "shakespeare":
                clients[u] = _shakespeare(file, u, x, y)
            else:
                clients[u] = _sent140(file, u, x, y, label_map)
    if chosen is None:
        raise _fail(files[0], "no user has any example, so the layout cannot be detected",
                    f"pass layout= one of {', '.join(LAYOUTS)}")
    empty = _empty_client(chosen)
    return InMemoryFederatedData({u: (empty if c is None else c) for u, c in clients.items()})


def _empty_client(layout: str) -> ClientArrays:
    if layout == "femnist":
        return {"x": np.zeros((0, FEMNIST_SIDE, FEMNIST_SIDE), np.float32),
                "y": np.zeros((0,), np.int32)}
    if layout == "shakespeare":
        return {"x": np.zeros((0,), "S1"), "y": np.zeros((0,), "S1")}
    return {"x": np.zeros((0,), "S1"), "y": np.zeros((0,), np.int32)}
