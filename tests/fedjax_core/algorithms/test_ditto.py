"""Ditto against a plain per-client Python loop written from the paper's Algorithm 1."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import client_state, parallel, personalization, tree
from fedjax_core import evaluate as core_evaluate
from fedjax_core.algorithms.base import EvalClients, jit_round
from fedjax_core.algorithms.ditto import ditto
from fedjax_core.data import InMemoryFederatedData, pack_clients, pack_cohort
from fedjax_core.models.base import Model
from tests.fedjax_core.helpers import (
    close,
    tiny_softmax_model,
    unequal_clients,
    uniform_mean,
)

ditto_module = importlib.import_module("fedjax_core.algorithms.ditto")


def row_of(state, cid):
    """Client `cid`'s store row (-1: it has none)."""
    return int(client_state.rows_of(state, [cid])[0])


def personal_model(state, cid):
    """Client `cid`'s personal model v, read from its store row."""
    r = row_of(state, cid)
    assert r >= 0, f"client {cid} has no row"
    return jax.tree.map(lambda t: t[r], state.store.rows)


MODEL = tiny_softmax_model()


def reference_round(model, w, cohort, eta, lam, server_lr, store, uniform=False):
    """One Ditto round as the paper writes it, client by client, plain SGD; `store` a dict."""
    grad = jax.jit(jax.grad(lambda q, batch: jnp.mean(model.loss(batch, model.apply(q, batch)))))

    deltas, weights = [], []
    for c in range(cohort.num_clients):
        cid = int(cohort.client_index[c])
        batches = [{k: jnp.asarray(v[c, s][cohort.mask[c, s]]) for k, v in cohort.batches.items()}
                   for s in range(cohort.num_steps) if cohort.mask[c, s].any()]
        w_k = w
        for batch in batches:
            w_k = jax.tree.map(lambda p, g: p - eta * g, w_k, grad(w_k, batch))
        v = store.get(cid, w)
        for batch in batches:
            v = jax.tree.map(lambda p, g, wt: p - eta * (g + lam * (p - wt)), v, grad(v, batch), w)
        n = float(cohort.num_examples[c])
        if n > 0 or cid not in store:
            store[cid] = v
        deltas.append(jax.tree.map(lambda a, b: a - b, w, w_k))
        weights.append((1.0 if n > 0 else 0.0) if uniform else n)
    total = sum(weights)
    delta = jax.tree.map(lambda *ds: sum(wt * d for wt, d in zip(weights, ds)) / total, *deltas)
    return jax.tree.map(lambda p, d: p - server_lr * d, w, delta)


COHORTS = [[4, 0, 2], [1, 0, 3], [2, 4, 0]]  # client 0 returns twice, 2 and 4 once


@pytest.mark.parametrize("uniform", [False, True])
def test_matches_paper_loop(uniform):
    model = MODEL
    data = unequal_clients()
    eta, lam, server_lr = 0.3, 0.5, 0.7
    alg = ditto(optax.sgd(eta), server_lr, lam=lam, aggregator=uniform_mean() if uniform else None)
    params = model.init(jax.random.key(1))
    state = alg.init(params)
    ref, store = params, {}
    step = jit_round(alg, model)
    for r, idx in enumerate(COHORTS):
        cohort = pack_cohort(data, idx, batch_size=2, epochs=2, seed=3, round_num=r, steps=12)
        state, metrics = step(state, cohort, jax.random.key(r))
        ref = reference_round(model, ref, cohort, eta, lam, server_lr, store, uniform)
        close(state.params, ref)
        for cid, v in store.items():
            close(personal_model(state, cid), v)
    assert float(metrics["train/num_examples"]) == 9 + 4 + 5
    assert np.isfinite(float(metrics["train/personal_loss"]))
    # The personal models moved away from the global one.
    v0 = personal_model(state, 0)
    assert float(tree.l2_norm(tree.sub(v0, state.params))) > 1e-3


def test_zero_lambda_is_local_training():
    """lam = 0 and a new client: v_k trains from w_t on the same batches as w_k, so with
    one client and server learning rate 1 it equals the new global model."""
    model = MODEL
    params = model.init(jax.random.key(0))
    cohort = pack_cohort(unequal_clients(), [2], batch_size=3, epochs=1, seed=0, round_num=0)
    alg = ditto(optax.sgd(0.2), 1.0, lam=0.0)
    state, _ = jit_round(alg, model)(alg.init(params), cohort, jax.random.key(0))
    close(jax.tree.map(lambda t: t[0], state.store.rows), state.params, 1e-6)
    assert float(tree.l2_norm(tree.sub(state.params, params))) > 1e-3


