"""q-FedAvg against a plain per-client Python loop written from Algorithm 2 of the paper."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import parallel
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.qffl import ENTRY, qffl
from fedjax_core.data import pack_clients, pack_cohort
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients


def assert_trees_close(a, b, tol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=tol, rtol=tol), a, b)


@functools.lru_cache(maxsize=None)
def loss_grad(model):
    """grad_w of the batch's mean loss (jitted only for speed)."""
    return jax.jit(jax.grad(lambda p, batch: jnp.mean(model.loss(batch, model.apply(p, batch)))))


def client_loss(model, params, data, i):
    """F_k(w): the mean loss over the client's examples, read from the dataset."""
    c = {k: jnp.asarray(v) for k, v in data.get_client(i).items()}
    return float(jnp.mean(model.loss(c, model.apply(params, c))))


def reference_round(model, params, cohort, data, indices, eta, q, server_lr=1.0):
    """q-FedAvg (Algorithm 2), one client and one local SGD step at a time."""
    L = 1.0 / eta
    deltas, hs, losses = [], [], []
    for c, i in enumerate(indices):
        f = client_loss(model, params, data, i)
        w = params
        for s in range(cohort.num_steps):
            m = cohort.mask[c, s]
            if not m.any():
                continue
            batch = {k: jnp.asarray(v[c, s][m]) for k, v in cohort.batches.items()}
            w = jax.tree.map(lambda wi, gi: wi - eta * gi, w, loss_grad(model)(w, batch))
        dw = jax.tree.map(lambda a, b: L * (np.asarray(a) - np.asarray(b)), params, w)
        sq = sum(float(np.sum(x ** 2)) for x in jax.tree.leaves(dw))
        deltas.append(jax.tree.map(lambda x: f ** q * x, dw))
        hs.append(q * f ** (q - 1) * sq + L * f ** q)
        losses.append(f)
    total = jax.tree.map(lambda *xs: sum(xs), *deltas)
    new = jax.tree.map(lambda w0, x: w0 - server_lr * x / sum(hs), params, total)
    return new, losses


@pytest.mark.parametrize("q", [0.0, 1.0, 2.5])
def test_qffl_matches_plain_loop(q):
    model = tiny_softmax_model()
    data = unequal_clients()
    eta = 0.3
    alg = qffl(optax.sgd(eta), client_learning_rate=eta, q=q)
    params = model.init(jax.random.key(1))
    state, ref = alg.init(params), params
    step = jit_round(alg, model)
    for r in range(2):
        indices = [[4, 0, 2, 1], [3, 2, 0]][r]
        cohort = pack_cohort(data, indices, batch_size=2, epochs=2, seed=3, round_num=r,
                             max_steps=7)  # cuts the 9-example client's 2nd epoch
        state, metrics = step(state, cohort, jax.random.key(r))
        ref, losses = reference_round(model, ref, cohort, data, indices, eta, q)
        assert_trees_close(state.params, ref)
        np.testing.assert_allclose(metrics["train/client_loss_mean"], np.mean(losses), rtol=1e-5)
        np.testing.assert_allclose(metrics["train/client_loss_variance"], np.var(losses),
                                   rtol=1e-4, atol=1e-7)


def test_q_zero_is_unweighted_fedavg():
    """q = 0: Delta_k = L (w_t - wbar_k), h_k = L, so w_{t+1} = w_t - mean_k (w_t - wbar_k)."""
    model = tiny_softmax_model()
    params = model.init(jax.random.key(2))
    # Equal sizes: the unweighted mean is FedAvg's example-weighted mean.
    data = unequal_clients(sizes=(4, 4, 4))
    cohort = pack_cohort(data, [0, 1, 2], batch_size=3, epochs=2, seed=1, round_num=0)
    q0 = qffl(optax.sgd(0.3), client_learning_rate=0.3, q=0.0)
    avg = fedavg(optax.sgd(0.3), optax.sgd(1.0))
    a, _ = jit_round(q0, model)(q0.init(params), cohort, jax.random.key(0))
    b, _ = jit_round(avg, model)(avg.init(params), cohort, jax.random.key(0))
    assert_trees_close(a.params, b.params, 1e-6)
    # Unequal sizes: each client counts once, whatever its size. FedAvg on a cohort where
    # every client is weighted 1 is the same thing: give each client its own fedavg round.
    data = unequal_clients()
    clients = [data.get_client(i) for i in (0, 1, 2)]
    cohort = pack_clients(clients, batch_size=2, epochs=1)
    a, _ = jit_round(q0, model)(q0.init(params), cohort, jax.random.key(0))
    singles = [jit_round(avg, model)(avg.init(params), pack_clients([c], batch_size=2),
                                     jax.random.key(0))[0].params for c in clients]
    want = jax.tree.map(lambda *ws: sum(ws) / 3, *singles)
    assert_trees_close(a.params, want, 1e-6)


