import jax.numpy as jnp
import numpy as np

from fedjax_core import client_state as cs


def test_index_assigns_rows_in_order_of_first_sight():
    index = cs.StateIndex()
    rows, new = index.assign([17, 4])
    assert rows.tolist() == [0, 1] and new.tolist() == [True, True]
    rows, new = index.assign([4, 9, 17])
    assert rows.tolist() == [1, 2, 0] and new.tolist() == [False, True, False]
    again = cs.StateIndex.from_state_dict(index.state_dict())
    assert again.row_of == index.row_of


def test_gather_scatter_grow():
    store = cs.empty_store({"c": jnp.zeros(2)}, capacity=2)
    index = cs.StateIndex()
    state = {"store": store, "other": jnp.ones(3)}
    state, slots = cs.prepare(index, state, [5, 6, 7])
    assert cs.capacity(state["store"]) == cs.MIN_CAPACITY and state["other"].shape == (3,)
    rows = cs.gather(state["store"], slots, {"c": jnp.full(2, 9.0)})
    np.testing.assert_array_equal(rows["c"], np.full((3, 2), 9.0))  # new clients: fresh
    updated = {"c": rows["c"] + jnp.arange(3.0)[:, None]}
    store = cs.scatter(state["store"], slots, updated, keep=jnp.array([True, False, True]))
    np.testing.assert_array_equal(store.rows["c"][:3], [[9, 9], [0, 0], [11, 11]])
    _, slots = cs.prepare(index, {"store": store}, [7, 5])
    rows = cs.gather(store, slots, {"c": jnp.zeros(2)})
    np.testing.assert_array_equal(rows["c"], [[11, 11], [9, 9]])
    for i in range(20):
        index.assign([100 + i])
    grown = cs.grow({"s": store}, index.capacity_needed())
    assert cs.capacity(grown["s"]) == 32
    np.testing.assert_array_equal(grown["s"].rows["c"][:3], store.rows["c"][:3])
