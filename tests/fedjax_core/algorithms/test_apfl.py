"""APFL against a plain per-client Python loop written from the paper's Algorithm 1."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import client_state, parallel, personalization
from fedjax_core import evaluate as core_evaluate
from fedjax_core.algorithms.apfl import apfl
from fedjax_core.algorithms.base import EvalClients, jit_round
from fedjax_core.data import InMemoryFederatedData, pack_clients, pack_cohort
from fedjax_core.models.base import Model
from tests.fedjax_core.helpers import (
    close,
    tiny_softmax_model,
    unequal_clients,
    uniform_mean,
)

apfl_module = importlib.import_module("fedjax_core.algorithms.apfl")

MODEL = tiny_softmax_model()


def row_of(state, cid):
    return jax.tree.map(lambda t: t[client_state.rows_of(state, [cid])[0]], state.store.rows)


def reference_round(model, w, cohort, eta, eta_alpha, alpha0, adaptive, server_lr, store,
                    uniform=False):
    """One APFL round as the paper writes it, client by client, plain SGD, the gradients of
    v and alpha by the chain rule; `store` a dict `client -> (v, alpha)`."""
    grad = jax.jit(jax.grad(lambda q, batch: jnp.mean(model.loss(batch, model.apply(q, batch)))))
    deltas, weights = [], []
    for c in range(cohort.num_clients):
        cid = int(cohort.client_index[c])
        w_i = w
        v, alpha = store.get(cid, (w, alpha0))
        for s in range(cohort.num_steps):
            m = cohort.mask[c, s]
            if not m.any():
                continue
            batch = {k: jnp.asarray(x[c, s][m]) for k, x in cohort.batches.items()}
            vbar = jax.tree.map(lambda a, b: alpha * a + (1 - alpha) * b, v, w_i)
            g_w = grad(w_i, batch)
            g_bar = grad(vbar, batch)
            g_alpha = sum(float(jnp.sum((a - b) * g))
                          for a, b, g in zip(jax.tree.leaves(v), jax.tree.leaves(w_i),
                                             jax.tree.leaves(g_bar)))
            w_i = jax.tree.map(lambda p, g: p - eta * g, w_i, g_w)
            v = jax.tree.map(lambda p, g: p - eta * alpha * g, v, g_bar)
            if adaptive:
                alpha = min(1.0, max(0.0, alpha - eta_alpha * g_alpha))
        n = float(cohort.num_examples[c])
        if n > 0 or cid not in store:
            store[cid] = (v, alpha)
        deltas.append(jax.tree.map(lambda a, b: a - b, w, w_i))
        weights.append((1.0 if n > 0 else 0.0) if uniform else n)
    total = sum(weights)
    delta = jax.tree.map(lambda *ds: sum(wt * d for wt, d in zip(weights, ds)) / total, *deltas)
    return jax.tree.map(lambda p, d: p - server_lr * d, w, delta)


COHORTS = [[4, 0, 2], [1, 0, 3], [2, 4, 0]]  # client 0 returns twice, 2 and 4 once


@pytest.mark.parametrize("adaptive, eta_alpha, uniform", [
    (True, 0.5, False),
    (True, 20.0, True),   # large steps: the projection onto [0, 1] is exercised
    (False, None, False),
])
def test_matches_paper_loop(adaptive, eta_alpha, uniform):
    model = MODEL
    data = unequal_clients()
    eta, alpha0, server_lr = 0.3, 0.25, 0.7
    alg = apfl(optax.sgd(eta), server_lr, client_learning_rate=eta, alpha=alpha0,
               adaptive_alpha=adaptive, alpha_learning_rate=eta_alpha,
               aggregator=uniform_mean() if uniform else None)
    params = model.init(jax.random.key(1))
    state = alg.init(params)
    ref, store = params, {}
    step = jit_round(alg, model)
    for r, idx in enumerate(COHORTS):
        cohort = pack_cohort(data, idx, batch_size=2, epochs=2, seed=3, round_num=r, steps=12)
        state, metrics = step(state, cohort, jax.random.key(r))
        ref = reference_round(model, ref, cohort, eta, eta_alpha, alpha0, adaptive, server_lr,
                              store, uniform)
        close(state.params, ref)
        for cid, (v, alpha) in store.items():
            row = row_of(state, cid)
            close(row["v"], v)
            np.testing.assert_allclose(row["alpha"], alpha, atol=1e-5)
    alphas = [a for _, a in store.values()]
    if adaptive:
        assert any(abs(a - alpha0) > 1e-3 for a in alphas)
        if eta_alpha > 1:
            assert any(a in (0.0, 1.0) for a in alphas)
    else:
        assert all(a == alpha0 for a in alphas)
    assert float(metrics["train/num_examples"]) == 9 + 4 + 5
    assert 0.0 <= float(metrics["apfl/mean_alpha"]) <= 1.0
    assert np.isfinite(float(metrics["train/personal_loss"]))


def scalar_regression_model() -> Model:
    def apply(params, batch, key=None, train=False):
        del key, train
        return batch["x"] @ params["w"]

    def loss(batch, preds):
        return 0.5 * jnp.square(preds - batch["y"])

    def metrics(batch, preds):
        return {"loss": (loss(batch, preds), jnp.ones_like(preds))}

    return Model(lambda key: {"w": jnp.zeros(1)}, apply, loss, metrics)


def test_hand_computed_two_rounds():
    """1-d least squares, one client with one example (x=2, y=1), eta 0.1, alpha 0.25, w_0 = 1.
    Round 1 (v = w = 1, so g_alpha = 0):
      w = 1 - 0.1*2 = 0.8;  v = 1 - 0.1*0.25*2 = 0.95;  alpha = 0.25
    Round 2 (w = 0.8): vbar = 0.25*0.95 + 0.75*0.8 = 0.8375, grad f(vbar) = 2*(1.675 - 1) = 1.35
      w = 0.8 - 0.1*1.2 = 0.68;  v = 0.95 - 0.1*0.25*1.35 = 0.91625;
      alpha = 0.25 - 0.1*(0.95 - 0.8)*1.35 = 0.22975
    """
    model = scalar_regression_model()
    client = {"x": np.array([[2.0]], np.float32), "y": np.array([1.0], np.float32)}
    alg = apfl(optax.sgd(0.1), 1.0, client_learning_rate=0.1, alpha=0.25)
    state = alg.init({"w": jnp.array([1.0])})
    step = jit_round(alg, model)
    cohort = pack_clients([client], batch_size=1, bucket=False)
    state, _ = step(state, cohort, jax.random.key(0))
    np.testing.assert_allclose(state.params["w"], [0.8], rtol=1e-6)
    np.testing.assert_allclose(state.store.rows["v"]["w"][0], [0.95], rtol=1e-6)
    np.testing.assert_allclose(state.store.rows["alpha"][0], 0.25, rtol=1e-6)
    state, metrics = step(state, cohort, jax.random.key(1))
    np.testing.assert_allclose(state.params["w"], [0.68], rtol=1e-6)
    np.testing.assert_allclose(state.store.rows["v"]["w"][0], [0.91625], rtol=1e-6)
    np.testing.assert_allclose(state.store.rows["alpha"][0], 0.22975, rtol=1e-6)
    np.testing.assert_allclose(metrics["train/personal_loss"], 0.5 * 0.675 ** 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["apfl/mean_alpha"], 0.22975, rtol=1e-6)


def test_result_does_not_depend_on_chunk_size():
    model = MODEL
    data = unequal_clients()
    alg = apfl(optax.sgd(0.2), 1.0, client_learning_rate=0.2, alpha=0.5)
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
    for name in ("train/personal_loss", "apfl/mean_alpha"):
        np.testing.assert_allclose(ma[name], mb[name], rtol=1e-6)


def test_padding_changes_nothing():
    """Padded steps and an empty client change neither w nor the real clients' (v, alpha)."""
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
    alg = apfl(optax.sgd(0.2), 1.0, client_learning_rate=0.2, alpha=0.5)
    params = model.init(jax.random.key(0))
    results = []
    for cohort, chunk in ((tight, 1), (padded, 2)):
        state = alg.init(params)
        state, metrics = jit_round(alg, model, parallel.Plan(chunk))(state, cohort,
                                                                     jax.random.key(0))
        results.append((state, metrics))
    (a, ma), (b, mb) = results
    close(a.params, b.params, 1e-6)
    for cid in (0, 2):
        close(row_of(a, cid), row_of(b, cid), 1e-6)
    close(row_of(b, 7), {"v": params, "alpha": jnp.float32(0.5)}, 1e-7)
    np.testing.assert_allclose(ma["apfl/mean_alpha"], mb["apfl/mean_alpha"], rtol=1e-6)