def test_hand_computed_two_steps():
    """1-d least squares, one client, examples (x=2, y=1) then (x=1, y=1), batch 1,
    eta 0.1, lam 0.5, w_0 = 1:
      global:   w = 1 - 0.1*2 = 0.8;  w = 0.8 - 0.1*(-0.2) = 0.82
      personal: v = 1 - 0.1*(2 + 0) = 0.8;  v = 0.8 - 0.1*(-0.2 + 0.5*(0.8 - 1)) = 0.83
    """
    model = scalar_regression_model()
    data = InMemoryFederatedData({"a": {"x": np.array([[2.0], [1.0]], np.float32),
                                        "y": np.array([1.0, 1.0], np.float32)}})
    alg = ditto(optax.sgd(0.1), 1.0, lam=0.5)
    state = alg.init({"w": jnp.array([1.0])})
    cohort = pack_clients([data.get_client(0)], batch_size=1, bucket=False)
    state, _ = jit_round(alg, model)(state, cohort, jax.random.key(0))
    np.testing.assert_allclose(state.params["w"], [0.82], rtol=1e-6)
    np.testing.assert_allclose(state.store.rows["w"][0], [0.83], rtol=1e-6)


def scalar_regression_model() -> Model:
    def apply(params, batch, key=None, train=False):
        del key, train
        return batch["x"] @ params["w"]

    def loss(batch, preds):
        return 0.5 * jnp.square(preds - batch["y"])

    def metrics(batch, preds):
        return {"loss": (loss(batch, preds), jnp.ones_like(preds))}

    return Model(lambda key: {"w": jnp.zeros(1)}, apply, loss, metrics)


def test_result_does_not_depend_on_chunk_size():
    model = MODEL
    data = unequal_clients()
    alg = ditto(optax.sgd(0.2), 1.0, lam=0.3)
    params = model.init(jax.random.key(0))
    outs = []
    for chunk in (1, 3):
        step = jit_round(alg, model, parallel.Plan(chunk))
        state = alg.init(params)
        for r, idx in enumerate([[0, 1, 2, 3, 4], [3, 0, 4, 1, 2]]):
            cohort = pack_cohort(data, idx, batch_size=2, epochs=1, seed=0, round_num=r, steps=6)
            state, metrics = step(state, cohort, jax.random.key(r))
        outs.append((state, metrics))
    (a, ma), (b, mb) = outs
    close(a.params, b.params, 1e-6)
    close(a.store.rows, b.store.rows, 1e-6)
    np.testing.assert_allclose(ma["train/personal_loss"], mb["train/personal_loss"], rtol=1e-6)


def test_padding_changes_nothing():
    """Padded steps and an empty client change neither w nor the real clients' v."""
    from fedjax_core.data.sampling import SHUFFLE_STREAM, host_rng

    model = MODEL
    data = unequal_clients()
    clients = [data.get_client(i) for i in (0, 2)]
    rngs = lambda: [host_rng(0, 0, SHUFFLE_STREAM, s) for s in range(2)]  # noqa: E731
    empty = {k: v[:0] for k, v in clients[0].items()}
    tight = pack_clients(clients, 2, rngs=rngs(), bucket=False, client_index=[0, 2])
    padded = pack_clients(clients + [empty], 2, rngs=rngs() + [None], bucket=True,
                          client_index=[0, 2, 7])
    assert padded.num_steps > tight.num_steps
    alg = ditto(optax.sgd(0.2), 1.0, lam=0.3)
    params = model.init(jax.random.key(0))
    results = []
    for cohort, chunk in ((tight, 1), (padded, 2)):
        state, _ = jit_round(alg, model, parallel.Plan(chunk))(alg.init(params), cohort,
                                                              jax.random.key(0))
        results.append(state)
    a = results[0]
    for b in results[1:]:
        close(a.params, b.params, 1e-6)
        for cid in (0, 2):
            close(personal_model(a, cid), personal_model(b, cid), 1e-6)
        # The empty client's row holds its fresh personal model w_t.
        close(personal_model(b, 7), params, 1e-7)


def trained_two_clients(alg, model):
    """Two clients, client 0 trained for two rounds, client 1 never."""
    data = unequal_clients(sizes=(5, 3), seed=4)
    state = alg.init(model.init(jax.random.key(2)))
    step = jit_round(alg, model)
    for r in range(2):
        cohort = pack_cohort(data, [0], batch_size=2, epochs=1, seed=0, round_num=r)
        state, _ = step(state, cohort, jax.random.key(r))
    return data, state


