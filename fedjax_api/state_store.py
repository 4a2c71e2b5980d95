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

import hashlib
import io
import json
import os
import re
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

    Example:
      >>> meta["client_store"] = save_delta(run_dir, 20, host, version, listed)
    """
    arrays = host.delta(version)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # pyright: ignore[reportArgumentType]
    data = buf.getvalue()
    name = f"delta-{round_num:08d}.npz"
    atomic.write_bytes(_delta_dir(run_dir) / name, data)
    host.mark_saved(arrays["rows"])
    entry = {"round": round_num, "file": name, "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest(), "rows": int(arrays["rows"].shape[0])}
    kept = [d for d in previous if d["round"] < round_num]
    return {"backend": host.spec.backend, "dtype": host.spec.dtype, "deltas": kept + [entry]}


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
            data = path.read_bytes()
        except OSError as e:
            raise checkpoint.CheckpointError(
                f"client store delta {path} of the checkpoint of round {round_num} is "
                f"unreadable ({e}); the run cannot resume from it") from None
        if len(data) != d["bytes"] or hashlib.sha256(data).hexdigest() != d["sha256"]:
            raise checkpoint.CheckpointError(
                f"client store delta {path} is damaged (size or checksum mismatch); the "
                "run cannot resume from this checkpoint")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            host.apply_delta({k: z[k] for k in z.files})
    host.restored(round_num)
    if folder.is_dir():
        for entry in os.scandir(folder):
            m = _DELTA_RE.match(entry.name)
            if m and int(m.group(1)) > round_num and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
    return deltas
