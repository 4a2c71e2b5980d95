"""Per-client state across rounds (SCAFFOLD's control variates, Ditto's personal models, ...).

Device memory grows with the clients seen, not with the population: a `ClientStore`
holds one row per client seen so far, in a table whose capacity doubles as needed (so a
run recompiles O(log clients) times). A host-side `StateIndex` maps dataset positions to
rows. Before a round, `prepare` gives the cohort its rows (`ClientSlots`) and grows every
store in the algorithm state; inside the jitted round the algorithm `gather`s its
cohort's rows, initialises the new ones, and `scatter`s the updated rows back.

    index = StateIndex()
    state, slots = prepare(index, state, cohort.client_index)      # host, before the round
    state, metrics = round_fn(state, cohort._replace(slots=slots), key)
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_core import tree
from fedjax_core.typing import Array, PyTree

MIN_CAPACITY = 8


class ClientSlots(NamedTuple):
    """Rows of a cohort's clients in every `ClientStore`.

    Attributes:
      row: `Int[Array, "clients"]`, each client's row.
      is_new: `Bool[Array, "clients"]`, True where the client has never been seen, so
        its row holds no state yet and must be initialised.
    """

    row: Array
    is_new: Array


class ClientStore(NamedTuple):
    """A table of per-client state: every leaf of `rows` is `[capacity, ...]`."""

    rows: PyTree


def empty_store(example_row: PyTree, capacity: int = MIN_CAPACITY) -> ClientStore:
    """A zero store shaped like `capacity` copies of one client's state."""
    return ClientStore(jax.tree.map(
        lambda x: jnp.zeros((capacity,) + jnp.shape(x), jnp.result_type(x)), example_row))


def capacity(store: ClientStore) -> int:
    leaves = jax.tree.leaves(store.rows)
    return leaves[0].shape[0] if leaves else 0


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


class StateIndex:
    """Host-side map from dataset position to store row; grows with the clients seen.

    Example:
      >>> index = StateIndex()
      >>> rows, is_new = index.assign(np.array([17, 4]))     # rows 0, 1; both new
    """

    def __init__(self, row_of: dict[int, int] | None = None):
        self.row_of: dict[int, int] = dict(row_of or {})

    @property
    def size(self) -> int:
        return len(self.row_of)

    def copy(self) -> "StateIndex":
        return StateIndex(self.row_of)

    def assign(self, client_index) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the given clients, and which of them are seen for the first time.

        A negative position is a padding client (e.g. filling a Poisson-sampled cohort up
        to its bucket): it gets row -1, counts as new and is not recorded."""
        idx = [int(i) for i in np.asarray(client_index).reshape(-1)]
        is_new = np.array([i < 0 or i not in self.row_of for i in idx], bool)
        for i in idx:
            if i >= 0:
                self.row_of.setdefault(i, len(self.row_of))
        return np.array([self.row_of[i] if i >= 0 else -1 for i in idx], np.int32), is_new

    def capacity_needed(self) -> int:
        cap = MIN_CAPACITY
        while cap < self.size:
            cap *= 2
        return cap

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays that restore this index (for checkpoints): positions in row order."""
        positions = np.empty(self.size, np.int64)
        for pos, row in self.row_of.items():
            positions[row] = pos
        return {"positions": positions}

    @classmethod
    def from_state_dict(cls, d: dict[str, np.ndarray]) -> "StateIndex":
        return cls({int(p): r for r, p in enumerate(np.asarray(d["positions"]))})


def _is_store(x) -> bool:
    return isinstance(x, ClientStore)


def grow(state: PyTree, new_capacity: int) -> PyTree:
    """Pads every `ClientStore` in `state` with zero rows up to `new_capacity`."""
    def pad(x):
        if not _is_store(x) or capacity(x) >= new_capacity:
            return x
        return ClientStore(jax.tree.map(
            lambda t: jnp.concatenate(
                [t, jnp.zeros((new_capacity - t.shape[0],) + t.shape[1:], t.dtype)]), x.rows))
    return jax.tree.map(pad, state, is_leaf=_is_store)


def has_stores(state: PyTree) -> bool:
    return any(_is_store(x) for x in jax.tree.leaves(state, is_leaf=_is_store))


def prepare(index: StateIndex, state: PyTree, client_index) -> tuple[PyTree, ClientSlots]:
    """Assigns the cohort's rows and grows the stores in `state` to fit them.

    Padding clients (negative `client_index`) get the row `capacity`, one past the end:
    `gather` reads a clamped row that `is_new` replaces with the fresh state, and
    `scatter` drops their writes (JAX drops out-of-bounds scatter updates)."""
    rows, is_new = index.assign(client_index)
    cap = index.capacity_needed()
    state = grow(state, cap)
    rows = np.where(rows < 0, cap, rows).astype(np.int32)
    return state, ClientSlots(jnp.asarray(rows), jnp.asarray(is_new))


def require_slots(cohort, name: str):
    """The cohort's `ClientSlots`; a clear error when the host did not prepare them."""
    if cohort.slots is None:
        raise ValueError(
            f"{name} keeps per-client state: give the cohort its store rows first, "
            "`state, slots = client_state.prepare(index, state, cohort.client_index)` and "
            "`cohort = cohort._replace(slots=slots)` (the facade's Server.step does this)")
    return cohort.slots