def test_hand_computed_h_and_step():
    """One client, one step of plain SGD from the loss F at w_t: Dw = grad F(w_t) = g,
    Delta = F^q g, h = q F^(q-1) ||g||^2 + F^q / eta, w_{t+1} = w_t - F^q g / h."""
    model = tiny_softmax_model()
    x = np.array([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]], np.float32)
    y = np.array([0, 3], np.int32)
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10.0
    b = np.array([0.1, -0.2, 0.0, 0.3], np.float32)
    logits = x @ w + b
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    f = float(-np.mean(logp[np.arange(2), y]))
    err = np.exp(logp) - np.eye(4, dtype=np.float32)[y]
    g = {"w": x.T @ err / 2, "b": err.mean(0)}
    sq = float(np.sum(g["w"] ** 2) + np.sum(g["b"] ** 2))
    eta, q = 0.5, 2.0
    h = q * f ** (q - 1) * sq + f ** q / eta
    want = {k: v - f ** q * g[k] / h for k, v in {"w": w, "b": b}.items()}
    alg = qffl(optax.sgd(eta), client_learning_rate=eta, q=q)
    cohort = pack_clients([{"x": x, "y": y}], batch_size=2, epochs=1)
    state, metrics = jit_round(alg, model)(alg.init({"w": jnp.asarray(w), "b": jnp.asarray(b)}),
                                           cohort, jax.random.key(0))
    assert_trees_close(state.params, want, 1e-5)
    np.testing.assert_allclose(metrics["train/h_mean"], h, rtol=1e-5)
    np.testing.assert_allclose(metrics["train/client_loss_variance"], 0.0, atol=1e-12)


def test_server_learning_rate_scales_the_step():
    model = tiny_softmax_model()
    data = unequal_clients()
    params = model.init(jax.random.key(3))
    cohort = pack_cohort(data, [0, 2, 4], batch_size=2, epochs=1, seed=0, round_num=0)
    full = qffl(optax.sgd(0.2), 1.0, client_learning_rate=0.2, q=1.0)
    half = qffl(optax.sgd(0.2), 0.5, client_learning_rate=0.2, q=1.0)
    a, _ = jit_round(full, model)(full.init(params), cohort, jax.random.key(0))
    b, _ = jit_round(half, model)(half.init(params), cohort, jax.random.key(0))
    jax.tree.map(lambda p0, pa, pb: np.testing.assert_allclose(pb - p0, (pa - p0) / 2, atol=1e-6),
                 params, a.params, b.params)


@pytest.mark.parametrize("chunk_size", [3])
def test_chunk_size_and_empty_client_change_nothing(chunk_size):
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = qffl(optax.sgd(0.2), client_learning_rate=0.2, q=1.5)
    state0 = alg.init(model.init(jax.random.key(0)))
    clients = [data.get_client(i) for i in range(5)]
    empty = {k: v[:0] for k, v in clients[0].items()}
    cohort = pack_clients(clients, batch_size=2, epochs=2)
    padded = pack_clients(clients[:2] + [empty] + clients[2:], batch_size=2, epochs=2)
    one, m1 = jit_round(alg, model, parallel.Plan(1))(state0, cohort, jax.random.key(5))
    many, mc = jit_round(alg, model, parallel.Plan(chunk_size))(state0, padded,
                                                               jax.random.key(5))
    assert_trees_close(one.params, many.params, 1e-6)
    for name in ("train/loss", "train/client_loss_mean", "train/client_loss_variance",
                 "train/h_mean"):
        np.testing.assert_allclose(m1[name], mc[name], rtol=1e-5)


def test_registry_entry_builds():
    assert ENTRY.name == "qffl" and ENTRY.needs == ("client_learning_rate",)
    model = tiny_softmax_model()
    cohort = pack_cohort(unequal_clients(), [0, 1], 2, 1, seed=0, round_num=0)
    alg = ENTRY.build(optax.sgd(0.1), 1.0, client_learning_rate=0.1)
    state, metrics = jit_round(alg, model)(alg.init(model.init(jax.random.key(0))), cohort,
                                           jax.random.key(0))
    assert {"train/loss", "train/num_examples", "train/delta_norm",
            "train/client_loss_variance"} <= set(metrics)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    with pytest.raises(ValueError, match="q must be"):
        qffl(optax.sgd(0.1), client_learning_rate=0.1, q=-1.0)
