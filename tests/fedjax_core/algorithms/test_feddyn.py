"""FedDyn against a plain per-client Python loop written from the paper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import client_state, parallel, tree
from fedjax_core.aggregate.mean import mean
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.feddyn import ENTRY, feddyn
from fedjax_core.data import pack_clients, pack_cohort
from fedjax_core.skeleton import RoundState
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients

close = lambda a, b, tol=1e-5: jax.tree.map(  # noqa: E731
    lambda x, y: np.testing.assert_allclose(x, y, atol=tol, rtol=tol), a, b)


def reference_round(model, theta, h, grads, cohort, eta_l, eta_g, num_clients, alpha):
    """Algorithm 1 of the paper, one client and one SGD step at a time.

    Each client approximates its argmin with SGD on
    `L_i(w) - <grad_i, w> + alpha/2 ||w - theta||^2`. `grads` maps client id -> grad_i
    and is updated in place; absent clients have grad_i = 0. `eta_g = 1` is the paper.
    """
    zeros = jax.tree.map(jnp.zeros_like, theta)
    models = []
    for s in range(cohort.num_clients):
        cid = int(cohort.client_index[s])
        if int(cohort.num_examples[s]) == 0:
            continue
        g_i = grads.get(cid, zeros)
        w = theta
        for k in range(cohort.num_steps):
            m = cohort.mask[s, k]
            if not m.any():
                continue
            batch = {name: jnp.asarray(v[s, k][m]) for name, v in cohort.batches.items()}
            g = jax.grad(lambda p: jnp.mean(model.loss(batch, model.apply(p, batch))))(w)
            w = jax.tree.map(lambda ww, gg, gi, t: ww - eta_l * (gg - gi + alpha * (ww - t)),
                             w, g, g_i, theta)
        grads[cid] = jax.tree.map(lambda gi, ww, t: gi - alpha * (ww - t), g_i, w, theta)
        models.append(w)
    h = jax.tree.map(lambda hh, t, *ws: hh - alpha / num_clients * sum(ww - t for ww in ws),
                     h, theta, *models)
    paper = jax.tree.map(lambda hh, *ws: sum(ws) / len(ws) - hh / alpha, h, *models)
    return jax.tree.map(lambda t, p: t + eta_g * (p - t), theta, paper), h


def run(alg, model, cohorts, plan=parallel.Plan(), state=None, step=None):
    """Rounds of `alg` through `jit_round`, which keeps the per-client rows."""
    step = step or jit_round(alg, model, plan)
    state = state if state is not None else alg.init(model.init(jax.random.key(1)))
    metrics = None
    for r, cohort in enumerate(cohorts):
        state, metrics = step(state, cohort, jax.random.key(r))
    return state, metrics


def row(state, cid):
    """Client `cid`'s grad_i, read from its store row."""
    r = int(client_state.rows_of(state, [cid])[0])
    assert r >= 0, f"client {cid} has no row"
    return jax.tree.map(lambda t: t[r], state.store.rows)


def with_padding_client(cohort, client_index):
    """The cohort plus a padding client (0 examples, all-False mask) at the end."""
    pad = lambda a: np.concatenate([a, np.zeros((1,) + a.shape[1:], a.dtype)])  # noqa: E731
    return cohort._replace(
        batches={k: pad(v) for k, v in cohort.batches.items()}, mask=pad(cohort.mask),
        num_examples=np.append(cohort.num_examples, 0).astype(np.int32),
        client_index=np.append(cohort.client_index, client_index).astype(np.int32))


# Client 0 and 2 skip round 1 and come back in round 2 with their round-0 state.
COHORTS = ([0, 1, 2], [3, 1, 4], [0, 4, 2])


