"""FedNova against a plain per-client Python loop written from the paper."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import parallel
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.fednova import ENTRY, a_norm, fednova
from fedjax_core.data import pack_clients, pack_cohort
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients


def assert_trees_close(a, b, tol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=tol, rtol=tol), a, b)


@functools.lru_cache(maxsize=None)
def loss_grad(model):
    """grad_w of the batch's mean loss (jitted only for speed)."""
    return jax.jit(jax.grad(lambda p, batch: jnp.mean(model.loss(batch, model.apply(p, batch)))))


def a_vector(tau, rho, alpha):
    """The paper's a_i: entry k is how much the gradient of step k counts in Delta_i / eta.

    The paper's closed forms where it gives one; with both rho and alpha, the
    response of the local solver to a unit gradient at step k, simulated step by step."""
    k = np.arange(tau)
    if alpha == 0:
        return (1 - rho ** (tau - k)) / (1 - rho)
    if rho == 0:
        return (1 - alpha) ** (tau - 1 - k)
    out = []
    for j in range(tau):
        b = e = 0.0
        for s in range(tau):
            b = rho * b + (1.0 if s == j else 0.0) + alpha * e
            e = e - b
        out.append(-e)
    return np.array(out)


def reference_round(model, params, cohort, eta, rho, mu, server_lr):
    """One FedNova round: local SGD (momentum rho, proximal mu), then normalized averaging."""
    ds, norms, weights = [], [], []
    for c in range(cohort.num_clients):
        w, buf, grads_of_f = params, None, []
        for s in range(cohort.num_steps):
            m = cohort.mask[c, s]
            if not m.any():
                continue
            batch = {k: jnp.asarray(v[c, s][m]) for k, v in cohort.batches.items()}
            g = loss_grad(model)(w, batch)
            grads_of_f.append(g)
            g_total = jax.tree.map(lambda gi, wi, w0: gi + mu * (wi - w0), g, w, params)
            buf = g_total if buf is None else jax.tree.map(lambda b, x: rho * b + x, buf, g_total)
            w = jax.tree.map(lambda wi, b: wi - eta * b, w, buf)
        tau = len(grads_of_f)
        delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, w)
        a = a_vector(tau, rho, eta * mu)
        # The paper's representation Delta_i = eta G_i a_i holds for this solver.
        rebuilt = jax.tree.map(lambda *gs: eta * sum(ak * gk for ak, gk in zip(a, gs)),
                               *grads_of_f)
        assert_trees_close(delta, rebuilt, 1e-5)
        norm = np.sum(np.abs(a))
        ds.append(jax.tree.map(lambda x: x / norm, delta))
        norms.append(norm)
        weights.append(float(cohort.num_examples[c]))
    p = np.array(weights) / sum(weights)
    tau_eff = float(np.sum(p * np.array(norms)))
    d = jax.tree.map(lambda *xs: sum(pi * x for pi, x in zip(p, xs)), *ds)
    return jax.tree.map(lambda w0, x: w0 - server_lr * tau_eff * x, params, d), tau_eff


@pytest.mark.parametrize("rho, mu", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.5), (0.5, 0.3)])
def test_fednova_matches_plain_loop(rho, mu):
    model = tiny_softmax_model()
    data = unequal_clients()
    eta, server_lr = 0.2, 0.8
    alg = fednova(eta, server_lr, momentum=rho, proximal_weight=mu)
    params = model.init(jax.random.key(1))
    state, ref = alg.init(params), params
    step = jit_round(alg, model)
    for r in range(2):
        cohort = pack_cohort(data, [4, 0, 2, 1], batch_size=2, epochs=2, seed=3, round_num=r)
        state, metrics = step(state, cohort, jax.random.key(r))
        ref, tau_eff = reference_round(model, ref, cohort, eta, rho, mu, server_lr)
        assert_trees_close(state.params, ref)
        np.testing.assert_allclose(metrics["train/tau_eff"], tau_eff, rtol=1e-5)


def test_a_norm_hand_values():
    np.testing.assert_allclose(a_norm(3), 3.0)
    np.testing.assert_allclose(a_norm(3, momentum=0.5), 1 + 1.5 + 1.75)
    np.testing.assert_allclose(a_norm(3, eta_mu=0.5), 1 + 0.5 + 0.25)
    # rho = alpha = 0.5: responses r(1), r(2), r(3) = 1, 1, 0.5.
    np.testing.assert_allclose(a_norm(2, momentum=0.5, eta_mu=0.5), 2.0)
    np.testing.assert_allclose(a_norm(3, momentum=0.5, eta_mu=0.5), 2.5)
    np.testing.assert_allclose(a_norm(jnp.array([0, 1, 4])), [0.0, 1.0, 4.0])
    for rho, alpha in [(0.9, 0.0), (0.0, 0.2), (0.9, 0.05)]:
        for tau in (1, 5, 40):
            np.testing.assert_allclose(a_norm(tau, rho, alpha),
                                       np.sum(np.abs(a_vector(tau, rho, alpha))), rtol=1e-5)


