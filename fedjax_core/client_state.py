"""Per-client state across rounds (SCAFFOLD's control variates, Ditto's personal models, ...).

Owned by the framework: an algorithm declares what one client's state looks like, and
the round skeleton keeps it. Device memory grows with the clients seen, not with the
population: a `ClientStore` holds one row per client seen so far, in a table whose
capacity doubles as needed (so a run recompiles O(log clients) times). A `ClientIndex`,
part of the algorithm state on the device, maps dataset positions to rows.

Inside the jitted round, `assign` gives the cohort its rows (`ClientSlots`), the round
reads and rewrites those rows, and the updated index is returned with the state. On the
host, before the round, `fit` grows the index and every store in the state so that the
cohort fits (`jit_round` does this; nobody else needs to).

    state = client_state.fit(state, cohort.client_index)          # jit_round, on the host
    index, slots = client_state.assign(state.index, cohort.client_index)   # jitted
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_core import tree
from fedjax_core.typing import Array, ArrayLike, PyTree

MIN_CAPACITY = 8

NO_ROW = np.iinfo(np.int32).max
"""The row of a padding client: past the end of every store (reads clamp, writes drop)."""


class ClientSlots(NamedTuple):
    """Rows of a cohort's clients in every `ClientStore`.

    Attributes:
      row: `Int[Array, "clients"]`, each client's row (`NO_ROW` for a padding client).
      is_new: `Bool[Array, "clients"]`, True where the client has never been seen, so
        its row holds no state yet and must be initialised.
      global_row: `Int[Array, "clients"]`, each client's row in the population-wide
        store when `row` is a row of a cohort-sized table (a host or disk store,
        `fedjax_core.client_store`), else None (then `row` is it). Per-client randomness
        keyed by a row (persistent attackers) uses `key_rows(slots)`.
    """

    row: Array
    is_new: Array
    global_row: Array | None = None


class ClientStore(NamedTuple):
    """A table of per-client state: every leaf of `rows` is `[capacity, ...]`."""

    rows: PyTree


class ClientIndex(NamedTuple):
    """Which store row holds which client, on the device.

    Attributes:
      row_of: `Int[Array, "positions"]`, the row of dataset position p (-1: never seen);
        its length grows (powers of two) with the largest position seen.
      size: `Int[Array, ""]`, the number of rows in use.
      global_row: `Int[Array, "rows"]` or None: for a cohort-sized index built by a host
        or disk store (`fedjax_core.client_store`), the population-wide row of each local
        row (`ClientSlots.global_row`); None for the device store.
    """

    row_of: Array
    size: Array
    global_row: Array | None = None


def empty_index(positions: int = MIN_CAPACITY) -> ClientIndex:
    """An index with no client, covering dataset positions below `positions`."""
    return ClientIndex(jnp.full((positions,), -1, jnp.int32), jnp.zeros((), jnp.int32))


def empty_store(example_row: PyTree, capacity: int = MIN_CAPACITY) -> ClientStore:
    """A zero store shaped like `capacity` copies of one client's state."""
    return ClientStore(jax.tree.map(
        lambda x: jnp.zeros((capacity,) + jnp.shape(x), jnp.result_type(x)), example_row))


def capacity(store: ClientStore) -> int:
    leaves = jax.tree.leaves(store.rows)
    return leaves[0].shape[0] if leaves else 0


def assign(index: ClientIndex, client_index: ArrayLike) -> tuple[ClientIndex, ClientSlots]:
    """Rows of a cohort's clients, new rows for the clients never seen (inside jit).

    New clients get the next free rows in cohort-slot order. A negative position is a
    padding client: it gets `NO_ROW`, counts as new and is not recorded. The stores
    must have room (`fit` before the round).

    Args:
      index: the `ClientIndex` (covering every position of the cohort).
      client_index: `Int[Array, "clients"]`, dataset positions (-1 for padding).

    Returns:
      `(index, slots)`, the index with the new clients recorded and their `ClientSlots`.

    Example:
      >>> index, slots = assign(empty_index(), jnp.array([17 % 8, 4]))   # rows 0, 1; new
    """
    pos = jnp.asarray(client_index, jnp.int32)
    real = pos >= 0
    safe = jnp.where(real, pos, 0)
    known = real & (index.row_of[safe] >= 0)
    slot = jnp.arange(pos.shape[0], dtype=jnp.int32)
    # The first slot of each position, so that a client twice in a cohort gets one row.
    first = jnp.full(index.row_of.shape, pos.shape[0], jnp.int32).at[safe].min(
        jnp.where(real, slot, pos.shape[0]))
    fresh = real & ~known & (first[safe] == slot)
    new_rows = index.size + jnp.cumsum(fresh.astype(jnp.int32)) - 1
    row_of = index.row_of.at[jnp.where(fresh, safe, index.row_of.shape[0])].set(
        new_rows, mode="drop")
    rows = jnp.where(real, row_of[safe], NO_ROW)
    size = index.size + jnp.sum(fresh.astype(jnp.int32))
    if index.global_row is None:
        return ClientIndex(row_of, size), ClientSlots(rows, ~known)
    last = index.global_row.shape[0] - 1
    global_row = jnp.where(real, index.global_row[jnp.clip(rows, 0, last)], NO_ROW)
    return (ClientIndex(row_of, size, index.global_row),
            ClientSlots(rows, ~known, global_row))


