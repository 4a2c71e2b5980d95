"""The round skeleton: per-client outputs, streamed sums, padding, and bounded memory for
stateful algorithms (issue 13)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import client_state, parallel, tree
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.scaffold import scaffold
from fedjax_core.client import ClientReport
from fedjax_core.data import pack_cohort
from fedjax_core.data.pack import pad_cohort
from fedjax_core.skeleton import RoundState, algorithm
from tests.fedjax_core.helpers import (
    mlp_round_memory,
    plain_local_train,
    tiny_softmax_model,
    unequal_clients,
)


@pytest.mark.parametrize("chunk", [1, 3])
def test_per_client_outputs_match_a_plain_loop(chunk):
    """`jit_round(..., per_client=True)` reports each client's weight, delta norm and mean
    loss, equal to each client trained alone in a Python loop."""
    model, data = tiny_softmax_model(), unequal_clients()
    params = model.init(jax.random.key(0))
    cohort = pack_cohort(data, [2, 0, 3, 4], batch_size=2, epochs=1, seed=1, round_num=0)
    alg = fedavg(optax.sgd(0.3))
    _, metrics, per = jit_round(alg, model, parallel.Plan(chunk), per_client=True)(
        alg.init(params), cohort, jax.random.key(2))
    np.testing.assert_array_equal(per["num_examples"], [9, 5, 1, 4])
    np.testing.assert_array_equal(per["weight"], [9, 5, 1, 4])
    for c in range(4):
        w = plain_local_train(model, params, cohort, c, optax.sgd(0.3))
        norm = float(tree.l2_norm(tree.sub(params, w)))
        np.testing.assert_allclose(per["delta_norm"][c], norm, rtol=1e-5)
    # The round's loss is the example-weighted mean of the clients' losses (one epoch).
    np.testing.assert_allclose(metrics["train/loss"],
                               np.sum(per["loss"] * per["num_examples"]) / 19, rtol=1e-5)


def test_sums_count_real_clients_only_and_padding_changes_nothing():
    """`ClientReport.sums` reach the server summed over real clients; padding clients (no
    examples) add nothing, whatever they report."""
    model, data = tiny_softmax_model(), unequal_clients()

    def client(c):
        w, stats = c.train(c.params, optax.sgd(0.1))
        return ClientReport(tree.sub(c.params, w), stats,
                            sums={"one": jnp.float32(1.0), "n": c.num_examples})

    seen = {}

    def server(w, s, r):
        seen.update(r.sums)
        return tree.sub(w, r.delta), s, {"count": r.sums["one"], "clients": r.num_clients}

    alg = algorithm(client, server)
    params = model.init(jax.random.key(0))
    cohort = pack_cohort(data, [1, 3, 2], batch_size=2, epochs=1, seed=0, round_num=0)
    outs = []
    for c in (cohort, pad_cohort(cohort, 6)):
        state, metrics = jit_round(alg, model, parallel.Plan(2))(alg.init(params), c,
                                                                 jax.random.key(0))
        assert float(metrics["count"]) == 3 and float(metrics["clients"]) == 3
        assert float(metrics["train/num_examples"]) == 2 + 1 + 9
        outs.append(state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), *outs)


def test_state_is_a_round_state_with_the_index_inside():
    model, data = tiny_softmax_model(), unequal_clients()
    alg = scaffold(optax.sgd(0.1), 1.0, client_learning_rate=0.1, num_clients=5)
    state = alg.init(model.init(jax.random.key(0)))
    assert isinstance(state, RoundState) and client_state.has_stores(state)
    step = jit_round(alg, model)
    for r, ids in enumerate([[4, 1], [1, 3, 0]]):
        state, _ = step(state, pack_cohort(data, ids, 2, 1, seed=0, round_num=r),
                        jax.random.key(r))
    np.testing.assert_array_equal(client_state.rows_of(state, [4, 1, 3, 0, 2, -1]),
                                  [0, 1, 2, 3, -1, -1])
    plain = fedavg(optax.sgd(0.1)).init(model.init(jax.random.key(0)))
    assert not client_state.has_stores(plain) and client_state.find_index(plain) is None


def test_stateful_rounds_need_fedavgs_memory_store_rows_aside(monkeypatch):
    """SCAFFOLD streams its deltas and its control changes like FedAvg: at 128 clients its
    temporaries, less (at most) one working copy of its store, stay within 1.5x FedAvg's,
    where stacking would hold 128 deltas and 128 new controls. (Rows are written inside
    the loop, as for any cohort whose new rows exceed `parallel.STACKED_ROWS_BYTES`.)"""
    monkeypatch.setattr(parallel, "STACKED_ROWS_BYTES", 0)
    params_bytes = 4 * (16 * 256 + 256 + 256 * 64 + 64)
    fedavg_temp, _ = mlp_round_memory(fedavg(optax.sgd(0.1)), 128)
    temp, store = mlp_round_memory(scaffold(optax.sgd(0.1), 1.0, client_learning_rate=0.1,
                                                    num_clients=128), 128)
    assert store == 128 * params_bytes
    assert temp - store <= 1.5 * fedavg_temp, (temp, store, fedavg_temp)
    assert temp < store + 100 * params_bytes   # nothing like 2 x 128 stacked copies


@pytest.mark.parametrize("limit", [0, 2**30])
def test_rows_written_in_the_loop_or_after_it_give_the_same_round(monkeypatch, limit):
    """`parallel.run_clients` writes a small cohort's new per-client rows after its loop
    (stacked) and a large one's inside it: the same state either way."""
    model, data = tiny_softmax_model(), unequal_clients()
    alg = scaffold(optax.sgd(0.2), 1.0, client_learning_rate=0.2, num_clients=5)
    monkeypatch.setattr(parallel, "STACKED_ROWS_BYTES", limit)
    step = jit_round(alg, model, parallel.Plan(2))
    state = alg.init(model.init(jax.random.key(0)))
    for r, ids in enumerate([[4, 1, 0], [1, 3, 2], [0, 4, 2]]):
        cohort = pad_cohort(pack_cohort(data, ids, 2, 1, seed=0, round_num=r), 4)
        state, _ = step(state, cohort, jax.random.key(r))
    monkeypatch.setattr(parallel, "STACKED_ROWS_BYTES", 2**30 - limit)
    other_step = jit_round(alg, model, parallel.Plan(2))
    other = alg.init(model.init(jax.random.key(0)))
    for r, ids in enumerate([[4, 1, 0], [1, 3, 2], [0, 4, 2]]):
        cohort = pad_cohort(pack_cohort(data, ids, 2, 1, seed=0, round_num=r), 4)
        other, _ = other_step(other, cohort, jax.random.key(r))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), state, other)
