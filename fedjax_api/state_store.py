"""A run's per-client store: where it lives (`--client-store`), and its checkpoints.

- `choose(...)`: the `StoreSpec` of a run: `--client-store device|host|disk`, or `auto`,
  which compares the population's rows (population x row bytes) with the free device and
  host memory (`fedjax_core.client_store.choose_backend`) and says why when it does not
  pick the device. The disk tables live in `RUN_DIR/client_store/` (a temporary folder
  without a run directory).
- `save_delta` / `restore`: checkpoints of a host or disk store are incremental. Each
  checkpoint first writes the rows changed since the previous one, with the position ->
  row map, to `RUN_DIR/client_store/deltas/delta-{round:08d}.npz` (atomically; no
  pickle), and lists every delta so far, with its size and sha256, in the checkpoint's
  manifest (`meta["client_store"]`). Resuming from round R applies the listed deltas in
  order (all of them are rounds <= R) and deletes the deltas of later rounds.

Example:
  >>> spec, note = choose("auto", "f32", state_shape, population=342_477, run_dir=out)
  >>> note   # "client store: disk (per-client state of 342477 clients x 16.00 MiB = ...)"
"""

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedjax_api import checkpoint
from fedjax_api.errors import ConfigError
from fedjax_core import atomic, client_store
from fedjax_core.client_store import HostStore, StoreSpec

STORE_DIR = "client_store"
DELTA_DIR = "deltas"
CHOICES = ("auto",) + client_store.BACKENDS
CHUNK_BYTES = 64 << 20
"""Bytes of rows a delta is written or read at a time."""
_DELTA_RE = re.compile(r"^delta-(\d{8})\.npz$")