@pytest.mark.parametrize("alpha, eta_g", [(0.1, 1.0), (0.01, 0.6)])
def test_feddyn_matches_paper_loop(alpha, eta_g):
    model = tiny_softmax_model()
    data = unequal_clients()
    eta_l, population = 0.3, 7
    alg = feddyn(optax.sgd(eta_l), eta_g, num_clients=population, alpha=alpha)
    theta = model.init(jax.random.key(1))
    h = jax.tree.map(jnp.zeros_like, theta)
    grads = {}
    state = alg.init(theta)
    step = jit_round(alg, model)
    for r, ids in enumerate(COHORTS):
        cohort = pack_cohort(data, ids, batch_size=2, epochs=2, seed=3, round_num=r)
        state, metrics = step(state, cohort, jax.random.key(r))
        theta, h = reference_round(model, theta, h, grads, cohort, eta_l, eta_g, population, alpha)
        close(state.params, theta)
        close(state.server, h)
        for cid, g_i in grads.items():
            close(row(state, cid), g_i)
    assert isinstance(state, RoundState)
    positions = np.arange(state.index.row_of.shape[0])
    assert set(positions[client_state.rows_of(state, positions) >= 0]) == {0, 1, 2, 3, 4}
    np.testing.assert_allclose(metrics["train/h_norm"], tree.l2_norm(h), rtol=1e-5)
    assert float(metrics["train/num_examples"]) == 5 + 4 + 9


def softmax_grad(params, x, y):
    """Hand-written gradient of the mean cross-entropy of `x @ w + b`."""
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    logits = x @ w + b
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    err = (p - np.eye(w.shape[1])[y]) / len(y)
    return {"w": x.T @ err, "b": err.sum(0)}


def test_one_full_batch_step_by_hand():
    """First round, one client, one SGD step d = eta_l grad L(theta):
    grad_i = alpha d, h = (alpha/m) d, theta^1 = theta - (1 + 1/m) d."""
    model = tiny_softmax_model()
    data = unequal_clients()
    eta_l, alpha, population = 0.5, 0.2, 4
    alg = feddyn(optax.sgd(eta_l), 1.0, num_clients=population, alpha=alpha)
    cohort = pack_cohort(data, [2], batch_size=9, epochs=1, seed=0, round_num=0, shuffle=False)
    theta = model.init(jax.random.key(1))
    arrays = data.get_client(2)
    d = jax.tree.map(lambda g: eta_l * g, softmax_grad(theta, arrays["x"], arrays["y"]))
    state, _ = run(alg, model, [cohort], state=alg.init(theta))
    close(row(state, 2), jax.tree.map(lambda v: alpha * v, d))
    close(state.server, jax.tree.map(lambda v: alpha / population * v, d))
    close(state.params, jax.tree.map(lambda t, v: t - (1 + 1 / population) * v, theta, d))


def test_result_does_not_depend_on_chunk_size():
    """Clients one by one vs chunks of 3 (the last chunk padded with zero clients)."""
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = feddyn(optax.sgd(0.2), 1.0, num_clients=5, alpha=0.1)
    cohorts = [pack_cohort(data, ids, 2, 1, seed=0, round_num=r)
               for r, ids in enumerate([[0, 1, 2, 3], [4, 2, 1, 0]])]
    one, m1 = run(alg, model, cohorts, parallel.Plan(1))
    many, mc = run(alg, model, cohorts, parallel.Plan(3))
    close(one, many, 1e-6)
    np.testing.assert_allclose(m1["train/loss"], mc["train/loss"], rtol=1e-6)


def test_padding_client_changes_nothing():
    """Padding clients, one seen before and one new, move neither the model, h, nor their rows."""
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = feddyn(optax.sgd(0.3), 1.0, num_clients=5, alpha=0.1)
    steps = [jit_round(alg, model, parallel.Plan(1)), jit_round(alg, model, parallel.Plan(2))]
    first = pack_cohort(data, [0, 1, 2], 2, 1, seed=0, round_num=0)
    state, _ = run(alg, model, [first], step=steps[0])
    row0 = row(state, 0)
    assert tree.l2_norm(row0) > 0
    second = pack_cohort(data, [3, 4], 2, 1, seed=0, round_num=1)
    plain, _ = run(alg, model, [second], state=state, step=steps[0])
    with_padding = with_padding_client(with_padding_client(second, 0), 9)
    for step in steps:
        padded, m = run(alg, model, [with_padding], state=state, step=step)
        close(padded.params, plain.params, 1e-6)
        close(padded.server, plain.server, 1e-6)
        for cid in (0, 1, 2, 3, 4):
            close(row(padded, cid), row(plain, cid), 1e-6)
        close(row(padded, 0), row0, 0)
        # A new client that trained on nothing keeps a zero row.
        assert float(tree.l2_norm(row(padded, 9))) == 0.0
        assert float(m["train/num_examples"]) == 1 + 4


