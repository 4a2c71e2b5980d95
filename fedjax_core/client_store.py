"""Where per-client state lives: device memory (default), host memory, or a file on disk.

`fedjax_core.client_state` keeps every `ClientStore` of an algorithm's state (SCAFFOLD's
controls, Ditto's personal models, top-k error feedback, persistent attackers) on the
device, one row per client seen. That stops at a few thousand clients for a real model
(16 MB a row for the Stack Overflow LSTM). This module keeps the rows elsewhere:

- "device": as `client_state` does (the default; nothing here is involved);
- "host": one numpy table per store leaf, in host memory;
- "disk": one file per store leaf, in a folder we create (the run directory's
  `client_store/`), like pfl-research's `DiskUserStateStorage`. Rows are read and written
  with `pread`/`pwrite` (`FileTable`), not memory-mapped: the kernel's page cache holds
  the recent ones, and none of them count towards the process's resident memory.

`attach(state, spec)` moves a state's stores to a `HostStore`: in the state, each
`ClientStore` then holds a leafless `HostRows` and the `ClientIndex` becomes a leafless
`HostIndex` (so the state's arrays, its checkpoints and `jax.tree` maps no longer carry
the rows). The jitted round is unchanged: before each round, `HostStore.step` hands it a
cohort-sized state whose stores hold only the cohort's rows (each distinct client once)
and whose `ClientIndex` covers remapped cohort-local positions, so the round's shapes
depend on the cohort size only. After dispatching the round, the rows of the previous
round are written back to the host tables (they are on the device, and the next round's
rows that the previous round rewrote are taken from there: no wait for it). The rows of
the newest round stay on the device until the next step, or until `view` (evaluation,
checkpoints) commits them.

Rows are assigned exactly as the device store assigns them (first appearance, cohort
slot order), and per-client randomness is keyed by that population-wide row
(`client_state.key_rows`), so every backend gives the device store's numbers.

A server's state is a view of the host tables at its version (rounds stepped). Stepping
the same host-backed state twice, or reading a state older than the tables, raises
`StaleStoreError`: keep the newest server, as the training loop does.

Options: `StoreSpec(dtype="bf16")` keeps float rows in bfloat16 (half the bytes; the
rounds still compute in float32 and the rows are rounded when stored; docs/scaling.md
gives the measured error).

Example:
  >>> state = attach(alg.init(params), StoreSpec("disk", directory="runs/x/client_store"))
  >>> step = jit_round(alg, model)          # the same call: it sees the host store
  >>> state, metrics = step(state, cohort, key)
"""

import os
import threading
from pathlib import Path
from time import perf_counter as _now
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fedjax_core import atomic
from fedjax_core.client_state import (
    MIN_CAPACITY,
    NO_ROW,
    ClientIndex,
    ClientStore,
    capacity_for,
)
from fedjax_core.typing import PyTree

BACKENDS = ("device", "host", "disk")
"""Where the rows live (`--client-store`; "auto" chooses among them: `choose_backend`)."""

DTYPES = ("f32", "bf16")
"""How float rows are kept (`--client-store-dtype`)."""

FILE_PREFIX = "store"
"""Disk tables are `DIR/store{k}-leaf{j}.bin` (store k of the state, leaf j of its row)."""


class StaleStoreError(RuntimeError):
    """A host-backed state older than its host tables was stepped or read."""


class StoreSpec(NamedTuple):
    """Where and how to keep per-client rows.

    Attributes:
      backend: "device", "host" or "disk" (`BACKENDS`).
      dtype: "f32" (rows as the algorithm made them) or "bf16" (float leaves kept in
        bfloat16).
      directory: the disk backend's folder (created; our files in it are replaced);
        None: a new temporary folder.
    """

    backend: str = "device"
    dtype: str = "f32"
    directory: str | os.PathLike | None = None