def test_evaluate_uses_the_mixture():
    model = MODEL
    alg = apfl(optax.sgd(0.5), 1.0, client_learning_rate=0.5, alpha=0.25,
               alpha_learning_rate=0.05)
    data = unequal_clients(sizes=(5, 3), seed=4)
    state = alg.init(model.init(jax.random.key(2)))
    step = jit_round(alg, model)
    for r in range(2):
        cohort = pack_cohort(data, [0], batch_size=2, epochs=1, seed=0, round_num=r)
        state, _ = step(state, cohort, jax.random.key(r))
    row = row_of(state, 0)
    alpha = float(row["alpha"])
    assert 0.0 < alpha < 1.0 and alpha != 0.25
    mixture = jax.tree.map(lambda v, w: alpha * v + (1 - alpha) * w, row["v"], state.params)
    one = lambda c: InMemoryFederatedData({data.client_ids[c]: data.get_client(c)})  # noqa: E731
    p0 = core_evaluate.evaluate(model, mixture, one(0))
    g0 = core_evaluate.evaluate(model, state.params, one(0))
    g1 = core_evaluate.evaluate(model, state.params, one(1))
    assert abs(p0["loss"] - g0["loss"]) > 1e-4
    for batch_size in (2, 3, 256):
        out = alg.evaluate(model, state, data, batch_size,
                           EvalClients(np.array([client_state.rows_of(state, [0])[0], -1])))
        for name in ("loss", "accuracy"):
            np.testing.assert_allclose(out[f"personal/{name}"], p0[name], rtol=1e-5)
            np.testing.assert_allclose(out[name], (5 * p0[name] + 3 * g1[name]) / 8, rtol=1e-5)
        assert out["num_examples"] == 8 and out["personal/num_examples"] == 5
    plain = alg.evaluate(model, state, data, 4)
    glob = core_evaluate.evaluate(model, state.params, data, 4)
    for name, value in glob.items():
        assert plain[name] == value
    # All clients at row -1 through the personal path too: the global model.
    totals = personalization.personal_metric_totals(
        model, apfl_module._select_mixture, state.store.rows, state.params, data,
        np.array([-1, -1]), 2)
    expected = core_evaluate.metric_totals(model, state.params, data, 2)
    for name in expected:
        close(totals[name], expected[name], 1e-6)


