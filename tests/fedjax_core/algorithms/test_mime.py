"""Mime / MimeLite against a plain per-client Python loop written from the paper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import parallel
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.mime import ENTRIES, mime, mimelite
from fedjax_core.data import pack_clients, pack_cohort
from fedjax_core.models.base import Model
from fedjax_core.skeleton import RoundState
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients

TOL = dict(atol=1e-5, rtol=1e-5)


def assert_trees_close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **TOL), a, b)


def reference_round(model, x, s, cohort, data, indices, base_opt, server_lr, corrected):
    """One Mime (corrected) or MimeLite round, client by client and step by step."""
    @jax.jit
    @jax.grad
    def batch_grad(p, batch):
        return jnp.mean(model.loss(batch, model.apply(p, batch)))

    # Full-batch gradient at x over the cohort: every example of every client once.
    grad_sum, total = jax.tree.map(jnp.zeros_like, x), 0
    for i in indices:
        arrays = {k: jnp.asarray(v) for k, v in data.get_client(int(i)).items()}
        g = jax.grad(lambda p: jnp.sum(model.loss(arrays, model.apply(p, arrays))))(x)
        grad_sum = jax.tree.map(jnp.add, grad_sum, g)
        total += len(arrays["y"])
    c = jax.tree.map(lambda g: g / total, grad_sum)

    deltas, weights = [], []
    for k in range(cohort.num_clients):
        y = x
        for step in range(cohort.num_steps):
            m = cohort.mask[k, step]
            if not m.any():
                continue
            batch = {f: jnp.asarray(v[k, step][m]) for f, v in cohort.batches.items()}
            g = batch_grad(y, batch)
            if corrected:
                g_x = batch_grad(x, batch)
                g = jax.tree.map(lambda a, b, cc: a - b + cc, g, g_x, c)
            updates, _ = base_opt.update(g, s, y)  # the server's state, not advanced
            y = optax.apply_updates(y, updates)
        deltas.append(jax.tree.map(jnp.subtract, x, y))
        weights.append(float(cohort.num_examples[k]))
    mean_delta = jax.tree.map(
        lambda *ds: sum(w * d for w, d in zip(weights, ds)) / sum(weights), *deltas)
    new_x = jax.tree.map(lambda p, d: p - server_lr * d, x, mean_delta)
    _, new_s = base_opt.update(c, s, x)
    return new_x, new_s


@pytest.mark.parametrize("corrected, base_opt", [
    (True, optax.sgd(0.3, momentum=0.9)),
    (True, optax.adam(0.05)),
    (False, optax.adam(0.05)),
], ids=["mime-sgdm", "mime-adam", "mimelite-adam"])
def test_matches_plain_loop(corrected, base_opt):
    model = tiny_softmax_model()
    data = unequal_clients()
    build = mime if corrected else mimelite
    alg = build(base_opt, 0.7)
    x = model.init(jax.random.key(1))
    state = alg.init(x)
    ref_x, ref_s = x, base_opt.init(x)
    step = jit_round(alg, model)
    indices = [4, 0, 2, 1]
    for r in range(3):
        cohort = pack_cohort(data, indices, batch_size=2, epochs=2, seed=3, round_num=r)
        state, metrics = step(state, cohort, jax.random.key(r))
        ref_x, ref_s = reference_round(model, ref_x, ref_s, cohort, data, indices, base_opt,
                                       0.7, corrected)
        assert_trees_close(state.params, ref_x)
        assert_trees_close(state.server, ref_s)
    assert float(metrics["train/num_examples"]) == 4 + 5 + 9 + 2
    assert float(metrics["train/full_grad_norm"]) > 0


def test_mimelite_with_plain_sgd_is_fedavg():
    model = tiny_softmax_model()
    data = unequal_clients()
    lite = mimelite(optax.sgd(0.3), 0.5)
    avg = fedavg(optax.sgd(0.3), optax.sgd(0.5))
    x = model.init(jax.random.key(0))
    s_lite, s_avg = lite.init(x), avg.init(x)
    step_lite, step_avg = jit_round(lite, model), jit_round(avg, model)
    for r in range(3):
        cohort = pack_cohort(data, [0, 1, 2, 3], batch_size=3, epochs=2, seed=1, round_num=r)
        s_lite, m_lite = step_lite(s_lite, cohort, jax.random.key(r))
        s_avg, m_avg = step_avg(s_avg, cohort, jax.random.key(r))
        assert_trees_close(s_lite.params, s_avg.params)
        np.testing.assert_allclose(m_lite["train/loss"], m_avg["train/loss"], **TOL)


def linear_model() -> Model:
    """Per-example loss `x * w` for a scalar w: its gradient is `x`, whatever w."""
    def apply(params, batch, key=None, train=False):
        del key, train
        return batch["x"] * params["w"]

    def loss(batch, preds):
        del batch
        return preds

    def metrics(batch, preds):
        return {"loss": (preds, jnp.ones_like(preds))}

    return Model(lambda key: {"w": jnp.float32(4.0)}, apply, loss, metrics)


@pytest.mark.parametrize("corrected", [True, False])
def test_hand_computed_two_rounds_with_momentum(corrected):
    # Clients [1, 2, 3] and [4, 6], batch 2, one epoch, no shuffle: batches [1, 2], [3] and
    # [4, 6]. The full-batch gradient is c = 16 / 5 = 3.2 in every round.
    # Mime: grad f_b(y) - grad f_b(x) = 0, so every step uses g = c.
    # MimeLite: every step uses the batch mean: 1.5, 3 and 5.
    # sgd(lr=1, momentum=0.9) with frozen trace m: step = g + 0.9 m. Server lr 1.
    model = linear_model()
    clients = [{"x": np.array([1.0, 2.0, 3.0], np.float32)},
               {"x": np.array([4.0, 6.0], np.float32)}]
    cohort = pack_clients(clients, batch_size=2, epochs=1, bucket=False)
    alg = (mime if corrected else mimelite)(optax.sgd(1.0, momentum=0.9), 1.0)
    state = alg.init(model.init(None))
    c = 3.2
    m, w = 0.0, 4.0
    step = jit_round(alg, model)
    for r in range(2):
        state, metrics = step(state, cohort, jax.random.key(r))
        if corrected:
            delta = [2 * (c + 0.9 * m), 1 * (c + 0.9 * m)]
        else:
            delta = [(1.5 + 0.9 * m) + (3.0 + 0.9 * m), 5.0 + 0.9 * m]
        w -= (3 * delta[0] + 2 * delta[1]) / 5
        m = c + 0.9 * m
        np.testing.assert_allclose(state.params["w"], w, **TOL)
        np.testing.assert_allclose(state.server[0].trace["w"], m, **TOL)
        np.testing.assert_allclose(metrics["train/full_grad_norm"], c, **TOL)


@pytest.mark.parametrize("build", [mime, mimelite])
def test_chunk_size_and_padding_client_change_nothing(build):
    model = tiny_softmax_model()
    data = unequal_clients()
    clients = [data.get_client(i) for i in (0, 2, 3, 4)]
    empty = {k: v[:0] for k, v in clients[0].items()}
    alg = build(optax.adam(0.05), 0.8)
    state0 = alg.init(model.init(jax.random.key(0)))
    plain = pack_clients(clients, batch_size=2, epochs=2, bucket=False)
    padded = pack_clients(clients[:1] + [empty] + clients[1:], batch_size=2, epochs=2, bucket=True)
    a, ma = jit_round(alg, model, parallel.Plan(1))(state0, plain, jax.random.key(0))
    b, mb = jit_round(alg, model, parallel.Plan(3))(state0, padded, jax.random.key(0))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)
    for name in ("train/loss", "train/num_examples", "train/full_grad_norm"):
        np.testing.assert_allclose(ma[name], mb[name], rtol=1e-6)


def test_full_gradient_uses_each_example_once_with_many_epochs():
    # With 3 epochs the stream repeats every example; c must still be the plain mean.
    model = linear_model()
    clients = [{"x": np.array([1.0, 2.0, 3.0], np.float32)},
               {"x": np.array([10.0], np.float32)}]
    rngs = [np.random.default_rng(0), np.random.default_rng(1)]
    cohort = pack_clients(clients, batch_size=2, epochs=3, rngs=rngs)
    alg = mimelite(optax.sgd(1.0, momentum=0.5), 1.0)
    _, metrics = jit_round(alg, model)(alg.init(model.init(None)), cohort, jax.random.key(0))
    np.testing.assert_allclose(metrics["train/full_grad_norm"], 16.0 / 4, **TOL)


def test_client_delta_clip_norm():
    model = tiny_softmax_model()
    data = unequal_clients()
    cohort = pack_cohort(data, [0, 1, 2], batch_size=2, epochs=2, seed=0, round_num=0)
    x = model.init(jax.random.key(0))
    tight = mimelite(optax.sgd(0.5), 1.0, client_delta_clip_norm=1e-3)
    _, mt = tight.apply(tight.init(x), cohort, jax.random.key(0), model=model)
    assert 1e-4 < float(mt["train/delta_norm"]) <= 1e-3 + 1e-7


def test_registry_entries():
    assert [e.name for e in ENTRIES] == ["mime", "mimelite"]
    model = tiny_softmax_model()
    cohort = pack_cohort(unequal_clients(), [0, 1], batch_size=2, epochs=1, seed=0, round_num=0)
    for entry in ENTRIES:
        assert entry.needs == ()
        alg = entry.build(optax.sgd(0.1), 1.0, aggregator=None)
        state = alg.init(model.init(jax.random.key(0)))
        assert isinstance(state, RoundState)
        state, metrics = jit_round(alg, model)(state, cohort, jax.random.key(0))
        assert {"train/loss", "train/num_examples", "train/delta_norm"} <= set(metrics)