@jax.tree_util.register_pytree_node_class
class HostIndex:
    """In a host-backed state, where the `ClientIndex` was: no arrays; the `HostStore`
    and the state's version (rounds stepped since `attach` or a restore)."""

    def __init__(self, host: "HostStore", version: int):
        self.host, self.version = host, version

    def tree_flatten(self):
        return (), (self.host, self.version)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*aux)

    def __repr__(self) -> str:  # stable in a checkpoint manifest's treedef
        return f"HostIndex({self.host.spec.backend})"


@jax.tree_util.register_pytree_node_class
class HostRows:
    """In a host-backed state, a `ClientStore`'s rows: no arrays; store `k` of the
    `HostStore`."""

    def __init__(self, host: "HostStore", k: int):
        self.host, self.k = host, k

    def tree_flatten(self):
        return (), (self.host, self.k)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*aux)

    def __repr__(self) -> str:
        return f"HostRows({self.k})"


def _is_store(x) -> bool:
    return isinstance(x, ClientStore)


def _is_index(x) -> bool:
    return isinstance(x, (ClientIndex, HostIndex))


def _stores(state: PyTree) -> list[ClientStore]:
    return [x for x in jax.tree.leaves(state, is_leaf=_is_store) if _is_store(x)]


def _replace(state: PyTree, index_fn: Callable, store_fn: Callable) -> PyTree:
    """`state` with its index node mapped by `index_fn` and its k-th store by
    `store_fn(k, store)` (in `jax.tree` order)."""
    count = iter(range(1 << 30))

    def one(x):
        if _is_store(x):
            return store_fn(next(count), x)
        if _is_index(x):
            return index_fn(x)
        return x
    return jax.tree.map(one, state, is_leaf=lambda x: _is_store(x) or _is_index(x))


def host_index(state: PyTree) -> HostIndex | None:
    """The state's `HostIndex`, or None for a device-backed (or stateless) state."""
    found = [x for x in jax.tree.leaves(state, is_leaf=_is_index) if isinstance(x, HostIndex)]
    return found[0] if found else None


def is_hosted(state: PyTree) -> bool:
    """Whether `state`'s per-client stores live in a `HostStore` (host or disk)."""
    return host_index(state) is not None


def row_bytes(state: PyTree, dtype: str = "f32") -> int:
    """Bytes of one client's row over every `ClientStore` of `state` (kept as `dtype`).

    Example:
      >>> row_bytes(jax.eval_shape(scaffold(0.1, 1.0).init, params))   # 4 x params
    """
    total = 0
    for store in _stores(state):
        for leaf in jax.tree.leaves(store.rows):
            d = np.dtype(leaf.dtype)
            item = 2 if dtype == "bf16" and np.issubdtype(d, np.floating) else d.itemsize
            total += item * int(np.prod(leaf.shape[1:], dtype=np.int64))
    return total


class Choice(NamedTuple):
    """`choose_backend`'s answer: the backend and one line saying why."""

    backend: str
    reason: str


DEVICE_FRACTION = 0.25
"""The device store is chosen when the whole population's rows take at most this share of
the free device memory (the rest trains the cohort)."""

HOST_FRACTION = 0.5
"""The host store is chosen when the population's rows take at most this share of the
free host memory; otherwise the disk."""


def choose_backend(population: int, row_nbytes: int, device_free: int | None,
                   host_free: int | None) -> Choice:
    """`--client-store auto`: where a population's rows fit comfortably.

    Rule, with `F = population x row_nbytes` (every client's row, the most a run keeps):
    "device" when `F <= DEVICE_FRACTION x device_free` (on a CPU backend, device memory is
    host memory: `device_free` is the free host memory); else "host" when
    `F <= HOST_FRACTION x host_free`; else "disk". An unknown free memory (None) counts as
    not enough.

    Args:
      population: the number of training clients.
      row_nbytes: one client's row bytes (`row_bytes`).
      device_free, host_free: free bytes, or None when unknown.

    Returns:
      A `Choice`.

    Example:
      >>> choose_backend(342_477, 16 << 20, device_free=80 << 30, host_free=64 << 30)
      Choice(backend='disk', reason='...')
    """
    need = population * row_nbytes
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    if device_free is not None and need <= DEVICE_FRACTION * device_free:
        return Choice("device", f"per-client state {gib(need)} fits the device "
                                f"({gib(device_free)} free)")
    row = (f"{row_nbytes / 2**20:.2f} MiB" if row_nbytes >= 2**20
           else f"{row_nbytes / 2**10:.1f} KiB")
    where = f"per-client state of {population} clients x {row} = {gib(need)}"
    dev = "unknown" if device_free is None else gib(device_free)
    if host_free is not None and need <= HOST_FRACTION * host_free:
        return Choice("host", f"{where} exceeds {DEVICE_FRACTION:.0%} of free device memory "
                              f"({dev}); keeping it in host memory ({gib(host_free)} free)")
    host = "unknown" if host_free is None else gib(host_free)
    return Choice("disk", f"{where} exceeds {DEVICE_FRACTION:.0%} of free device memory "
                          f"({dev}) and {HOST_FRACTION:.0%} of free host memory ({host}); "
                          "keeping it in a file on disk")


