"""Checkpoints of a run: the state pytree in one `.npz`, committed by a JSON manifest.

Layout, under `RUN_DIR/checkpoints/`:

    ckpt-00000020.npz    every leaf of the state: `leaf_00000`, `leaf_00001`, ... (np.savez, no pickle)
    ckpt-00000020.json   the manifest, written last: its presence commits the checkpoint

The manifest holds the format version, the round, each leaf's name, shape and dtype (and,
for typed PRNG keys, the key implementation), the caller's `meta` (any JSON: config,
versions, metric history, sampler position, ...), the size and sha256 of the `.npz`, and
a sha256 of the manifest itself. Both files are written to new temporary files of random
names in the same folder (`fedjax_core.atomic`: never through a link), fsynced and
renamed, so a crash never leaves a half-written file under a final name; `load` verifies
everything and falls back to the newest checkpoint that is whole.

Example:
  >>> path = checkpoint.save(run_dir, 20, server.state, {"config": cfg.to_dict()})
  >>> round_num, state, meta = checkpoint.load(run_dir, template=server.state)
  >>> meta["skipped"]          # [] or e.g. ["ckpt-00000030: checksum mismatch"]
"""

import hashlib
import json
import operator
import os
import re
import warnings
import zipfile
import zlib
from contextlib import suppress
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_api.errors import ConfigError
from fedjax_api.versions import versions
from fedjax_core import atomic

PyTree = Any

CHECKPOINT_DIR = "checkpoints"
FORMAT = "fedjax-sim checkpoint"
FORMAT_VERSION = 1
KNOWN_VERSIONS = (1,)
RESERVED_META_KEYS = ("skipped",)

_MANIFEST_RE = re.compile(r"^ckpt-(\d{8})\.json$")
_NPZ_RE = re.compile(r"^ckpt-(\d{8})\.npz$")
_TMP_RE = re.compile(r"^\.ckpt-\d{8}\.(?:npz|json)\.tmp-")
_CHUNK = 1 << 20


class CheckpointError(ConfigError):
    """No usable checkpoint: one line naming the run dir (or file) and what is wrong."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped in favour of an older one."""


class _Invalid(Exception):
    """One checkpoint is unusable; the message is the reason (one line)."""


# ---------------------------------------------------------------------------- save

