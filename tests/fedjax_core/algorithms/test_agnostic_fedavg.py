"""Agnostic FedAvg against a plain per-client Python loop and hand-computed rounds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import parallel
from fedjax_core.algorithms.agnostic_fedavg import (
    ENTRY,
    AgnosticServer,
    agnostic_fedavg,
    update_domain_weights,
)
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.data import InMemoryFederatedData, pack_clients, pack_cohort
from fedjax_core.models.base import Model
from tests.fedjax_core.helpers import tiny_softmax_model

TOL = dict(atol=1e-5, rtol=1e-5)


def assert_trees_close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **TOL), a, b)


def domain_clients(sizes=(5, 2, 9, 4), num_domains=3, features=3, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return InMemoryFederatedData({
        f"c{i}": {"x": rng.normal(size=(n, features)).astype(np.float32),
                  "y": rng.integers(0, classes, size=n).astype(np.int32),
                  "domain_id": rng.integers(0, num_domains, size=n).astype(np.int32)}
        for i, n in enumerate(sizes)})


def reference_round(model, params, server_state, lam, window, cohort, data, indices,
                    client_opt, server_opt, domain_lr, batch_loss):
    """One round of Agnostic FedAvg (FedJAX's rule), client by client, step by step."""
    num_domains = len(lam)
    alpha = lam / window.mean(axis=0)
    # Per-client, per-domain loss sums and counts at the round's params, every example once.
    L = np.zeros((len(indices), num_domains))
    N = np.zeros((len(indices), num_domains))
    for k, i in enumerate(indices):
        arrays = {f: jnp.asarray(v) for f, v in data.get_client(int(i)).items()}
        losses = np.asarray(model.loss(arrays, model.apply(params, arrays)))
        for j, d in enumerate(np.asarray(arrays["domain_id"])):
            L[k, d] += losses[j]
            N[k, d] += 1
    beta = (alpha[None] * N).sum(axis=1)

    @jax.jit
    @jax.grad
    def objective_grad(p, batch, a, beta_k, n_k):
        per_example = a * model.loss(batch, model.apply(p, batch)) / beta_k
        if batch_loss == "mean":  # unbiased estimate of F_k = sum_j alpha_j l_j / beta_k
            return n_k * jnp.mean(per_example)
        return jnp.sum(per_example)  # FedJAX

    deltas = []
    for k in range(cohort.num_clients):
        w, opt_state = params, client_opt.init(params)
        for s in range(cohort.num_steps):
            m = cohort.mask[k, s]
            if not m.any():
                continue
            batch = {f: jnp.asarray(v[k, s][m]) for f, v in cohort.batches.items()}
            a = jnp.asarray(alpha, jnp.float32)[batch["domain_id"]]
            grads = objective_grad(w, batch, a, beta[k], N[k].sum())
            updates, opt_state = client_opt.update(grads, opt_state, w)
            w = optax.apply_updates(w, updates)
        deltas.append(jax.tree.map(jnp.subtract, params, w))
    mean_delta = jax.tree.map(
        lambda *ds: sum(b * d for b, d in zip(beta, ds)) / beta.sum(), *deltas)
    updates, server_state = server_opt.update(mean_delta, server_state, params)
    params = optax.apply_updates(params, updates)

    domain_num = N.sum(axis=0)
    domain_loss = np.where(domain_num > 0, L.sum(axis=0) / np.maximum(domain_num, 1), 0.0)
    lam = lam * np.exp(domain_lr * domain_loss)
    lam = lam / lam.sum()
    window = np.concatenate([window[1:], domain_num[None]])
    return params, server_state, lam, window, domain_loss


@pytest.mark.parametrize("batch_loss, client_opt", [
    ("mean", optax.sgd(0.3)),
    ("sum", optax.sgd(0.5)),
    ("mean", optax.adam(0.05)),
])
def test_matches_plain_loop(batch_loss, client_opt):
    model = tiny_softmax_model()
    data = domain_clients()
    server_opt = optax.sgd(0.7, momentum=0.5)
    alg = agnostic_fedavg(client_opt, server_opt, num_domains=3, domain_learning_rate=0.5,
                          domain_window_size=2, init_domain_weights=[0.2, 0.3, 0.5],
                          init_domain_window=[2.0, 1.0, 3.0], batch_loss=batch_loss)
    params = model.init(jax.random.key(1))
    state = alg.init(params)
    ref = (params, server_opt.init(params), np.array([0.2, 0.3, 0.5]),
           np.array([[2.0, 1.0, 3.0]] * 2))
    step = jit_round(alg, model)
    indices = [3, 0, 2, 1]
    for r in range(3):
        cohort = pack_cohort(data, indices, batch_size=2, epochs=2, seed=3, round_num=r)
        state, metrics = step(state, cohort, jax.random.key(r))
        *ref, domain_loss = reference_round(model, *ref, cohort, data, indices, client_opt,
                                            server_opt, 0.5, batch_loss)
        assert_trees_close(state.params, ref[0])
        np.testing.assert_allclose(state.server.domain_weights, ref[2], **TOL)
        np.testing.assert_allclose(state.server.domain_window, ref[3], **TOL)
        for d in range(3):
            np.testing.assert_allclose(metrics[f"agnostic/domain_weight_{d}"], ref[2][d], **TOL)
            np.testing.assert_allclose(metrics[f"agnostic/domain_loss_{d}"], domain_loss[d], **TOL)
    assert float(metrics["train/num_examples"]) == 4 + 5 + 9 + 2
    assert not np.allclose(ref[2], [0.2, 0.3, 0.5])  # the weights moved


def test_one_domain_is_fedavg():
    model = tiny_softmax_model()
    data = domain_clients(num_domains=1)
    agn = agnostic_fedavg(optax.sgd(0.3), optax.sgd(0.7), num_domains=1)
    avg = fedavg(optax.sgd(0.3), optax.sgd(0.7))
    params = model.init(jax.random.key(0))
    s_agn, s_avg = agn.init(params), avg.init(params)
    step_agn, step_avg = jit_round(agn, model), jit_round(avg, model)
    for r in range(3):
        cohort = pack_cohort(data, [0, 1, 2, 3], batch_size=3, epochs=2, seed=2, round_num=r)
        s_agn, m_agn = step_agn(s_agn, cohort, jax.random.key(r))
        s_avg, m_avg = step_avg(s_avg, cohort, jax.random.key(r))
        assert_trees_close(s_agn.params, s_avg.params)
        np.testing.assert_allclose(m_agn["train/loss"], m_avg["train/loss"], **TOL)
    np.testing.assert_allclose(s_agn.server.domain_weights, [1.0])
    np.testing.assert_allclose(s_agn.server.domain_window, [[20.0]])


def linear_model() -> Model:
    """Per-example loss `x * w` for a scalar w (gradient `x`)."""
    def apply(params, batch, key=None, train=False):
        del key, train
        return batch["x"] * params["w"]

    def loss(batch, preds):
        del batch
        return preds

    def metrics(batch, preds):
        return {"loss": (preds, jnp.ones_like(preds))}

    return Model(lambda key: {"w": jnp.float32(4.0)}, apply, loss, metrics)


def hand_cohort():
    """Client 0: x [1, 2, 4 | 3, 6, 1], domains [1, 0, 0 | 0, 2, 2]; client 1: x [8, 10, 5],
    domains [1, 3, 1]; batch 3, one epoch."""
    clients = [{"x": np.array([1, 2, 4, 3, 6, 1], np.float32),
                "domain_id": np.array([1, 0, 0, 0, 2, 2], np.int32)},
               {"x": np.array([8, 10, 5], np.float32),
                "domain_id": np.array([1, 3, 1], np.int32)}]
    return pack_clients(clients, batch_size=3, epochs=1, bucket=False)


@pytest.mark.parametrize("batch_loss", ["sum", "mean"])
def test_hand_computed_round(batch_loss):
    # w = 4, loss x * w. Client 0: x [1, 2, 4 | 3, 6, 1], domains [1, 0, 0 | 0, 2, 2];
    # client 1: x [8, 10, 5], domains [1, 3, 1]. Batch 3, one epoch, client sgd(1),
    # server sgd(0.1), lambda = [.1, .2, .3, .4], window 2 x [1, 2, 3, 4].
    # alpha = lambda / [1, 2, 3, 4] = 0.1 everywhere; N_0 = [3, 1, 2, 0], N_1 = [0, 2, 0, 1];
    # beta_0 = 0.6, beta_1 = 0.3.
    # "sum" (FedJAX): step gradient sum_b 0.1 x / beta: Delta_0 = 17 / 6, Delta_1 = 23 / 3.
    # "mean": omega = 0.1 N_k / beta_k = 1, step gradient mean_b x:
    #         Delta_0 = 7 / 3 + 10 / 3 = 17 / 3, Delta_1 = 23 / 3.
    # Server: w = 4 - 0.1 (0.6 Delta_0 + 0.3 Delta_1) / 0.9.
    # Domain mean losses at w = 4: [4 * 9 / 3, 4 * 14 / 3, 4 * 7 / 2, 4 * 10] = [12, 56/3, 14, 40];
    # EG with eta 0.01: lambda ~ [.1 e^.12, .2 e^(.56/3), .3 e^.14, .4 e^.4], normalised.
    model = linear_model()
    cohort = hand_cohort()
    alg = agnostic_fedavg(optax.sgd(1.0), optax.sgd(0.1), num_domains=4,
                          domain_learning_rate=0.01, domain_window_size=2,
                          init_domain_weights=[0.1, 0.2, 0.3, 0.4],
                          init_domain_window=[1.0, 2.0, 3.0, 4.0], batch_loss=batch_loss)
    state = alg.init(model.init(None))
    np.testing.assert_allclose(state.server.domain_window, [[1, 2, 3, 4], [1, 2, 3, 4]])
    state, metrics = jit_round(alg, model)(state, cohort, jax.random.key(0))

    delta = [17 / 6, 23 / 3] if batch_loss == "sum" else [17 / 3, 23 / 3]
    w = 4 - 0.1 * (0.6 * delta[0] + 0.3 * delta[1]) / 0.9
    lam = np.array([0.1, 0.2, 0.3, 0.4]) * np.exp(0.01 * np.array([12, 56 / 3, 14, 40]))
    lam /= lam.sum()
    np.testing.assert_allclose(state.params["w"], w, **TOL)
    np.testing.assert_allclose(state.server.domain_weights, lam, **TOL)
    np.testing.assert_allclose(state.server.domain_window, [[1, 2, 3, 4], [3, 3, 2, 1]])
    np.testing.assert_allclose([metrics[f"agnostic/domain_loss_{d}"] for d in range(4)],
                               [12, 56 / 3, 14, 40], **TOL)
    np.testing.assert_allclose(metrics["agnostic/loss"], 4 * 40 / 9, **TOL)
    if batch_loss == "sum":  # FedJAX's agnostic_fed_avg_test gives these for this round.
        np.testing.assert_allclose(state.params["w"], 3.5555556, **TOL)
        np.testing.assert_allclose(state.server.domain_weights,
                                   [0.08702461, 0.18604803, 0.2663479, 0.46057943], **TOL)


def test_per_client_alpha_and_beta():
    # test_hand_computed_round's clients: alpha = 0.1 for every domain, beta = [0.6, 0.3].
    model = linear_model()
    cohort = hand_cohort()
    alg = agnostic_fedavg(optax.sgd(1.0), optax.sgd(0.1), num_domains=4,
                          init_domain_weights=[0.1, 0.2, 0.3, 0.4],
                          init_domain_window=[1.0, 2.0, 3.0, 4.0])
    _, _, per_client = jit_round(alg, model, per_client=True)(
        alg.init(model.init(None)), cohort, jax.random.key(0))
    np.testing.assert_allclose(per_client["alpha"], np.full((2, 4), 0.1), **TOL)
    np.testing.assert_allclose(per_client["beta"], [0.6, 0.3], **TOL)
    np.testing.assert_allclose(per_client["weight"], [0.6, 0.3], **TOL)
    np.testing.assert_allclose(per_client["num_examples"], [6, 3])


def test_update_domain_weights():
    lam = jnp.array([0.1, 0.2, 0.3, 0.4])
    loss = jnp.array([10.0, 0.0, 5.0, 0.0])
    expected = np.array([0.1 * np.e, 0.2, 0.3 * np.exp(0.5), 0.4])
    np.testing.assert_allclose(update_domain_weights(lam, loss, 0.1), expected / expected.sum(),
                               **TOL)
    np.testing.assert_allclose(update_domain_weights(lam, loss, 0.1, "none"), lam)
    with pytest.raises(ValueError, match="domain_algorithm"):
        update_domain_weights(lam, loss, 0.1, "sgd")


def test_chunk_size_and_padding_change_nothing():
    model = tiny_softmax_model()
    data = domain_clients()
    clients = [data.get_client(i) for i in range(4)]
    empty = {k: v[:0] for k, v in clients[0].items()}
    alg = agnostic_fedavg(optax.sgd(0.3), optax.sgd(1.0), num_domains=3,
                          domain_learning_rate=1.0)
    state0 = alg.init(model.init(jax.random.key(0)))
    plain = pack_clients(clients, batch_size=2, epochs=2, bucket=False)
    padded = pack_clients(clients[:2] + [empty] + clients[2:], batch_size=2, epochs=2)
    a, ma = jit_round(alg, model, parallel.Plan(1))(state0, plain, jax.random.key(0))
    b, mb = jit_round(alg, model, parallel.Plan(3))(state0, padded, jax.random.key(0))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)
    for name in ma:
        np.testing.assert_allclose(ma[name], mb[name], rtol=1e-6, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="sum to 1"):
        agnostic_fedavg(optax.sgd(0.1), optax.sgd(1.0), num_domains=2, init_domain_weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="init_domain_window"):
        agnostic_fedavg(optax.sgd(0.1), optax.sgd(1.0), num_domains=2, init_domain_window=[1.0])
    with pytest.raises(ValueError, match="batch_loss"):
        agnostic_fedavg(optax.sgd(0.1), optax.sgd(1.0), num_domains=2, batch_loss="median")
    model = tiny_softmax_model()
    alg = agnostic_fedavg(optax.sgd(0.1), optax.sgd(1.0), num_domains=2)
    no_domains = pack_clients([{"x": np.ones((3, 3), np.float32), "y": np.zeros(3, np.int32)}], 2)
    with pytest.raises(ValueError, match="domain_id"):
        alg.apply(alg.init(model.init(jax.random.key(0))), no_domains, jax.random.key(0),
                  model=model)


def test_registry_entry():
    assert ENTRY.name == "agnostic_fedavg" and ENTRY.needs == ("num_domains",)
    model = tiny_softmax_model()
    alg = ENTRY.build(optax.sgd(0.1), 1.0, aggregator=None, num_domains=3)
    state = alg.init(model.init(jax.random.key(0)))
    assert isinstance(state.server, AgnosticServer)
    cohort = pack_cohort(domain_clients(), [0, 1], batch_size=2, epochs=1, seed=0, round_num=0)
    _, metrics = jit_round(alg, model)(state, cohort, jax.random.key(0))
    assert {"train/loss", "train/num_examples", "train/delta_norm",
            "agnostic/domain_weight_2"} <= set(metrics)
