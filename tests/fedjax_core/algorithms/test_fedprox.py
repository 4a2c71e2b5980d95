"""FedProx against a plain per-client Python loop and hand-computed values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import parallel
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.fedprox import ENTRY, fedprox
from fedjax_core.data import pack_clients, pack_cohort
from fedjax_core.models.base import Model
from tests.fedjax_core.helpers import (
    plain_local_train,
    tiny_softmax_model,
    unequal_clients,
)


def assert_trees_close(a, b, tol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=tol, rtol=tol), a, b)


@functools.lru_cache(maxsize=None)
def prox_grad(model, mu):
    """grad_w of mean_batch loss(w) + mu/2 ||w - w_t||^2 (jitted only for speed)."""
    def objective(p, w_t, batch):
        loss = jnp.mean(model.loss(batch, model.apply(p, batch)))
        prox = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(w_t)))
        return loss + mu / 2 * prox
    return jax.jit(jax.grad(objective))


def reference_round(model, params, cohort, client_opt, mu, server_lr):
    """One FedProx round as in the paper, one client and one step at a time."""
    deltas, weights = [], []
    for c in range(cohort.num_clients):
        grad = prox_grad(model, mu)
        w = plain_local_train(model, params, cohort, c, client_opt,
                              lambda w, batch: grad(w, params, batch))
        deltas.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, w))
        weights.append(float(cohort.num_examples[c]))
    total = sum(weights)
    mean_delta = jax.tree.map(lambda *ds: sum(wt * d for wt, d in zip(weights, ds)) / total,
                              *deltas)
    return jax.tree.map(lambda p, d: p - server_lr * d, params, mean_delta)


@pytest.mark.parametrize("client_opt, mu, server_lr", [
    (optax.sgd(0.3), 0.5, 1.0),
    (optax.sgd(0.2, momentum=0.9), 2.0, 0.7),
])
def test_fedprox_matches_plain_loop(client_opt, mu, server_lr):
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = fedprox(client_opt, server_lr, proximal_weight=mu)
    params = model.init(jax.random.key(1))
    state = alg.init(params)
    ref = params
    step = jit_round(alg, model)
    for r in range(3):
        cohort = pack_cohort(data, [4, 0, 2, 1], batch_size=2, epochs=2, seed=3, round_num=r)
        state, metrics = step(state, cohort, jax.random.key(r))
        ref = reference_round(model, ref, cohort, client_opt, mu, server_lr)
        assert_trees_close(state.params, ref)
    assert float(metrics["train/num_examples"]) == 4 + 5 + 9 + 2
    # The proximal term matters here: FedAvg lands elsewhere.
    avg = fedavg(client_opt, optax.sgd(server_lr))
    s_avg, _ = jit_round(avg, model)(avg.init(ref), cohort, jax.random.key(0))
    s_prox, _ = step(alg.init(ref), cohort, jax.random.key(0))
    assert not np.allclose(s_avg.params["w"], s_prox.params["w"], atol=1e-4)


def test_zero_proximal_weight_is_fedavg():
    model = tiny_softmax_model()
    data = unequal_clients()
    params = model.init(jax.random.key(2))
    prox = fedprox(optax.sgd(0.3), 0.8, proximal_weight=0.0)
    avg = fedavg(optax.sgd(0.3), optax.sgd(0.8))
    sp, sa = prox.init(params), avg.init(params)
    for r in range(2):
        cohort = pack_cohort(data, [0, 1, 2, 3], batch_size=3, epochs=2, seed=1, round_num=r)
        sp, mp = jit_round(prox, model)(sp, cohort, jax.random.key(r))
        sa, ma = jit_round(avg, model)(sa, cohort, jax.random.key(r))
    assert_trees_close(sp.params, sa.params, 1e-6)
    np.testing.assert_allclose(mp["train/loss"], ma["train/loss"], rtol=1e-6)


def linear_loss_model():
    """loss(w; x) = x * w for a scalar w: gradients are the batch means of x."""
    return Model(init=lambda key: {"w": jnp.float32(4.0)},
                 apply=lambda p, batch, key=None, train=False: batch["x"] * p["w"],
                 loss=lambda batch, preds: preds,
                 metrics=lambda batch, preds: {})


def test_hand_computed_round():
    """FedJAX's fed_prox test case: w = 4, clients x = (6, 4, 2) and (8, 10), B = 2, mu = 0.01.

    Client 0: w = 4 - mean(6, 4) = -1, then w = -1 - (2 + 0.01 (-1 - 4)) = -2.95: Delta 6.95.
    Client 1: w = 4 - mean(8, 10) = -5: Delta 9. Server: 4 - (3 * 6.95 + 2 * 9) / 5 = -3.77.
    """
    model = linear_loss_model()
    clients = [{"x": np.array([6.0, 4.0, 2.0], np.float32)},
               {"x": np.array([8.0, 10.0], np.float32)}]
    cohort = pack_clients(clients, batch_size=2, epochs=1)
    alg = fedprox(optax.sgd(1.0), 1.0, proximal_weight=0.01)
    state, metrics = jit_round(alg, model)(alg.init(model.init(None)), cohort, jax.random.key(0))
    np.testing.assert_allclose(state.params["w"], -3.77, rtol=1e-6)
    np.testing.assert_allclose(metrics["train/delta_norm"], 7.77, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [3, 4])
def test_result_does_not_depend_on_chunk_size(chunk_size):
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = fedprox(optax.sgd(0.2), 1.0, proximal_weight=0.3)
    state0 = alg.init(model.init(jax.random.key(0)))
    cohort = pack_cohort(data, [0, 1, 2, 3, 4], batch_size=2, epochs=2, seed=0, round_num=0)
    one, m1 = jit_round(alg, model, parallel.Plan(1))(state0, cohort, jax.random.key(5))
    many, mc = jit_round(alg, model, parallel.Plan(chunk_size))(state0, cohort, jax.random.key(5))
    assert_trees_close(one.params, many.params, 1e-6)
    np.testing.assert_allclose(m1["train/loss"], mc["train/loss"], rtol=1e-6)


def test_empty_client_changes_nothing():
    model = tiny_softmax_model()
    data = unequal_clients()
    clients = [data.get_client(i) for i in (0, 2)]
    empty = {k: v[:0] for k, v in clients[0].items()}
    alg = fedprox(optax.sgd(0.2), 1.0, proximal_weight=0.3)
    state0 = alg.init(model.init(jax.random.key(0)))
    a, _ = jit_round(alg, model)(state0, pack_clients(clients, 2), jax.random.key(0))
    b, mb = jit_round(alg, model, parallel.Plan(2))(
        state0, pack_clients(clients + [empty], 2), jax.random.key(0))
    assert_trees_close(a.params, b.params, 1e-6)
    assert float(mb["train/num_examples"]) == 5 + 9


def test_registry_entry_builds():
    alg = ENTRY.build(optax.sgd(0.1), 1.0)
    assert ENTRY.name == "fedprox" and ENTRY.needs == ()
    model = tiny_softmax_model()
    cohort = pack_cohort(unequal_clients(), [0, 1], 2, 1, seed=0, round_num=0)
    state, metrics = jit_round(alg, model)(alg.init(model.init(jax.random.key(0))), cohort,
                                           jax.random.key(0))
    assert {"train/loss", "train/num_examples", "train/delta_norm"} <= set(metrics)
    with pytest.raises(ValueError, match="proximal_weight"):
        fedprox(optax.sgd(0.1), proximal_weight=-1.0)