def test_options_are_validated():
    with pytest.raises(ValueError, match="alpha"):
        apfl(optax.sgd(0.1), 1.0, client_learning_rate=0.1, alpha=1.5)
    with pytest.raises(ValueError, match="client_learning_rate"):
        apfl(optax.sgd(0.1), 1.0)
    apfl(optax.sgd(0.1), 1.0, adaptive_alpha=False)  # a fixed alpha needs no step size
    model = MODEL
    alg = apfl(optax.sgd(0.1), 1.0, client_learning_rate=0.1)
    cohort = pack_cohort(unequal_clients(), [0], 2, 1, seed=0, round_num=0)
    # No host preparation: the state carries its index, and a cohort that fits the
    # initial store runs through `apply` directly (jit_round grows stores when needed).
    state, _ = alg.apply(alg.init(model.init(jax.random.key(0))), cohort, jax.random.key(0),
                         model=model)
    assert client_state.rows_of(state, [0]).tolist() == [0]
    assert apfl_module.ENTRY.needs == ("client_learning_rate",)
    built = apfl_module.ENTRY.build(optax.sgd(0.1), 1.0, client_learning_rate=0.1)
    assert built.evaluate is not None


@pytest.mark.parametrize("fedjax_compat", [False, True])
def test_per_client_alpha_is_each_clients_alpha(fedjax_compat):
    """`per_client=True` reports each client's alpha_i after the round (in the FedJAX mode,
    the mean of its per-leaf alphas), the value its store row keeps."""
    model, data = MODEL, unequal_clients()
    alg = apfl(optax.sgd(0.3), 1.0, client_learning_rate=None if fedjax_compat else 0.3,
               alpha=0.25, fedjax_compat=fedjax_compat)
    state = alg.init(model.init(jax.random.key(0)))
    step = jit_round(alg, model, per_client=True)
    for r, idx in enumerate([[4, 0, 2], [1, 0, 3]]):
        cohort = pack_cohort(data, idx, batch_size=2, epochs=2, seed=0, round_num=r, steps=12)
        state, metrics, per = step(state, cohort, jax.random.key(r))
    alphas = [np.mean(jax.tree.leaves(row_of(state, cid)["alpha"])) for cid in (1, 0, 3)]
    np.testing.assert_allclose(per["alpha"], alphas, rtol=1e-6)
    assert float(per["alpha"][1]) != 0.25  # client 0's second round moved its alpha
    np.testing.assert_allclose(per["num_examples"], [2, 5, 1])
    np.testing.assert_allclose(metrics["apfl/mean_alpha"], np.average(alphas, weights=[2, 5, 1]),
                               rtol=1e-6)