def host_free_memory() -> int | None:
    """Bytes of host memory available (`MemAvailable` of /proc/meminfo), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_free_memory() -> int | None:
    """Free bytes of the first device (`bytes_limit - bytes_in_use`); on the CPU the free
    host memory (device arrays live there); None when the backend does not say."""
    if jax.default_backend() == "cpu":
        return host_free_memory()
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def choose(backend: str, dtype: str, state: Any, population: int, run_dir: Path | None,
           device_free: int | None = None, host_free: int | None = None,
           ) -> tuple[StoreSpec, str | None]:
    """The `StoreSpec` of a run, and a line to print when it is not the device store.

    Args:
      backend: "auto", "device", "host" or "disk".
      dtype: "f32" or "bf16".
      state: the algorithm's initial state, or its shape (`jax.eval_shape`).
      population: the training clients.
      run_dir: the run directory (the disk tables go in `run_dir/client_store/`), or None.
      device_free, host_free: free bytes (measured when None; for tests).

    Returns:
      `(spec, note)`; note is None for the device store.
    """
    if backend not in CHOICES:
        raise ConfigError(f"unknown client store {backend!r}; choose one of: {', '.join(CHOICES)}")
    if dtype not in client_store.DTYPES:
        raise ConfigError(f"unknown client store dtype {dtype!r}; choose one of: "
                          f"{', '.join(client_store.DTYPES)}")
    row = client_store.row_bytes(state, dtype)
    if row == 0:  # no per-client state: nothing to place
        return StoreSpec(), None
    reason = f"--client-store {backend}"
    if backend == "auto":
        choice = client_store.choose_backend(
            population, row,
            device_free_memory() if device_free is None else device_free,
            host_free_memory() if host_free is None else host_free)
        backend, reason = choice.backend, choice.reason
    if backend == "device":
        if dtype != "f32":
            raise ConfigError("--client-store-dtype bf16 needs --client-store host or disk (the "
                              "device store keeps the rows as the algorithm makes them)")
        return StoreSpec(), None
    directory = None if run_dir is None else Path(run_dir) / STORE_DIR
    return (StoreSpec(backend, dtype, directory),
            f"client store: {backend}{' (bf16 rows)' if dtype == 'bf16' else ''}: {reason}")


def saved_backend(run_dir: Path) -> tuple[str, str] | None:
    """`(backend, dtype)` of the client store recorded by the newest readable checkpoint
    of `run_dir` (None when none records one: a device store)."""
    for _, manifest in reversed(checkpoint.list_checkpoints(run_dir)):
        try:
            meta = json.loads(Path(manifest).read_text()).get("meta", {})
        except (OSError, ValueError):
            continue
        store = meta.get("client_store")
        return (store["backend"], store["dtype"]) if isinstance(store, dict) else None
    return None


def _delta_dir(run_dir: Path) -> Path:
    return atomic.make_dir(Path(run_dir) / STORE_DIR / DELTA_DIR, root=run_dir)


def save_delta(run_dir: Path, round_num: int, host: HostStore, version: int,
               previous: list[dict]) -> dict:
    """Writes the rows changed since the last delta (as of state `version`) and returns
    the manifest entry `{"backend", "dtype", "deltas": previous + [this one]}`.

    The delta is an `.npz` (numpy's format: `np.load(path, allow_pickle=False)` reads
    it) written a chunk of rows at a time, so it never sits in memory whole.

    Example:
      >>> meta["client_store"] = save_delta(run_dir, 20, host, version, listed)
    """
    arrays = host.delta(version)
    name = f"delta-{round_num:08d}.npz"
    path = _delta_dir(run_dir) / name
    with atomic.replace(path) as f:
        _write_npz(f, arrays)
    size, digest = checkpoint.file_digest(path)
    host.mark_saved(arrays["rows"])
    entry = {"round": round_num, "file": name, "bytes": size, "sha256": digest,
             "rows": int(arrays["rows"].shape[0])}
    kept = [d for d in previous if d["round"] < round_num]
    return {"backend": host.spec.backend, "dtype": host.spec.dtype, "deltas": kept + [entry]}


def _chunk_rows(row_shape: tuple, itemsize: int) -> int:
    """Rows per chunk when a delta is written or read: about `CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize))


def _write_npz(f, arrays: dict[str, Any]) -> None:
    """`np.savez`'s layout (stored zip members `NAME.npy`), with each `DeltaLeaf`
    written a chunk of rows at a time."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in arrays.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as out:
                if not isinstance(value, client_store.DeltaLeaf):
                    np.lib.format.write_array(out, np.asarray(value), allow_pickle=False)
                    continue
                np.lib.format.write_array_header_2_0(out, {
                    "descr": np.lib.format.dtype_to_descr(value.dtype),
                    "fortran_order": False, "shape": value.shape})
                n, step = value.shape[0], _chunk_rows(value.shape[1:], value.dtype.itemsize)
                for a in range(0, n, step):
                    chunk = np.ascontiguousarray(value.read(a, min(n, a + step)), value.dtype)
                    out.write(chunk.tobytes())


def _apply_npz(path: Path, host: HostStore) -> None:
    """Applies one delta file to `host`, a chunk of rows at a time."""
    with zipfile.ZipFile(path) as zf:
        small = {}
        for key in ("rows", "row_of", "size"):
            with zf.open(key + ".npy") as f:
                small[key] = np.lib.format.read_array(f, allow_pickle=False)
        size, rows = int(small["size"]), np.asarray(small["rows"], np.int64)
        host.apply_rows(size, None, rows[:0], np.zeros(0))
        for member in zf.namelist():
            key = member.removesuffix(".npy")
            if key in small:
                continue
            with zf.open(member) as f:
                major, _ = np.lib.format.read_magic(f)
                header = (np.lib.format.read_array_header_1_0 if major == 1
                          else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = header(f)
                if fortran or dtype.hasobject or not shape or shape[0] != rows.shape[0]:
                    raise ValueError(f"client store delta: {key} is not {rows.shape[0]} rows")
                step = _chunk_rows(shape[1:], dtype.itemsize)
                row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                for a in range(0, shape[0], step):
                    b = min(shape[0], a + step)
                    data = f.read((b - a) * row_bytes)
                    if len(data) != (b - a) * row_bytes:
                        raise ValueError(f"client store delta: {key} is truncated")
                    values = np.frombuffer(data, dtype).reshape((b - a,) + tuple(shape[1:]))
                    host.apply_rows(size, key, rows[a:b], values)
        host.apply_row_of(size, np.asarray(small["row_of"], np.int64))


def restore(run_dir: Path, round_num: int, host: HostStore, listed: dict) -> list[dict]:
    """Rebuilds `host` as of checkpoint `round_num` from the deltas `listed` (its
    manifest's `client_store`), checking each one's size and sha256, and deletes the
    deltas of later rounds. Returns the deltas (for the next `save_delta`)."""
    if listed.get("backend") != host.spec.backend or listed.get("dtype") != host.spec.dtype:
        raise checkpoint.CheckpointError(
            f"the checkpoint of round {round_num} in {str(run_dir)!r} holds a "
            f"{listed.get('backend')}/{listed.get('dtype')} client store, not "
            f"{host.spec.backend}/{host.spec.dtype}")
    folder = Path(run_dir) / STORE_DIR / DELTA_DIR
    deltas = [d for d in listed.get("deltas", []) if d["round"] <= round_num]
    for d in deltas:
        path = folder / d["file"]
        try:
            if path.is_symlink():
                raise OSError("is a link")
            size, digest = checkpoint.file_digest(path)
        except OSError as e:
            raise checkpoint.CheckpointError(
                f"client store delta {path} of the checkpoint of round {round_num} is "
                f"unreadable ({e}); the run cannot resume from it") from None
        if size != d["bytes"] or digest != d["sha256"]:
            raise checkpoint.CheckpointError(
                f"client store delta {path} is damaged (size or checksum mismatch); the "
                "run cannot resume from this checkpoint")
        try:
            _apply_npz(path, host)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise checkpoint.CheckpointError(
                f"client store delta {path} is unreadable ({e}); the run cannot resume "
                "from this checkpoint") from None
    host.restored(round_num)
    if folder.is_dir():
        for entry in os.scandir(folder):
            m = _DELTA_RE.match(entry.name)
            if m and int(m.group(1)) > round_num and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
    return deltas