def test_round_without_real_clients_changes_nothing():
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = feddyn(optax.sgd(0.3), 1.0, num_clients=5, alpha=0.1)
    first = pack_cohort(data, [0, 1], 2, 1, seed=0, round_num=0)
    state, _ = run(alg, model, [first])
    assert tree.l2_norm(state.server) > 0
    empty = first._replace(mask=np.zeros_like(first.mask),
                           num_examples=np.zeros_like(first.num_examples))
    after, _ = run(alg, model, [empty], state=state)
    close(after, state, 0)


def test_store_grows_with_clients_seen_not_population():
    model = tiny_softmax_model()
    data = unequal_clients(sizes=(3,) * 10)
    alg = feddyn(optax.sgd(0.1), 1.0, num_clients=1_000_000)
    state = alg.init(model.init(jax.random.key(0)))
    assert client_state.capacity(state.store) == client_state.MIN_CAPACITY
    state, _ = run(alg, model, [pack_cohort(data, [7, 3, 5], 3, 1, 0, 0)], state=state)
    assert client_state.capacity(state.store) == client_state.MIN_CAPACITY
    assert state.store.rows["w"].shape == (client_state.MIN_CAPACITY, 3, 4)
    state, _ = run(alg, model, [pack_cohort(data, [0, 1, 2, 4, 6, 8, 9], 3, 1, 0, 1)],
                   state=state)
    assert int(state.index.size) == 10
    assert client_state.capacity(state.store) == 2 * client_state.MIN_CAPACITY


def test_explicit_mean_aggregator_is_the_default():
    model = tiny_softmax_model()
    data = unequal_clients()
    cohorts = [pack_cohort(data, [0, 1, 2], 2, 1, seed=0, round_num=0)]
    a, _ = run(feddyn(optax.sgd(0.2), 1.0, num_clients=5), model, cohorts)
    b, _ = run(feddyn(optax.sgd(0.2), 1.0, num_clients=5, aggregator=mean()), model, cohorts)
    close(a, b, 0)


def test_errors_are_clear():
    model = tiny_softmax_model()
    data = unequal_clients()
    with pytest.raises(ValueError, match="alpha"):
        feddyn(optax.sgd(0.1), 1.0, num_clients=5, alpha=0.0)
    with pytest.raises(ValueError, match="num_clients"):
        feddyn(optax.sgd(0.1), 1.0, num_clients=0)
    # The per-client rows need no preparation: `apply` alone (no jit_round) on a cohort
    # that fits the initial store is the jitted round.
    alg = feddyn(optax.sgd(0.1), 1.0, num_clients=5)
    cohort = pack_clients([data.get_client(0)], batch_size=2)
    state0 = alg.init(model.init(jax.random.key(0)))
    direct, _ = alg.apply(state0, cohort, jax.random.key(0), model=model)
    jitted, _ = jit_round(alg, model)(state0, cohort, jax.random.key(0))
    close(direct, jitted, 1e-6)
    assert float(tree.l2_norm(row(direct, 0))) > 0


def test_registry_entry_builds_with_the_facts_it_needs():
    assert ENTRY.name == "feddyn"
    assert ENTRY.needs == ("num_clients",)
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = ENTRY.build(optax.sgd(0.1), 1.0, aggregator=None, num_clients=5)
    _, metrics = run(alg, model, [pack_cohort(data, [0, 1], 2, 1, 0, 0)])
    assert set(metrics) >= {"train/loss", "train/num_examples", "train/delta_norm",
                            "train/h_norm"}
