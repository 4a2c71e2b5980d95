"""FedSGD against full-batch gradients computed from the clients' raw data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import parallel
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.fedsgd import ENTRY, fedsgd
from fedjax_core.client import first_epoch_mask
from fedjax_core.data import pack_clients, pack_cohort
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients


def assert_trees_close(a, b, tol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=tol, rtol=tol), a, b)


def reference_round(model, params, data, indices, server_opt, server_state):
    """McMahan et al.'s FederatedSGD: each client's gradient of its mean loss over ALL its
    examples (read from the dataset, not the packed cohort), the n-weighted mean, one step."""
    grads, weights = [], []
    for i in indices:
        client = {k: jnp.asarray(v) for k, v in data.get_client(i).items()}
        g = jax.grad(lambda p: jnp.mean(model.loss(client, model.apply(p, client))))(params)
        grads.append(g)
        weights.append(float(len(client["y"])))
    total = sum(weights)
    mean_grad = jax.tree.map(lambda *gs: sum(w * g for w, g in zip(weights, gs)) / total, *grads)
    updates, server_state = server_opt.update(mean_grad, server_state, params)
    return optax.apply_updates(params, updates), server_state


@pytest.mark.parametrize("batch_size, epochs, max_steps, server_momentum",
                         [(2, 3, None, 0.0), (4, 2, 4, 0.9)])
def test_fedsgd_matches_full_batch_gradients(batch_size, epochs, max_steps, server_momentum):
    """Epochs > 1, batches straddling epoch boundaries, and max_steps cutting the second
    epoch of the 9-example client after 7 examples: every example still counts once."""
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = fedsgd(None, 0.5, server_momentum=server_momentum)
    server_opt = optax.sgd(0.5, momentum=server_momentum or None)
    params = model.init(jax.random.key(1))
    state, ref, ref_server = alg.init(params), params, server_opt.init(params)
    step = jit_round(alg, model)
    for r in range(3):
        indices = [[4, 0, 2, 1], [3, 2, 0, 1], [1, 4, 3, 2]][r]
        cohort = pack_cohort(data, indices, batch_size=batch_size, epochs=epochs, seed=3,
                             round_num=r, max_steps=max_steps)
        state, metrics = step(state, cohort, jax.random.key(r))
        ref, ref_server = reference_round(model, ref, data, indices, server_opt, ref_server)
        assert_trees_close(state.params, ref)
    n = sum(data.client_sizes[i] for i in indices)
    assert float(metrics["train/num_examples"]) == n


def test_loss_metric_is_the_loss_at_w_t():
    model = tiny_softmax_model()
    data = unequal_clients()
    params = model.init(jax.random.key(4))
    alg = fedsgd(None, 0.1)
    indices = [0, 2, 3]
    cohort = pack_cohort(data, indices, batch_size=2, epochs=3, seed=0, round_num=0)
    _, metrics = jit_round(alg, model)(alg.init(params), cohort, jax.random.key(0))
    total, count = 0.0, 0
    for i in indices:
        c = {k: jnp.asarray(v) for k, v in data.get_client(i).items()}
        total += float(jnp.sum(model.loss(c, model.apply(params, c))))
        count += len(c["y"])
    np.testing.assert_allclose(metrics["train/loss"], total / count, rtol=1e-5)


def test_one_client_is_a_hand_computed_gradient_step():
    """Softmax regression, one client: grad_W = X^T (softmax(XW + b) - onehot(y)) / n."""
    model = tiny_softmax_model()
    x = np.array([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 1.0, 1.0]], np.float32)
    y = np.array([0, 3, 1], np.int32)
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10.0
    b = np.array([0.1, -0.2, 0.0, 0.3], np.float32)
    logits = x @ w + b
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    err = probs - np.eye(4, dtype=np.float32)[y]
    lr = 0.7
    want = {"w": w - lr * x.T @ err / 3, "b": b - lr * err.mean(0)}
    alg = fedsgd(None, lr)
    cohort = pack_clients([{"x": x, "y": y}], batch_size=2, epochs=2)
    state, _ = jit_round(alg, model)(alg.init({"w": jnp.asarray(w), "b": jnp.asarray(b)}),
                                      cohort, jax.random.key(0))
    assert_trees_close(state.params, want, 1e-6)


def test_first_epoch_mask():
    mask = np.array([[True, True], [True, True], [True, False]])  # 5 slots: n = 2, 3 epochs
    np.testing.assert_array_equal(first_epoch_mask(mask, 2), [[True, True], [False, False],
                                                              [False, False]])
    np.testing.assert_array_equal(first_epoch_mask(mask, 3), [[True, True], [True, False],
                                                              [False, False]])
    assert not first_epoch_mask(mask, 0).any()


def test_batching_and_epochs_do_not_matter():
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = fedsgd(None, 0.3)
    state0 = alg.init(model.init(jax.random.key(0)))
    outs = []
    for batch_size, epochs in [(1, 1), (3, 2), (16, 4)]:
        cohort = pack_cohort(data, [0, 1, 2], batch_size=batch_size, epochs=epochs, seed=0,
                             round_num=0)
        outs.append(jit_round(alg, model)(state0, cohort, jax.random.key(0))[0].params)
    for other in outs[1:]:
        assert_trees_close(outs[0], other, 1e-6)


def test_fedsgd_is_fedavg_with_one_full_batch_sgd_step():
    model = tiny_softmax_model()
    data = unequal_clients()
    params = model.init(jax.random.key(3))
    cohort = pack_cohort(data, [0, 1, 2, 4], batch_size=9, epochs=1, seed=0, round_num=0)
    sgd_alg = fedsgd(None, 0.4)
    avg = fedavg(optax.sgd(1.0), optax.sgd(0.4))
    a, _ = jit_round(sgd_alg, model)(sgd_alg.init(params), cohort, jax.random.key(0))
    b, _ = jit_round(avg, model)(avg.init(params), cohort, jax.random.key(0))
    assert_trees_close(a.params, b.params, 1e-6)


@pytest.mark.parametrize("chunk_size", [3])
def test_chunk_size_and_empty_client_change_nothing(chunk_size):
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = fedsgd(None, 0.3, server_momentum=0.5)
    state0 = alg.init(model.init(jax.random.key(0)))
    clients = [data.get_client(i) for i in range(5)]
    empty = {k: v[:0] for k, v in clients[0].items()}
    cohort = pack_clients(clients, batch_size=2, epochs=2)
    padded = pack_clients(clients[:2] + [empty] + clients[2:], batch_size=2, epochs=2)
    one, m1 = jit_round(alg, model, parallel.Plan(1))(state0, cohort, jax.random.key(5))
    many, mc = jit_round(alg, model, parallel.Plan(chunk_size))(state0, padded,
                                                               jax.random.key(5))
    assert_trees_close(one.params, many.params, 1e-6)
    np.testing.assert_allclose(m1["train/loss"], mc["train/loss"], rtol=1e-6)
    assert float(mc["train/num_examples"]) == sum(data.client_sizes)


def test_registry_entry_ignores_client_optimizer():
    assert ENTRY.name == "fedsgd" and ENTRY.needs == ()
    model = tiny_softmax_model()
    params = model.init(jax.random.key(0))
    cohort = pack_cohort(unequal_clients(), [0, 1], 2, 1, seed=0, round_num=0)
    a = ENTRY.build(optax.sgd(0.1), 1.0)
    b = ENTRY.build(optax.adam(0.5), 1.0)
    sa, metrics = jit_round(a, model)(a.init(params), cohort, jax.random.key(0))
    sb, _ = jit_round(b, model)(b.init(params), cohort, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, sa.params, sb.params)
    assert {"train/loss", "train/num_examples", "train/delta_norm"} <= set(metrics)
