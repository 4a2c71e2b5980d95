"""Per-client state: the index in the state (`assign`, `fit`, `rows_of`), by hand."""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_core import client_state as cs
from fedjax_core import tree
from fedjax_core.algorithms.base import jit_round
from fedjax_core.client import ClientReport, TrainStats
from fedjax_core.data import pack_clients
from fedjax_core.skeleton import algorithm
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients

NO_ROW = int(cs.NO_ROW)


def test_empty_index():
    index = cs.empty_index()
    assert index.row_of.shape == (cs.MIN_CAPACITY,) and index.row_of.dtype == jnp.int32
    assert np.all(np.asarray(index.row_of) == -1) and int(index.size) == 0
    assert cs.empty_index(32).row_of.shape == (32,)


def test_rows_in_order_of_first_appearance():
    index, slots = cs.assign(cs.empty_index(), jnp.array([5, 2, 7]))
    assert slots.row.tolist() == [0, 1, 2] and slots.is_new.tolist() == [True, True, True]
    assert index.row_of.tolist() == [-1, -1, 1, -1, -1, 0, -1, 2] and int(index.size) == 3
    # Next round: 2 and 5 keep their rows, 6 gets the next free one.
    index, slots = cs.assign(index, jnp.array([2, 6, 5]))
    assert slots.row.tolist() == [1, 3, 0] and slots.is_new.tolist() == [False, True, False]
    assert index.row_of.tolist() == [-1, -1, 1, -1, -1, 0, 3, 2] and int(index.size) == 4


def test_duplicates_in_one_cohort_share_a_row():
    # 4 first at slot 0 -> row 0, 1 at slot 1 -> row 1, 3 at slot 4 -> row 2; the repeats
    # of 4 and 1 reuse those rows and take no new one.
    index, slots = cs.assign(cs.empty_index(), jnp.array([4, 1, 4, 1, 3]))
    assert slots.row.tolist() == [0, 1, 0, 1, 2]
    assert slots.is_new.tolist() == [True] * 5  # none was seen before this round
    assert int(index.size) == 3
    assert index.row_of.tolist() == [-1, 1, -1, 2, 0, -1, -1, -1]
    index, slots = cs.assign(index, jnp.array([1, 4, 1]))
    assert slots.row.tolist() == [1, 0, 1] and slots.is_new.tolist() == [False] * 3
    assert int(index.size) == 3


def test_padding_gets_no_row_and_is_not_recorded():
    index, slots = cs.assign(cs.empty_index(), jnp.array([-1, 6, -1, 0]))
    assert slots.row.tolist() == [NO_ROW, 0, NO_ROW, 1]
    assert slots.is_new.tolist() == [True, True, True, True]  # padding counts as new
    assert index.row_of.tolist() == [1, -1, -1, -1, -1, -1, 0, -1] and int(index.size) == 2
    # An all-padding cohort changes nothing.
    again, slots = cs.assign(index, jnp.array([-1, -1]))
    assert slots.row.tolist() == [NO_ROW, NO_ROW]
    assert again.row_of.tolist() == index.row_of.tolist() and int(again.size) == 2


def test_fit_grows_index_and_stores_to_powers_of_two():
    store = cs.empty_store({"c": jnp.zeros(2)})
    state = {"index": cs.empty_index(), "store": store, "other": jnp.ones(3)}
    assert cs.capacity(store) == cs.MIN_CAPACITY == 8
    # Everything fits: the same state, untouched.
    assert cs.fit(state, np.array([3, 5, -1])) is state
    # Position 20 needs an index over 21 positions: it gets room for twice that, 64, so
    # that its next growth comes with the stores'; 2 clients still fit 8 rows.
    state = cs.fit(state, np.array([20, 2]))
    assert state["index"].row_of.shape == (64,)
    assert np.all(np.asarray(state["index"].row_of) == -1)
    assert cs.capacity(state["store"]) == 8 and state["other"].shape == (3,)
    # 7 rows in use, written 1..7.
    index, slots = cs.assign(state["index"], jnp.arange(7))
    rows = jnp.zeros((8, 2)).at[slots.row].set(jnp.arange(1.0, 8.0)[:, None] * jnp.ones(2))
    state = {"index": index, "store": cs.ClientStore({"c": rows}), "other": state["other"]}
    # 7 + 3 real clients (the padding -1 does not count) need 10 rows: 16.
    grown = cs.fit(state, np.array([8, 9, -1, 10]))
    assert cs.capacity(grown["store"]) == 16
    np.testing.assert_array_equal(grown["store"].rows["c"][:7],
                                  np.arange(1.0, 8.0)[:, None] * np.ones(2))
    np.testing.assert_array_equal(grown["store"].rows["c"][7:], np.zeros((9, 2)))
    assert grown["index"].row_of.shape == (64,) and int(grown["index"].size) == 7
    # Position 40 fits the index's room: nothing grows, the state is returned as it is.
    assert cs.fit(grown, np.array([40])) is grown
    # Position 70 does not: room for 2 x 71 positions, 256; the rows stay.
    far = cs.fit(grown, np.array([70]))
    assert far["index"].row_of.shape == (256,) and cs.capacity(far["store"]) == 16
    np.testing.assert_array_equal(far["index"].row_of[:7], np.arange(7))
    # A state without an index is returned as it is.
    plain = {"params": jnp.ones(2)}
    assert cs.fit(plain, np.array([100])) is plain