class _Pending(NamedTuple):
    """A dispatched round's rows, still on the device: `tables[k]` is store k's
    cohort-sized table; local row j < `len(rows)` is population row `rows[j]`."""

    version: int
    tables: list
    rows: np.ndarray


class DeltaLeaf(NamedTuple):
    """One table's rows of a checkpoint delta, read on demand (`HostStore.delta`).

    Attributes:
      shape: `(rows, *row shape)`.
      dtype: the stored dtype (bfloat16 rows as uint16 bits).
      read: `read(a, b)` -> the delta's rows a..b-1, `[b - a, *row shape]`.
    """

    shape: tuple
    dtype: np.dtype
    read: Callable[[int, int], np.ndarray]


@jax.jit
def _patch(host_part, previous, src, use):
    """Rows `src[i]` of `previous` where `use[i]`, else `host_part`'s (exact selection)."""
    picked = previous[jnp.clip(src, 0, previous.shape[0] - 1)]
    mask = use.reshape(use.shape + (1,) * (host_part.ndim - 1))
    return jnp.where(mask, picked.astype(host_part.dtype), host_part)


class FileTable:
    """A table of rows `[rows, *shape]` of `dtype` kept in a file: row r is the bytes at
    `r * row_bytes`. Indexing with a row or an integer array of rows reads them
    (`os.preadv`); assigning writes them (`os.pwrite`). Nothing is mapped into the
    process, so a table far larger than memory costs no resident memory; `resize`
    changes the number of rows (a sparse file: rows never written take no disk and read
    as zeros).

    Example:
      >>> t = FileTable(fd, rows=8, shape=(3,), dtype=np.float32)
      >>> t[np.array([2, 5])] = np.ones((2, 3), np.float32); t[5]
      array([1., 1., 1.], dtype=float32)
    """

    def __init__(self, fd: int, rows: int, shape: tuple, dtype: np.dtype):
        self.fd, self.dtype = fd, np.dtype(dtype)
        self.row_shape = tuple(shape)
        self.row_bytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        self.rows = 0
        self.resize(rows)

    @property
    def shape(self) -> tuple:
        return (self.rows,) + self.row_shape

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def resize(self, rows: int) -> None:
        """Makes the file hold `rows` rows (new rows read as zeros)."""
        os.ftruncate(self.fd, max(rows * self.row_bytes, 1))
        self.rows = rows

    def _rows(self, index) -> tuple[np.ndarray, bool]:
        idx = np.asarray(index, np.int64)
        if idx.ndim > 1 or np.any((idx < 0) | (idx >= self.rows)):
            raise IndexError(f"rows {index!r} of a {self.rows}-row file table")
        return idx.reshape(-1), idx.ndim == 0

    def __getitem__(self, index) -> np.ndarray:
        rows, scalar = self._rows(index)
        out = np.empty((rows.shape[0],) + self.row_shape, self.dtype)
        flat = out.reshape(rows.shape[0], -1).view(np.uint8)
        for i, r in enumerate(rows.tolist()):
            view, done = memoryview(flat[i]), 0
            while done < self.row_bytes:
                n = os.preadv(self.fd, [view[done:]], r * self.row_bytes + done)
                if n <= 0:
                    raise OSError(f"client store file ends inside row {r}")
                done += n
        return out[0] if scalar else out

    def __setitem__(self, index, values) -> None:
        rows, _ = self._rows(index)
        values = np.ascontiguousarray(np.broadcast_to(
            np.asarray(values).astype(self.dtype, copy=False),
            (rows.shape[0],) + self.row_shape))
        flat = values.reshape(rows.shape[0], -1).view(np.uint8)
        for i, r in enumerate(rows.tolist()):
            view, done = memoryview(flat[i]), 0
            while done < self.row_bytes:
                done += os.pwrite(self.fd, view[done:], r * self.row_bytes + done)