def save(run_dir: Path, round_num: int, state: PyTree, meta: dict, keep: int = 3) -> Path:
    """Writes the checkpoint of round `round_num` and keeps only the newest `keep`.

    Writes `run_dir/checkpoints/ckpt-{round:08d}.npz` (every leaf of `state`, as numpy
    arrays named `leaf_00000`, ...; typed PRNG keys as their `key_data`; ml_dtypes such
    as bfloat16 as raw unsigned integers of the same width) and then its manifest
    `ckpt-{round:08d}.json`, the commit marker. Each file goes to a temporary file in
    the same folder, is flushed and fsynced and renamed over its final name; the folder
    is fsynced after each rename. If anything fails, the temporary files (and the
    uncommitted `.npz`) are removed and the exception propagates; the checkpoints
    already there are untouched, except an earlier checkpoint of this same round,
    which is deleted first (manifest, then data).

    Afterwards deletes all but the newest `keep` complete checkpoints, the checkpoints of
    rounds after `round_num` (left by an attempt that this run rewound past: the one
    just written is always the newest), `.npz` files without a manifest and stale
    temporary files.

    Args:
      run_dir: the run directory; `checkpoints/` is created in it.
      round_num: rounds done, 0 <= round_num < 10**8.
      state: a pytree of arrays (JAX or numpy; numeric, bool, ml_dtypes or typed PRNG
        key dtypes).
      meta: a JSON-able dict stored in the manifest (numpy/JAX arrays become lists,
        numpy scalars Python numbers, paths strings; dict keys become strings). The key
        "skipped" is reserved for `load`.
      keep: how many complete checkpoints to keep, >= 1.

    Returns:
      The manifest's path.

    Example:
      >>> checkpoint.save(run_dir, server.round, server.state,
      ...                 {"config": cfg.to_dict(), "history": records})
      PosixPath('runs/x/checkpoints/ckpt-00000020.json')
    """
    round_num = operator.index(round_num)
    if not 0 <= round_num < 10**8:
        raise ValueError(f"round_num must be in [0, 10**8), got {round_num}")
    keep = operator.index(keep)
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    meta = _normalise_meta(meta)

    leaves, treedef = jax.tree.flatten(state)
    arrays, entries = {}, []
    for i, leaf in enumerate(leaves):
        name = f"leaf_{i:05d}"
        stored, entry = _encode(name, leaf)
        arrays[name] = stored
        entries.append({"name": name, **entry})

    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    try:
        atomic.make_dir(ckpt_dir, root=run_dir)  # never a planted link to elsewhere
    except atomic.LinkRefused as e:
        raise CheckpointError(str(e)) from None
    stem = f"ckpt-{round_num:08d}"
    npz_path, manifest_path = ckpt_dir / f"{stem}.npz", ckpt_dir / f"{stem}.json"
    npz_tmp, manifest_tmp = atomic.temp_path(npz_path), atomic.temp_path(manifest_path)

    if manifest_path.exists() or npz_path.exists():   # an earlier try of this round:
        manifest_path.unlink(missing_ok=True)           # uncommit it, then drop its data
        npz_path.unlink(missing_ok=True)
        atomic.fsync_dir(ckpt_dir)

    npz_renamed = committed = False
    try:
        with atomic.create(npz_tmp) as f:
            np.savez(f, allow_pickle=False, **arrays)
            f.flush()
            os.fsync(f.fileno())
        size, sha256 = file_digest(npz_tmp)
        os.replace(npz_tmp, npz_path)
        npz_renamed = True
        atomic.fsync_dir(ckpt_dir)

        body = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "round": round_num,
            "npz": {"file": npz_path.name, "size": size, "sha256": sha256},
            "leaves": entries,
            "treedef": str(treedef),
            "written_by": versions(),
            "meta": meta,
        }
        manifest = {**body, "manifest_sha256": _manifest_digest(body)}
        with atomic.create(manifest_tmp, binary=False, encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=1, sort_keys=True, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(manifest_tmp, manifest_path)
        committed = True
        atomic.fsync_dir(ckpt_dir)
    finally:
        for p in (npz_tmp, manifest_tmp):
            with suppress(OSError):
                p.unlink(missing_ok=True)
        if npz_renamed and not committed:
            with suppress(OSError):
                npz_path.unlink(missing_ok=True)

    _prune(ckpt_dir, round_num, keep)
    return manifest_path


def _encode(name: str, leaf) -> tuple[np.ndarray, dict]:
    """The array stored for one leaf and its manifest entry."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        stored = np.asarray(jax.random.key_data(leaf))
        return stored, {"shape": list(stored.shape), "dtype": str(dtype),
                        "stored_dtype": stored.dtype.str, "key": str(jax.random.key_impl(leaf)),
                        "weak": False}
    arr = np.asarray(leaf)
    if arr.dtype.isbuiltin == 2 and arr.dtype.itemsize in (1, 2, 4, 8):
        # ml_dtypes (bfloat16, float8_*, int4, ...): np.save would write them as raw
        # void; keep the bits as unsigned ints and the name to view them back.
        try:
            same = jnp.dtype(str(arr.dtype)) == arr.dtype
        except TypeError:
            same = False
        if not same:
            raise TypeError(f"{name} has dtype {arr.dtype}, which a checkpoint cannot "
                            "restore by name")
        stored = arr.view(f"u{arr.dtype.itemsize}")
    elif arr.dtype.isbuiltin != 2 and arr.dtype.kind in "biufc":
        stored = arr
    else:
        raise TypeError(f"{name} has dtype {arr.dtype}; a checkpoint holds numeric, bool "
                        "and PRNG key arrays only")
    return stored, {"shape": list(stored.shape), "dtype": str(arr.dtype),
                    "stored_dtype": stored.dtype.str, "key": None,
                    "weak": bool(getattr(leaf, "weak_type", False))}


def _normalise_meta(meta: dict) -> dict:
    """`meta` as it will read back from JSON (so `load` returns exactly this)."""
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    for key in RESERVED_META_KEYS:
        if key in meta:
            raise ValueError(f"meta key {key!r} is reserved for load()")
    return json.loads(json.dumps(meta, default=_jsonable, allow_nan=True))


def _jsonable(x):
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            raise TypeError("meta cannot hold PRNG keys; put them in the state")
        return np.asarray(x).tolist()
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    raise TypeError(f"meta holds a {type(x).__name__}, which is not JSON")


def file_digest(path: Path) -> tuple[int, str]:
    """`(bytes, sha256 hex)` of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _manifest_digest(body: dict) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _prune(ckpt_dir: Path, newest: int, keep: int) -> None:
    found = _scan(ckpt_dir)
    current = [(r, p) for r, p in found if r <= newest]
    kept = {r for r, _ in current[-keep:]}
    doomed = [p for r, p in found if r not in kept]
    try:
        for manifest in doomed:                      # uncommit first, then the data
            manifest.unlink(missing_ok=True)
            manifest.with_suffix(".npz").unlink(missing_ok=True)
        for entry in os.scandir(ckpt_dir):
            m = _NPZ_RE.match(entry.name)
            if (m and int(m.group(1)) not in kept) or _TMP_RE.match(entry.name):
                Path(entry.path).unlink(missing_ok=True)
    except OSError as e:
        warnings.warn(f"could not delete old checkpoints in {ckpt_dir}: {e}",
                      CheckpointWarning, stacklevel=3)
    atomic.fsync_dir(ckpt_dir)


# ---------------------------------------------------------------------------- list

def _checkpoint_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    sub = run_dir / CHECKPOINT_DIR
    if not sub.is_dir() and run_dir.name == CHECKPOINT_DIR:
        return run_dir                 # given the checkpoints folder itself
    return sub


def _scan(ckpt_dir: Path) -> list[tuple[int, Path]]:
    try:
        names = os.listdir(ckpt_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(m.group(1)), ckpt_dir / name)
             for name in names if (m := _MANIFEST_RE.match(name))]
    return sorted(found)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The committed checkpoints of a run (those with a manifest), `[(round,
    manifest_path)]`, oldest first, newest last. Nothing is verified here: `load` does.

    Example:
      >>> checkpoint.list_checkpoints("runs/x")
      [(10, PosixPath('runs/x/checkpoints/ckpt-00000010.json')), (20, ...)]
    """
    return _scan(_checkpoint_dir(run_dir))


# ---------------------------------------------------------------------------- load

def load(path_or_run_dir, template: PyTree) -> tuple[int, PyTree, dict]:
    """Reads a checkpoint back into the structure of `template`.

    Given a manifest path (or its `.npz`), reads that checkpoint; given a run directory,
    reads its newest GOOD checkpoint: one whose manifest parses, has a known version and
    its own checksum right, whose `.npz` has the recorded size and sha256 and holds
    exactly the arrays the manifest lists, and whose leaves match `template` in number
    and dtype. Shapes may differ from the template's (per-client stores grow); the
    template gives the tree structure. Damaged checkpoints are skipped with a
    `CheckpointWarning` and listed in `meta["skipped"]`.

    Args:
      path_or_run_dir: a run directory, its `checkpoints/` folder, or one manifest.
      template: a pytree of the state's structure (arrays, or `jax.ShapeDtypeStruct`s),
        e.g. a freshly initialised state.

    Returns:
      `(round, state, meta)`: the state has `jnp` arrays (typed PRNG keys wrapped back
      with their implementation; 64-bit leaves stay numpy arrays when JAX runs without
      x64, so no bits are lost); `meta` is what `save` was given, plus `meta["skipped"]`,
      the reasons the newer checkpoints were skipped, e.g.
      `["ckpt-00000020: checksum mismatch"]` (empty when none was).

    Raises:
      CheckpointError: no checkpoint, or none is good: one line naming the run dir and
        each checkpoint's problem, e.g.
        `no valid checkpoint in runs/x (ckpt-00000020: checksum mismatch)`.
    """
    path = Path(path_or_run_dir)
    t_leaves, treedef = jax.tree.flatten(template)
    expected = [_dtype_name(x) for x in t_leaves]

    if not path.is_dir():
        if path.suffix == ".npz":
            path = path.with_suffix(".json")
        m = _MANIFEST_RE.match(path.name)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint {path}: no such file; give a run "
                                  "directory or a checkpoints/ckpt-*.json manifest")
        if not m:
            raise CheckpointError(f"{path} is not a checkpoint manifest (ckpt-NNNNNNNN.json)")
        try:
            state, meta = _read(path, int(m.group(1)), expected, treedef)
        except _Invalid as e:
            raise CheckpointError(f"invalid checkpoint {path} ({e})") from None
        meta["skipped"] = []
        return int(m.group(1)), state, meta

    ckpt_dir = _checkpoint_dir(path)
    found = _scan(ckpt_dir)
    if not found:
        raise CheckpointError(f"no checkpoint in {path}: {ckpt_dir} holds no "
                              "ckpt-*.json; start the run again")
    skipped = []
    for round_num, manifest in reversed(found):
        try:
            state, meta = _read(manifest, round_num, expected, treedef)
        except _Invalid as e:
            skipped.append(f"{manifest.stem}: {e}")
            warnings.warn(f"skipping damaged checkpoint {manifest} ({e})",
                          CheckpointWarning, stacklevel=2)
            continue
        meta["skipped"] = skipped
        return round_num, state, meta
    raise CheckpointError(f"no valid checkpoint in {path} ({'; '.join(skipped)})")


def _dtype_name(x) -> str:
    dtype = getattr(x, "dtype", None)
    return str(dtype if dtype is not None else np.asarray(x).dtype)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _read(manifest_path: Path, round_num: int, expected: list[str], treedef):
    """`(state, meta)` of one checkpoint, or `_Invalid(reason)`."""
    try:
        raw = manifest_path.read_bytes()
    except OSError as e:
        raise _Invalid(f"manifest unreadable ({_one_line(e)})") from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Invalid("manifest is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _Invalid("not a fedjax-sim checkpoint manifest")
    version = manifest.get("version")
    if type(version) is not int or version not in KNOWN_VERSIONS:
        raise _Invalid(f"unknown format version {version!r} (this fedjax-sim reads "
                       f"{', '.join(map(str, KNOWN_VERSIONS))})")
    claimed = manifest.pop("manifest_sha256", None)
    if claimed != _manifest_digest(manifest):
        raise _Invalid("manifest checksum mismatch")
    try:
        return _read_verified(manifest_path, manifest, round_num, expected, treedef)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise _Invalid(f"manifest malformed ({_one_line(e)})") from None


def _read_verified(manifest_path: Path, manifest: dict, round_num: int,
                   expected: list[str], treedef):
    if type(manifest["round"]) is not int or manifest["round"] != round_num:
        raise _Invalid(f"manifest says round {manifest['round']!r}, its name {round_num}")
    meta = manifest["meta"]
    if not isinstance(meta, dict):
        raise _Invalid("manifest meta is not an object")
    npz = manifest["npz"]
    if npz["file"] != manifest_path.with_suffix(".npz").name:
        raise _Invalid(f"manifest names another data file {npz['file']!r}")
    entries = manifest["leaves"]
    if len(entries) != len(expected):
        raise _Invalid(f"{len(entries)} leaves, the template has {len(expected)}")
    for i, (entry, want) in enumerate(zip(entries, expected)):
        if entry["name"] != f"leaf_{i:05d}":
            raise _Invalid(f"leaf {i} is named {entry['name']!r}")
        if entry["dtype"] != want:
            raise _Invalid(f"{entry['name']} is {entry['dtype']}, the template's is {want}")

    npz_path = manifest_path.with_suffix(".npz")
    try:
        size, sha256 = file_digest(npz_path)
    except FileNotFoundError:
        raise _Invalid(f"missing {npz_path.name}") from None
    except OSError as e:
        raise _Invalid(f"{npz_path.name} unreadable ({_one_line(e)})") from None
    if size != npz["size"]:
        raise _Invalid(f"{npz_path.name} has {size} bytes, the manifest says {npz['size']} "
                       "(truncated or overwritten)")
    if sha256 != npz["sha256"]:
        raise _Invalid("checksum mismatch")

    names = [e["name"] for e in entries]
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            if len(z.files) != len(names) or set(z.files) != set(names):
                raise _Invalid(f"{npz_path.name} holds other arrays than its manifest lists")
            stored = [z[n] for n in names]
    except _Invalid:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise _Invalid(f"{npz_path.name} unreadable ({_one_line(e)})") from None

    leaves = []
    for entry, arr in zip(entries, stored):
        if arr.dtype.str != entry["stored_dtype"] or list(arr.shape) != entry["shape"]:
            raise _Invalid(f"{entry['name']} is {arr.dtype.str}{list(arr.shape)}, the "
                           f"manifest says {entry['stored_dtype']}{entry['shape']}")
        leaves.append(_decode(entry, arr))
    return jax.tree.unflatten(treedef, leaves), meta


def _decode(entry: dict, arr: np.ndarray):
    if entry["key"] is not None:
        try:
            key = jax.random.wrap_key_data(jnp.asarray(arr), impl=entry["key"])
        except (TypeError, ValueError) as e:
            raise _Invalid(f"{entry['name']}: bad {entry['key']} key data "
                           f"({_one_line(e)})") from None
        if str(key.dtype) != entry["dtype"]:
            raise _Invalid(f"{entry['name']} is {key.dtype}, the manifest says {entry['dtype']}")
        return key
    if arr.dtype.name != entry["dtype"]:               # an ml_dtype kept as raw bits
        try:
            arr = arr.view(jnp.dtype(entry["dtype"]))
        except TypeError as e:
            raise _Invalid(f"{entry['name']}: unknown dtype {entry['dtype']!r} "
                           f"({_one_line(e)})") from None
    if jax.dtypes.canonicalize_dtype(arr.dtype) != arr.dtype:
        return arr                          # e.g. int64 without jax_enable_x64: keep the bits
    out = jnp.asarray(arr)
    return _weakly_typed(out) if entry["weak"] else out


def _weakly_typed(x: jax.Array) -> jax.Array:
    """`x` marked weakly typed, as the saved leaf was (a Python scalar's promotion rules);
    left strong if this JAX has no way to say so."""
    try:
        from jax._src.lax.lax import _convert_element_type
        out = _convert_element_type(x, x.dtype, weak_type=True)
    except Exception:  # noqa: BLE001 - private API; being strong only costs a retrace
        return x
    return out if isinstance(out, jax.Array) and getattr(out, "weak_type", False) else x