def key_rows(slots: ClientSlots) -> Array:
    """`Int[Array, "clients"]`: each client's population-wide row (`NO_ROW` for padding),
    the same whichever backend keeps the store: what per-client randomness is keyed by."""
    return slots.row if slots.global_row is None else slots.global_row


def gather(store: ClientStore, slots: ClientSlots, fresh: PyTree) -> PyTree:
    """The cohort's rows `[clients, ...]`; new clients get `fresh` (one client's initial
    state, broadcast)."""
    def pick(table, init):
        rows = table[slots.row]
        new = tree.per_client(slots.is_new, rows)
        return jnp.where(new, jnp.broadcast_to(init, rows.shape), rows)
    return jax.tree.map(pick, store.rows, fresh)


def scatter(store: ClientStore, slots: ClientSlots, values: PyTree,
            keep: Array | None = None) -> ClientStore:
    """Writes the cohort's rows back. `keep[i] = False` leaves client i's row unchanged
    (e.g. a padding client)."""
    def put(table, v):
        if keep is not None:
            k = tree.per_client(keep, v)
            v = jnp.where(k, v, table[slots.row])
        return table.at[slots.row].set(v)
    return ClientStore(jax.tree.map(put, store.rows, values))


def _is_store(x) -> bool:
    return isinstance(x, ClientStore)


def _is_index(x) -> bool:
    return isinstance(x, ClientIndex)


def has_stores(state: PyTree) -> bool:
    """Whether `state` holds any `ClientStore`."""
    return any(_is_store(x) for x in jax.tree.leaves(state, is_leaf=_is_store))


def find_index(state: PyTree) -> ClientIndex | None:
    """The `ClientIndex` in `state`, or None (an algorithm state holds at most one)."""
    found = [x for x in jax.tree.leaves(state, is_leaf=_is_index) if _is_index(x)]
    return found[0] if found else None


def capacity_for(n: int) -> int:
    """The capacity a store or index grows to for `n` rows: the least power of two
    `MIN_CAPACITY * 2**k >= n` (host and device stores grow alike)."""
    cap = MIN_CAPACITY
    while cap < n:
        cap *= 2
    return cap


def grow(state: PyTree, new_capacity: int) -> PyTree:
    """Pads every `ClientStore` in `state` with zero rows up to `new_capacity`."""
    def pad(x):
        if not _is_store(x) or capacity(x) >= new_capacity:
            return x
        return ClientStore(jax.tree.map(
            lambda t: jnp.concatenate(
                [t, jnp.zeros((new_capacity - t.shape[0],) + t.shape[1:], t.dtype)]), x.rows))
    return jax.tree.map(pad, state, is_leaf=_is_store)


def grow_index(state: PyTree, positions: int) -> PyTree:
    """Extends the `ClientIndex` in `state` to cover `positions` dataset positions."""
    def pad(x):
        if not _is_index(x) or x.row_of.shape[0] >= positions:
            return x
        extra = jnp.full((positions - x.row_of.shape[0],), -1, jnp.int32)
        return x._replace(row_of=jnp.concatenate([x.row_of, extra]))
    return jax.tree.map(pad, state, is_leaf=_is_index)


def fit(state: PyTree, client_index) -> PyTree:
    """`state` with its index and stores grown so that the cohort `client_index` fits.

    Host side, before a round (`jit_round` calls it): every store gets a row for each
    client seen so far plus each of the cohort's clients (capacity doubling), and the
    index covers the largest position. Each growth changes the round's shapes (one
    recompile), so whenever anything grows the index is given room for twice the
    largest position seen: its growth then rides along with the stores'. Reads the number
    of rows in use from the device only when the stores might be too small. A state
    without a `ClientIndex` is returned as it is.

    Example:
      >>> state = fit(state, cohort.client_index)
    """
    index = find_index(state)
    if index is None:
        return state
    positions = np.asarray(client_index)
    largest = int(positions.max(initial=-1))
    stores = [x for x in jax.tree.leaves(state, is_leaf=_is_store) if _is_store(x)]
    have = min(capacity(s) for s in stores) if stores else None
    need_index = largest >= index.row_of.shape[0]
    need_rows = False
    if have is not None and have < max(index.row_of.shape[0], largest + 1):
        used = int(index.size)
        need_rows = have < used + int(np.sum(positions >= 0))
    if not (need_index or need_rows):
        return state
    state = grow_index(state, capacity_for(2 * (largest + 1)))
    if need_rows:
        state = grow(state, capacity_for(used + int(np.sum(positions >= 0))))
    return state


def rows_of(state: PyTree, positions) -> np.ndarray:
    """`Int[ndarray, "clients"]`: the store row of each dataset position (-1 for a
    position never trained or negative), read from the state's `ClientIndex`; all -1
    when the state has none (e.g. for `EvalClients.rows`)."""
    positions = np.asarray(positions, np.int64)
    index = find_index(state)
    if index is None:
        return np.full(positions.shape, -1, np.int32)
    row_of = np.asarray(index.row_of)
    inside = (positions >= 0) & (positions < row_of.shape[0])
    return np.where(inside, row_of[np.clip(positions, 0, row_of.shape[0] - 1)], -1).astype(
        np.int32)