def one_client(data, c):
    return InMemoryFederatedData({data.client_ids[c]: data.get_client(c)})


def test_evaluate_uses_personal_models():
    model = MODEL
    alg = ditto(optax.sgd(0.5), 1.0, lam=0.1)
    data, state = trained_two_clients(alg, model)
    for batch_size in (2, 3, 256):
        check_two_client_evaluation(alg, model, data, state, batch_size)


def check_two_client_evaluation(alg, model, data, state, batch_size):
    v0 = personal_model(state, 0)
    rows = client_state.rows_of(state, [0, 1])
    assert rows[0] >= 0 and rows[1] == -1  # client 1 never trained
    out = alg.evaluate(model, state, data, batch_size, EvalClients(rows))
    # Client 0 with its v_0, client 1 with the global model, by hand:
    p0 = core_evaluate.evaluate(model, v0, one_client(data, 0))
    g1 = core_evaluate.evaluate(model, state.params, one_client(data, 1))
    for name in ("loss", "accuracy"):
        np.testing.assert_allclose(out[f"personal/{name}"], p0[name], rtol=1e-6)
        np.testing.assert_allclose(out[name], (5 * p0[name] + 3 * g1[name]) / 8, rtol=1e-6)
    assert out["num_examples"] == 8 and out["personal/num_examples"] == 5
    # v_0 differs from w, so the personal evaluation is not the global one.
    g0 = core_evaluate.evaluate(model, state.params, one_client(data, 0))
    assert abs(p0["loss"] - g0["loss"]) > 1e-4
    # Without rows: the global model everywhere, exactly fedjax_core.evaluate.
    plain = alg.evaluate(model, state, data, batch_size)
    glob = core_evaluate.evaluate(model, state.params, data, batch_size)
    for name, value in glob.items():
        assert plain[name] == value
    assert plain["personal/num_examples"] == 0 and np.isnan(plain["personal/loss"])


def test_evaluate_compiles_once():
    model = MODEL
    alg = ditto(optax.sgd(0.5), 1.0, lam=0.1)
    params = model.init(jax.random.key(0))
    data = unequal_clients(sizes=(5, 2, 9, 1, 4, 7, 3))
    cohort = pack_cohort(data, list(range(7)), batch_size=2, epochs=1, seed=0, round_num=0)
    state, _ = jit_round(alg, model)(alg.init(params), cohort, jax.random.key(0))
    before = personalization._accumulate_personal._cache_size()
    outs = []
    row = [row_of(state, c) for c in range(7)]
    # Batch size 4: 11 batches when every client is personal, fewer otherwise; one shape.
    for personal in ([0, 1, 2, 3, 4, 5, 6], [0], [1, 2, 4, 6]):
        rows = np.array([row[c] if c in personal else -1 for c in range(7)])
        outs.append(alg.evaluate(model, state, data, 4, EvalClients(rows)))
    assert personalization._accumulate_personal._cache_size() - before == 1
    # All personal: the totals match evaluating each client's v directly.
    expected = 0.0
    for c in range(7):
        v = personal_model(state, c)
        loss = core_evaluate.evaluate(model, v, one_client(data, c))["loss"]
        expected += data.client_sizes[c] * loss
    np.testing.assert_allclose(outs[0]["loss"], expected / np.sum(data.client_sizes),
                               rtol=1e-6)
    np.testing.assert_allclose(outs[0]["personal/loss"], outs[0]["loss"], rtol=1e-7)


def test_needs_no_preparation_and_valid_lambda():
    """The per-client rows need no preparation: `apply` alone (no jit_round) on a cohort
    that fits the initial store is the jitted round."""
    model = MODEL
    alg = ditto(optax.sgd(0.1), 1.0)
    cohort = pack_cohort(unequal_clients(), [0], 2, 1, seed=0, round_num=0)
    state0 = alg.init(model.init(jax.random.key(0)))
    direct, _ = alg.apply(state0, cohort, jax.random.key(0), model=model)
    jitted, _ = jit_round(alg, model)(state0, cohort, jax.random.key(0))
    close(direct, jitted, 1e-6)
    assert float(tree.l2_norm(tree.sub(personal_model(direct, 0), state0.params))) > 1e-3
    with pytest.raises(ValueError, match="lam"):
        ditto(optax.sgd(0.1), 1.0, lam=-1.0)
    assert ditto_module.ENTRY.name == "ditto" and ditto_module.ENTRY.needs == ()