def test_fit_stops_growing_once_every_position_has_a_row():
    # An index over 8 positions and 8 rows: any cohort of positions below 8 fits.
    state = {"index": cs.empty_index(), "store": cs.empty_store(jnp.zeros(()))}
    index, _ = cs.assign(state["index"], jnp.arange(6))
    state["index"] = index
    assert cs.fit(state, np.arange(8)) is state


def test_rows_of():
    index, _ = cs.assign(cs.empty_index(), jnp.array([5, 2]))
    state = {"index": index, "store": cs.empty_store(jnp.zeros(()))}
    # Seen: their rows; never seen, negative, or past the index: -1.
    assert cs.rows_of(state, [2, 5, 3, -1, 100]).tolist() == [1, 0, -1, -1, -1]
    assert cs.rows_of(state, [2]).dtype == np.int32
    assert cs.rows_of({"params": jnp.ones(2)}, [0, 1]).tolist() == [-1, -1]


def test_a_client_gets_its_row_back_in_a_later_round():
    """Host and device as `jit_round` runs them: fit, assign, write the cohort's rows;
    round 2 reads round 1's values back for the clients it saw."""
    state = {"index": cs.empty_index(), "store": cs.empty_store(jnp.zeros(()))}
    # Round 1: positions 3 and 9 (9 is past the initial index of 8 positions).
    state = cs.fit(state, np.array([3, 9]))
    index, slots = cs.assign(state["index"], jnp.array([3, 9]))
    assert slots.row.tolist() == [0, 1] and slots.is_new.tolist() == [True, True]
    table = state["store"].rows.at[slots.row].set(jnp.array([30.0, 90.0]))
    state = {"index": index, "store": cs.ClientStore(table)}
    # Round 2: 9 and 3 come back in another order, with 4 new between them.
    state = cs.fit(state, np.array([9, 4, 3]))
    index, slots = cs.assign(state["index"], jnp.array([9, 4, 3]))
    assert slots.row.tolist() == [1, 2, 0] and slots.is_new.tolist() == [False, True, False]
    np.testing.assert_array_equal(state["store"].rows[slots.row], [90.0, 0.0, 30.0])
    assert cs.rows_of({"index": index}, [3, 9, 4, 5]).tolist() == [0, 1, 2, -1]


def test_jit_round_keeps_rows_across_rounds():
    """The skeleton gives each client its own row across rounds: here a count of the
    rounds it trained in and the sum of its examples over them."""
    def client(ctx):
        state = {"count": ctx.state["count"] + 1.0,
                 "examples": ctx.state["examples"] + ctx.num_examples}
        zero = jnp.zeros((), jnp.float32)
        return ClientReport(tree.zeros_like(ctx.params), TrainStats(zero, zero, zero),
                            state=state)

    alg = algorithm(client, client_init=lambda p: {"count": jnp.zeros(()),
                                                   "examples": jnp.zeros(())})
    model = tiny_softmax_model()
    data = unequal_clients()  # sizes 5, 2, 9, 1, 4
    step = jit_round(alg, model)
    state = alg.init(model.init(jax.random.key(0)))
    for r, positions in enumerate([[3, 1], [1, 4], [1]]):
        cohort = pack_clients([data.get_client(p) for p in positions], 2,
                              client_index=positions)
        state, _ = step(state, cohort, jax.random.key(r))
    rows = cs.rows_of(state, [3, 1, 4, 0])
    assert rows.tolist() == [0, 1, 2, -1]
    # Client 1 trained in all three rounds (2 examples each), 3 and 4 once.
    np.testing.assert_array_equal(state.store.rows["count"][rows[:3]], [1.0, 3.0, 1.0])
    np.testing.assert_array_equal(state.store.rows["examples"][rows[:3]], [1.0, 6.0, 4.0])