def test_equal_steps_plain_sgd_is_fedavg():
    """tau_i = tau for all i and plain SGD: d_i = Delta_i / tau, tau_eff = tau."""
    model = tiny_softmax_model()
    data = unequal_clients(sizes=(4, 4, 4, 4))
    params = model.init(jax.random.key(2))
    nova = fednova(0.3, 0.7)
    avg = fedavg(optax.sgd(0.3), optax.sgd(0.7))
    sn, sa = nova.init(params), avg.init(params)
    for r in range(2):
        cohort = pack_cohort(data, [0, 1, 3], batch_size=3, epochs=2, seed=1, round_num=r)
        sn, mn = jit_round(nova, model)(sn, cohort, jax.random.key(r))
        sa, _ = jit_round(avg, model)(sa, cohort, jax.random.key(r))
    assert_trees_close(sn.params, sa.params, 1e-6)
    np.testing.assert_allclose(mn["train/tau_eff"], 3.0)  # ceil(4 * 2 / 3)


def test_unequal_steps_differ_from_fedavg():
    """Plain SGD, tau_i = ceil(n_i / B): tau_eff = sum p_i tau_i, and FedNova is not FedAvg."""
    model = tiny_softmax_model()
    data = unequal_clients()
    params = model.init(jax.random.key(2))
    cohort = pack_cohort(data, [0, 1, 2], batch_size=2, epochs=1, seed=1, round_num=0)
    nova = fednova(0.3, 1.0)
    avg = fedavg(optax.sgd(0.3), optax.sgd(1.0))
    sn, mn = jit_round(nova, model)(nova.init(params), cohort, jax.random.key(0))
    sa, _ = jit_round(avg, model)(avg.init(params), cohort, jax.random.key(0))
    n, tau = np.array([5, 2, 9]), np.array([3, 1, 5])
    np.testing.assert_allclose(mn["train/tau_eff"], np.sum(n * tau) / n.sum(), rtol=1e-6)
    assert not np.allclose(sn.params["w"], sa.params["w"], atol=1e-4)


@pytest.mark.parametrize("chunk_size", [3])
def test_chunk_size_and_empty_client_change_nothing(chunk_size):
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = fednova(0.2, 1.0, momentum=0.5, proximal_weight=0.3)
    state0 = alg.init(model.init(jax.random.key(0)))
    clients = [data.get_client(i) for i in range(5)]
    empty = {k: v[:0] for k, v in clients[0].items()}
    cohort = pack_clients(clients, batch_size=2, epochs=2)
    padded = pack_clients(clients[:2] + [empty] + clients[2:], batch_size=2, epochs=2)
    one, m1 = jit_round(alg, model, parallel.Plan(1))(state0, cohort, jax.random.key(5))
    many, mc = jit_round(alg, model, parallel.Plan(chunk_size))(state0, padded,
                                                               jax.random.key(5))
    assert_trees_close(one.params, many.params, 1e-6)
    for name in ("train/loss", "train/tau_eff", "train/mean_local_steps"):
        np.testing.assert_allclose(m1[name], mc[name], rtol=1e-6)


def test_registry_entry_checks_the_client_optimizer():
    assert ENTRY.name == "fednova" and ENTRY.needs == ("client_learning_rate",)
    model = tiny_softmax_model()
    params = model.init(jax.random.key(0))
    cohort = pack_cohort(unequal_clients(), [0, 1], 2, 1, seed=0, round_num=0)
    alg = ENTRY.build(optax.sgd(0.1), 1.0, client_learning_rate=0.1)
    _, metrics = jit_round(alg, model)(alg.init(params), cohort, jax.random.key(0))
    assert {"train/loss", "train/num_examples", "train/delta_norm", "train/tau_eff"} <= set(metrics)
    ENTRY.build(optax.sgd(0.1, momentum=0.9), 1.0, client_learning_rate=0.1, momentum=0.9)
    for opt, opts in [(optax.adam(0.1), {}), (optax.sgd(0.1, momentum=0.9), {}),
                      (optax.sgd(0.2), {}), (optax.sgd(0.1), {"momentum": 0.9})]:
        with pytest.raises(ValueError, match="fednova"):
            ENTRY.build(opt, 1.0, client_learning_rate=0.1, **opts)