def _copy_rows(dst: Any, dst_rows: np.ndarray, src: Any, src_rows: np.ndarray) -> None:
    """`dst[dst_rows[i]] = src[src_rows[i]]` (cast to dst's dtype; numpy arrays or
    `FileTable`s), one row at a time in the order of `dst_rows` (sequential in a file): a plain copy per row,
    no fancy-index temporaries of the whole cohort."""
    for i in np.argsort(dst_rows, kind="stable"):
        dst[dst_rows[i]] = src[src_rows[i]]


def _round_bf16(x):
    return x.astype(jnp.bfloat16).astype(x.dtype)


class HostStore:
    """The rows of every `ClientStore` of a state, in host memory or files on disk,
    with the host-side position -> row map. Made by `attach`; see the module docstring.

    Attributes:
      spec: the `StoreSpec`.
      size: rows in use (clients seen, as of the newest step).
      capacity: rows the tables hold (doubling).
      committed: the version the tables hold.
      gather_s, scatter_s: host seconds spent gathering rows for rounds and writing
        them back (for measurements).
    """

    def __init__(self, stores: list[ClientStore], spec: StoreSpec):
        if spec.backend not in ("host", "disk"):
            raise ValueError(f"a HostStore keeps rows on the host or disk, not {spec.backend!r}")
        if spec.dtype not in DTYPES:
            raise ValueError(f"unknown client store dtype {spec.dtype!r}; choose one of: "
                             f"{', '.join(DTYPES)}")
        self.spec = spec
        self.treedefs, self.shapes, self.dtypes, self.host_dtypes = [], [], [], []
        for store in stores:
            leaves, treedef = jax.tree.flatten(store.rows)
            self.treedefs.append(treedef)
            self.shapes.append([tuple(x.shape[1:]) for x in leaves])
            self.dtypes.append([np.dtype(x.dtype) for x in leaves])
            self.host_dtypes.append([self._host_dtype(np.dtype(x.dtype)) for x in leaves])
        self.row_of = np.full(MIN_CAPACITY, -1, np.int64)
        self.size = 0
        self.capacity = 0
        self.committed = 0
        self.sizes: dict[int, int] = {0: 0}  # rows in use after each recent version
        self.dirty = np.zeros(0, bool)
        self.pending: _Pending | None = None
        self.gather_s = self.scatter_s = 0.0
        self.checkpoints: list[dict] = []  # the deltas written so far (fedjax_api.state_store)
        self._lock = threading.Lock()
        self._files: list[list[Any]] = []
        self.tables: list[list[Any]] = [[] for _ in stores]  # numpy arrays or FileTables
        self.directory: Path | None = None
        if spec.backend == "disk":
            self.directory = _make_store_dir(spec.directory)
        self._grow(MIN_CAPACITY)

    def _host_dtype(self, d: np.dtype) -> np.dtype:
        if self.spec.dtype == "bf16" and np.issubdtype(d, np.floating):
            return np.dtype(ml_dtypes.bfloat16)
        return d

    # ------------------------------------------------------------------ tables

    def _grow(self, rows: int) -> None:
        """Tables (and the dirty mask) with room for `rows` rows (capacity doubling)."""
        if rows <= self.capacity:
            return
        cap = capacity_for(rows)
        for k in range(len(self.treedefs)):
            for j, (shape, dtype) in enumerate(zip(self.shapes[k], self.host_dtypes[k])):
                if self.spec.backend == "disk":
                    self._grow_file(k, j, cap, shape, dtype)
                else:
                    table = np.zeros((cap,) + shape, dtype)
                    if self.capacity:
                        table[:self.capacity] = self.tables[k][j]
                    if j < len(self.tables[k]):
                        self.tables[k][j] = table
                    else:
                        self.tables[k].append(table)
        self.dirty = np.concatenate([self.dirty, np.zeros(cap - self.capacity, bool)])
        self.capacity = cap

    def _grow_file(self, k: int, j: int, cap: int, shape: tuple, dtype: np.dtype) -> None:
        assert self.directory is not None
        if j < len(self.tables[k]):
            self.tables[k][j].resize(cap)  # rows keep their offsets: nothing is copied
            return
        f = atomic.create(self.directory / f"{FILE_PREFIX}{k}-leaf{j}.bin")  # ours, no link
        f.close()
        fd = os.open(self.directory / f"{FILE_PREFIX}{k}-leaf{j}.bin",
                     os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        handle = os.fdopen(fd, "r+b")
        while len(self._files) <= k:
            self._files.append([])
        self._files[k].append(handle)
        self.tables[k].append(FileTable(handle.fileno(), cap, shape, dtype))

    def close(self) -> None:
        """Flushes and closes the disk tables (the files stay)."""
        for files in self._files:
            for f in files:
                f.close()
        self._files = []

    def nbytes(self) -> int:
        """Bytes of the tables (their capacity)."""
        return sum(int(t.nbytes) for ts in self.tables for t in ts)

    # ------------------------------------------------------------------ rounds

    def _assign(self, positions: np.ndarray):
        """Population rows for a cohort, as `client_state.assign` gives them: returns
        `(local_pos [C], global_rows [u], known)` with local ids known clients first."""
        real = positions >= 0
        largest = int(positions.max(initial=-1))
        if largest >= self.row_of.shape[0]:
            grown = np.full(capacity_for(2 * (largest + 1)), -1, np.int64)
            grown[:self.row_of.shape[0]] = self.row_of
            self.row_of = grown
        ids, first = np.unique(positions[real], return_index=True)
        ids = ids[np.argsort(first, kind="stable")]
        rows = self.row_of[ids]
        known = rows >= 0
        new_ids = ids[~known]
        new_rows = self.size + np.arange(new_ids.shape[0], dtype=np.int64)
        self.row_of[new_ids] = new_rows
        self.size += int(new_ids.shape[0])
        local_ids = np.concatenate([ids[known], new_ids])
        global_rows = np.concatenate([rows[known], new_rows])
        order = np.argsort(local_ids)
        local_pos = np.full(positions.shape, -1, np.int64)
        local_pos[real] = order[np.searchsorted(local_ids[order], positions[real])]
        return local_pos, global_rows, int(np.sum(known))

    def check_version(self, version: int, read: bool = False) -> None:
        """`StaleStoreError` unless a state at `version` may be stepped (the newest) or,
        with `read`, read (the newest, or the one the tables hold while the newest
        round's rows are pending: the loop reads round r after dispatching round r+1)."""
        if version == self.committed and (read or self.pending is None):
            return
        if self.pending is not None and version == self.pending.version:
            return
        raise StaleStoreError(
            f"this state is at round {version} of its host-side client store, which holds "
            f"round {self.pending.version if self.pending else self.committed}: a host or disk "
            "client store keeps one history; step and read only the newest state")

    def step(self, jitted: Callable, state: PyTree, cohort: Any, key: Any,
             place: Callable[[PyTree], PyTree] = lambda x: x) -> tuple:
        """One round of `jitted` (a jitted `algorithm.apply`) on a host-backed `state`.

        Gathers the cohort's rows (unique clients) into cohort-sized device stores with a
        matching `ClientIndex`, runs the round on them with the cohort's positions remapped,
        and keeps the new rows pending on the device; the previous round's pending rows
        are written to the tables after this round is dispatched.

        Args:
          jitted: `jitted(state, cohort, key) -> (state, metrics[, per_client])`.
          state: a host-backed state (`attach`), the newest.
          cohort: the packed cohort (`client_index` on the host).
          key: the round key.
          place: applied to the cohort-sized state before the call (e.g. replicate it
            over a mesh).

        Returns:
          What `jitted` returns, with the state host-backed at the next version.
        """
        index = host_index(state)
        assert index is not None
        self.check_version(index.version)
        positions = np.asarray(cohort.client_index).astype(np.int64).reshape(-1)
        clients = positions.shape[0]
        t0 = _now()
        local_pos, global_rows, known = self._assign(positions)
        self._grow(self.size)
        u = global_rows.shape[0]
        previous = self.pending
        src = use = None
        if previous is not None:  # rows the previous round rewrote come from the device
            hit = np.zeros(u, bool)
            order = np.argsort(previous.rows)
            at = np.zeros(u, np.int64)
            if previous.rows.shape[0]:
                at = np.clip(np.searchsorted(previous.rows[order], global_rows), 0,
                             previous.rows.shape[0] - 1)
                hit = previous.rows[order][at] == global_rows
            src = np.zeros(clients, np.int32)
            use = np.zeros(clients, bool)
            src[:u] = np.where(hit, order[at] if order.size else 0, 0)
            use[:u] = hit
        from_host = global_rows if use is None else global_rows[~use[:u]]
        local_stores = []
        for k in range(len(self.treedefs)):
            leaves = []
            for j, table in enumerate(self.tables[k]):
                part = np.zeros((clients,) + self.shapes[k][j], self.dtypes[k][j])
                dst = np.arange(u) if use is None else np.flatnonzero(~use[:u])
                _copy_rows(part, dst, table, from_host)
                part = jax.device_put(part)
                if previous is not None and use is not None and use.any():
                    prev = previous.tables[k][j]
                    if self.host_dtypes[k][j] != self.dtypes[k][j]:
                        prev = _round_bf16(prev)
                    part = _patch(part, prev, src, use)
                leaves.append(part)
            local_stores.append(ClientStore(jax.tree.unflatten(self.treedefs[k], leaves)))
        row_of = np.full(max(clients, 1), -1, np.int32)
        row_of[:known] = np.arange(known, dtype=np.int32)
        global_of = np.full(max(clients, 1), NO_ROW, np.int32)
        global_of[:u] = global_rows
        local_index = ClientIndex(jnp.asarray(row_of), jnp.asarray(known, jnp.int32),
                                  jnp.asarray(global_of))
        local_state = _replace(state, lambda _: local_index, lambda k, _: local_stores[k])
        local_cohort = cohort._replace(client_index=local_pos.astype(np.int32))
        self.gather_s += _now() - t0
        out = jitted(place(local_state), local_cohort, key)
        new_state = out[0]
        tables = [jax.tree.leaves(s.rows) for s in _stores(new_state)]
        if previous is not None:
            self._commit(previous)
        version = index.version + 1
        self.pending = _Pending(version, tables, global_rows)
        self.sizes[version] = self.size
        for v in [v for v in self.sizes if v < self.committed]:
            del self.sizes[v]
        hosted = _replace(new_state, lambda _: HostIndex(self, version),
                          lambda k, _: ClientStore(HostRows(self, k)))
        return (hosted, *out[1:])

    def _commit(self, pending: _Pending) -> None:
        """Writes a round's rows (waiting for it) into the tables."""
        t0 = _now()
        rows = pending.rows
        if rows.shape[0]:
            for k, leaves in enumerate(pending.tables):
                for j, leaf in enumerate(leaves):  # rows are distinct: one write each
                    values = np.asarray(jax.device_get(leaf))
                    _copy_rows(self.tables[k][j], rows, values, np.arange(rows.shape[0]))
            self.dirty[rows] = True
        self.committed = pending.version
        self.pending = None
        self.scatter_s += _now() - t0

    def view(self, version: int) -> None:
        """Makes the tables hold `version` (commits its pending round);
        `StaleStoreError` when they hold a later one."""
        with self._lock:
            self.check_version(version, read=True)
            if self.pending is not None and self.pending.version == version:
                self._commit(self.pending)

    def rows_of(self, positions, version: int) -> np.ndarray:
        """`Int[ndarray, "clients"]`: each position's row as of `version` (-1: none)."""
        positions = np.asarray(positions, np.int64)
        limit = self.sizes.get(version, self.size)
        inside = (positions >= 0) & (positions < self.row_of.shape[0])
        rows = np.where(inside, self.row_of[np.clip(positions, 0, self.row_of.shape[0] - 1)], -1)
        return np.where((rows >= 0) & (rows < limit), rows, -1).astype(np.int32)

    def read(self, rows: np.ndarray) -> list[PyTree]:
        """Each store's rows `rows` (committed tables), as float32-master numpy trees."""
        order = np.argsort(rows)
        back = np.argsort(order)
        return [jax.tree.unflatten(self.treedefs[k], [
            np.asarray(t[rows[order]])[back].astype(self.dtypes[k][j])
            for j, t in enumerate(self.tables[k])]) for k in range(len(self.treedefs))]

    # ------------------------------------------------------------------ checkpoints

    def delta(self, version: int) -> dict[str, Any]:
        """The rows changed since the last `mark_saved`, as of `version`, with the
        position -> row map: `rows`, `row_of` and `size` arrays, and one `DeltaLeaf` per
        table (`s{k}_l{j}`: store k, leaf j), which reads those rows in chunks when
        written, so that a delta never sits in memory whole (bfloat16 as its uint16
        bits). `apply_delta` and `apply_rows` read it back."""
        self.view(version)
        limit = self.sizes.get(version, self.size)
        rows = np.flatnonzero(self.dirty[:limit]).astype(np.int64)
        row_of = np.where(self.row_of < limit, self.row_of, -1)
        out: dict[str, Any] = {"rows": rows, "row_of": row_of,
                               "size": np.asarray(limit, np.int64)}
        for k, tables in enumerate(self.tables):
            for j, t in enumerate(tables):
                bf16 = np.dtype(t.dtype) == np.dtype(ml_dtypes.bfloat16)

                def read(a: int, b: int, t=t, bf16=bf16) -> np.ndarray:
                    values = np.asarray(t[rows[a:b]])
                    return values.view(np.uint16) if bf16 else values

                out[f"s{k}_l{j}"] = DeltaLeaf(
                    (rows.shape[0],) + tuple(t.shape[1:]),
                    np.dtype(np.uint16) if bf16 else np.dtype(t.dtype), read)
        return out

    def mark_saved(self, rows: np.ndarray) -> None:
        """The rows of a written `delta` are saved: they are not dirty any more."""
        self.dirty[np.asarray(rows, np.int64)] = False

    def apply_delta(self, arrays: dict[str, np.ndarray]) -> None:
        """Applies one `delta` held in memory (`rows`, `row_of`, `size` and each leaf's
        values; in order, oldest first) to the tables."""
        size = int(arrays["size"])
        self.apply_rows(size, None, np.zeros(0, np.int64), np.zeros(0))
        rows = np.asarray(arrays["rows"], np.int64)
        for k, tables in enumerate(self.tables):
            for j in range(len(tables)):
                self.apply_rows(size, f"s{k}_l{j}", rows, np.asarray(arrays[f"s{k}_l{j}"]))
        self.apply_row_of(size, np.asarray(arrays["row_of"], np.int64))

    def apply_rows(self, size: int, name: str | None, rows: np.ndarray,
                   values: np.ndarray) -> None:
        """Writes part of a delta: `values[i]` (stored dtype) into row `rows[i]` of the
        table `name` (`s{k}_l{j}`), after growing the tables to `size` rows (`name`
        None: only that)."""
        self.pending = None
        self._grow(size)
        if name is None:
            return
        k, j = (int(x[1:]) for x in name.split("_"))
        if not (k < len(self.tables) and j < len(self.tables[k])):
            raise ValueError(f"client store delta: {name} is no table of this store")
        if self.host_dtypes[k][j] == np.dtype(ml_dtypes.bfloat16):
            values = values.view(ml_dtypes.bfloat16)
        want = (rows.shape[0],) + self.shapes[k][j]
        if values.shape != want:
            raise ValueError(f"client store delta: {name} has shape {values.shape}, "
                             f"expected {want}")
        self.tables[k][j][rows] = values.astype(self.host_dtypes[k][j])

    def apply_row_of(self, size: int, row_of: np.ndarray) -> None:
        """Ends applying a delta: its position -> row map and rows in use."""
        self.row_of = np.full(max(row_of.shape[0], MIN_CAPACITY), -1, np.int64)
        self.row_of[:row_of.shape[0]] = row_of
        self.size = size

    def restored(self, version: int) -> None:
        """After the deltas of a checkpoint: the tables hold `version`, all saved."""
        self.committed = version
        self.sizes = {version: self.size}
        self.dirty[:] = False
        self.pending = None


def _make_store_dir(directory) -> Path:
    """The disk backend's folder: created (no link followed below its parent), emptied of
    our own table files (a previous attempt's), or a new temporary folder."""
    if directory is None:
        import tempfile
        return Path(tempfile.mkdtemp(prefix="fedjax-client-store-"))
    path = Path(directory)
    atomic.make_dir(path, root=path.parent)
    for f in path.iterdir():
        if f.name.startswith(FILE_PREFIX) and f.name.endswith(".bin") and not f.is_symlink() \
                and f.is_file():
            f.unlink()
    return path


def attach(state: PyTree, spec: StoreSpec) -> PyTree:
    """`state` with its per-client stores kept as `spec` says.

    The device backend (or a state without stores) returns `state` as it is. Otherwise
    the stores move into a new `HostStore` (they must be empty, as `algorithm.init`
    makes them) and the state holds `HostIndex`/`HostRows` in their place.

    Args:
      state: an algorithm's initial state.
      spec: a `StoreSpec`.

    Returns:
      The state, host-backed or not.

    Example:
      >>> state = attach(alg.init(params), StoreSpec("host", dtype="bf16"))
    """
    if spec.backend not in BACKENDS:
        raise ValueError(f"unknown client store backend {spec.backend!r}; choose one of: "
                         f"{', '.join(BACKENDS)}")
    if spec.dtype not in DTYPES:
        raise ValueError(f"unknown client store dtype {spec.dtype!r}; choose one of: "
                         f"{', '.join(DTYPES)}")
    if spec.backend == "device":
        if spec.dtype != "f32":
            raise ValueError("a bfloat16 client store needs the host or disk backend")
        return state
    stores = _stores(state)
    if not stores or host_index(state) is not None:
        return state
    host = HostStore(stores, spec)
    return _replace(state, lambda _: HostIndex(host, 0),
                    lambda k, _: ClientStore(HostRows(host, k)))


def at_version(state: PyTree, version: int) -> PyTree:
    """A host-backed `state` marked as holding `version` (after a restore)."""
    return _replace(state, lambda x: HostIndex(x.host, version) if isinstance(x, HostIndex)
                    else x, lambda k, s: s)


def eval_state(state: PyTree, rows) -> tuple[PyTree, np.ndarray]:
    """A device state for evaluating the clients of store rows `rows` (-1: none): the
    stores hold just those rows (compacted), and the rows returned index them.

    Example:
      >>> state, rows = eval_state(server.state, server.eval_rows(positions))
    """
    index = host_index(state)
    if index is None:
        return state, np.asarray(rows)
    host = index.host
    host.view(index.version)
    rows = np.asarray(rows, np.int64)
    used = np.unique(rows[rows >= 0])
    compact = np.where(rows >= 0, np.searchsorted(used, rows), -1)
    pick = used if used.size else np.zeros(1, np.int64)
    tables = host.read(pick)
    out = _replace(state, lambda x: x, lambda k, _: ClientStore(jax.device_put(tables[k])))
    return out, compact.astype(np.int32)
