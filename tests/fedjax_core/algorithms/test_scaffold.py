"""SCAFFOLD (option II) against a plain per-client Python loop written from the paper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import client_state, parallel, tree
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.scaffold import ENTRY, scaffold
from fedjax_core.data import pack_clients, pack_cohort
from fedjax_core.skeleton import RoundState
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients

close = lambda a, b, tol=1e-5: jax.tree.map(  # noqa: E731
    lambda x, y: np.testing.assert_allclose(x, y, atol=tol, rtol=tol), a, b)


def reference_round(model, x, c, controls, cohort, eta_l, eta_g, num_clients, weighting):
    """Algorithm 1 of the paper (option II), one client and one step at a time.

    `controls` maps client id -> c_i and is updated in place; absent clients have c_i = 0.
    """
    zeros = jax.tree.map(jnp.zeros_like, x)
    deltas, weights, control_deltas = [], [], []
    for s in range(cohort.num_clients):
        n, cid = int(cohort.num_examples[s]), int(cohort.client_index[s])
        if n == 0:
            continue
        c_i = controls.get(cid, zeros)
        y, steps = x, 0
        for k in range(cohort.num_steps):
            m = cohort.mask[s, k]
            if not m.any():
                continue
            batch = {name: jnp.asarray(v[s, k][m]) for name, v in cohort.batches.items()}
            g = jax.grad(lambda p: jnp.mean(model.loss(batch, model.apply(p, batch))))(y)
            y = jax.tree.map(lambda yy, gg, ci, cc: yy - eta_l * (gg - ci + cc), y, g, c_i, c)
            steps += 1
        c_plus = jax.tree.map(lambda ci, cc, xx, yy: ci - cc + (xx - yy) / (steps * eta_l),
                              c_i, c, x, y)
        deltas.append(jax.tree.map(lambda a, b: b - a, x, y))           # Delta y_i = y_i - x
        control_deltas.append(jax.tree.map(lambda a, b: a - b, c_plus, c_i))
        weights.append(float(n) if weighting == "examples" else 1.0)
        controls[cid] = c_plus
    total = sum(weights)
    dx = jax.tree.map(lambda *ds: sum(w * d for w, d in zip(weights, ds)) / total, *deltas)
    dc = jax.tree.map(lambda *ds: sum(ds) / len(ds), *control_deltas)
    size = len(deltas)
    x = jax.tree.map(lambda a, b: a + eta_g * b, x, dx)
    c = jax.tree.map(lambda a, b: a + size / num_clients * b, c, dc)
    return x, c


class IndexView:
    """The per-client index inside a state, read on the host."""

    def __init__(self, state):
        self.state = state

    @property
    def row_of(self) -> dict:
        rows = np.asarray(self.state.index.row_of)
        return {int(p): int(r) for p, r in enumerate(rows) if r >= 0}

    @property
    def size(self) -> int:
        return int(self.state.index.size)

    def copy(self):
        return self


def run(alg, model, cohorts, plan=parallel.Plan(), state=None, index=None, step=None):
    """Rounds of `alg`; the state carries its per-client index (`index` is unused)."""
    del index
    step = step or jit_round(alg, model, plan)
    state = state if state is not None else alg.init(model.init(jax.random.key(1)))
    metrics = None
    for r, cohort in enumerate(cohorts):
        state, metrics = step(state, cohort, jax.random.key(r))
    return state, IndexView(state), metrics


def row(state, index, cid):
    del index
    return jax.tree.map(lambda t: t[client_state.rows_of(state, [cid])[0]], state.store.rows)


def with_padding_client(cohort, client_index):
    """The cohort plus a padding client (0 examples, all-False mask) at the end."""
    pad = lambda a: np.concatenate([a, np.zeros((1,) + a.shape[1:], a.dtype)])  # noqa: E731
    return cohort._replace(
        batches={k: pad(v) for k, v in cohort.batches.items()}, mask=pad(cohort.mask),
        num_examples=np.append(cohort.num_examples, 0).astype(np.int32),
        client_index=np.append(cohort.client_index, client_index).astype(np.int32))


# Client 0 and 2 skip round 1 and come back in round 2 with their round-0 state.
COHORTS = ([0, 1, 2], [3, 1, 4], [0, 4, 2])


@pytest.mark.parametrize("weighting, eta_g", [("examples", 1.0), ("uniform", 0.7)])
def test_scaffold_matches_paper_loop(weighting, eta_g):
    model = tiny_softmax_model()
    data = unequal_clients()
    eta_l, population = 0.3, 7
    alg = scaffold(optax.sgd(eta_l), eta_g, client_learning_rate=eta_l,
                   num_clients=population, weighting=weighting)
    x = model.init(jax.random.key(1))
    c = jax.tree.map(jnp.zeros_like, x)
    controls = {}
    state = alg.init(x)
    index = IndexView(state)
    step = jit_round(alg, model)
    for r, ids in enumerate(COHORTS):
        cohort = pack_cohort(data, ids, batch_size=2, epochs=2, seed=3, round_num=r)
        state, metrics = step(state, cohort, jax.random.key(r))
        index = IndexView(state)
        x, c = reference_round(model, x, c, controls, cohort, eta_l, eta_g, population, weighting)
        close(state.params, x)
        close(state.server, c)
        for cid, c_i in controls.items():
            close(row(state, index, cid), c_i)
    assert isinstance(state, RoundState)
    assert set(index.row_of) == {0, 1, 2, 3, 4}
    np.testing.assert_allclose(metrics["train/control_norm"], tree.l2_norm(c), rtol=1e-5)
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
    """With SGD and one step, option II gives c_i+ = grad f_i(x); c moves by c_i+ / N."""
    model = tiny_softmax_model()
    data = unequal_clients()
    eta_l, eta_g, population = 0.5, 0.8, 4
    alg = scaffold(optax.sgd(eta_l), eta_g, client_learning_rate=eta_l, num_clients=population)
    cohort = pack_cohort(data, [2], batch_size=9, epochs=1, seed=0, round_num=0, shuffle=False)
    x0 = model.init(jax.random.key(1))
    arrays = data.get_client(2)
    g0 = softmax_grad(x0, arrays["x"], arrays["y"])
    state, index, _ = run(alg, model, [cohort], state=alg.init(x0))
    close(row(state, index, 2), g0)
    close(state.server, jax.tree.map(lambda g: g / population, g0))
    x1 = jax.tree.map(lambda p, g: p - eta_g * eta_l * g, x0, g0)
    close(state.params, x1)
    # Round 2: the corrected step is g1 - g0 + g0/N, and option II recovers c_i+ = g1.
    g1 = softmax_grad(x1, arrays["x"], arrays["y"])
    state, _, _ = run(alg, model, [cohort], state=state, index=index)
    close(row(state, index, 2), g1)
    close(state.server, jax.tree.map(lambda g: g / population, g1))
    close(state.params, jax.tree.map(
        lambda p, a, b: p - eta_g * eta_l * (a - b + b / population), x1, g1, g0))


def test_result_does_not_depend_on_chunk_size():
    """Clients one by one vs chunks of 3 (the last chunk padded with zero clients)."""
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = scaffold(optax.sgd(0.2), 1.0, client_learning_rate=0.2, num_clients=5)
    cohorts = [pack_cohort(data, ids, 2, 1, seed=0, round_num=r)
               for r, ids in enumerate([[0, 1, 2, 3], [4, 2, 1, 0]])]
    one, _, m1 = run(alg, model, cohorts, parallel.Plan(1))
    many, _, mc = run(alg, model, cohorts, parallel.Plan(3))
    close(one, many, 1e-6)
    np.testing.assert_allclose(m1["train/loss"], mc["train/loss"], rtol=1e-6)


def test_padding_client_changes_nothing():
    """Padding clients (one seen before, one new) move neither x, c, nor their rows."""
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = scaffold(optax.sgd(0.3), 1.0, client_learning_rate=0.3, num_clients=5)
    steps = [jit_round(alg, model, parallel.Plan(1)), jit_round(alg, model, parallel.Plan(2))]
    first = pack_cohort(data, [0, 1, 2], 2, 1, seed=0, round_num=0)
    state, index, _ = run(alg, model, [first], step=steps[0])
    row0 = row(state, index, 0)
    assert tree.l2_norm(row0) > 0
    second = pack_cohort(data, [3, 4], 2, 1, seed=0, round_num=1)
    plain, plain_index, _ = run(alg, model, [second], state=state, index=index.copy(),
                                step=steps[0])
    with_padding = with_padding_client(with_padding_client(second, 0), 9)
    for step in steps:
        padded, padded_index, m = run(alg, model, [with_padding], state=state,
                                      index=index.copy(), step=step)
        close(padded.params, plain.params, 1e-6)
        close(padded.server, plain.server, 1e-6)
        for cid in (0, 1, 2, 3, 4):
            close(row(padded, padded_index, cid), row(plain, plain_index, cid), 1e-6)
        close(row(padded, padded_index, 0), row0, 0)
        # A new client that trained on nothing keeps a zero row.
        assert float(tree.l2_norm(row(padded, padded_index, 9))) == 0.0
        assert float(m["train/num_examples"]) == 1 + 4


def test_store_grows_with_clients_seen_not_population():
    model = tiny_softmax_model()
    data = unequal_clients(sizes=(3,) * 10)
    alg = scaffold(optax.sgd(0.1), 1.0, client_learning_rate=0.1, num_clients=1_000_000)
    state = alg.init(model.init(jax.random.key(0)))
    assert client_state.capacity(state.store) == client_state.MIN_CAPACITY
    state, index, _ = run(alg, model, [pack_cohort(data, [7, 3, 5], 3, 1, 0, 0)], state=state)
    assert client_state.capacity(state.store) == client_state.MIN_CAPACITY
    assert state.store.rows["w"].shape == (client_state.MIN_CAPACITY, 3, 4)
    state, index, _ = run(alg, model, [pack_cohort(data, [0, 1, 2, 4, 6, 8, 9], 3, 1, 0, 1)],
                          state=state, index=index)
    assert index.size == 10
    assert client_state.capacity(state.store) == 2 * client_state.MIN_CAPACITY


def test_errors_are_clear():
    model = tiny_softmax_model()
    data = unequal_clients()
    with pytest.raises(ValueError, match="weighting"):
        scaffold(optax.sgd(0.1), 1.0, client_learning_rate=0.1, num_clients=5, weighting="size")
    with pytest.raises(ValueError, match="client_learning_rate"):
        scaffold(optax.sgd(0.1), 1.0, client_learning_rate=0.0, num_clients=5)
    with pytest.raises(ValueError, match="num_clients"):
        scaffold(optax.sgd(0.1), 1.0, client_learning_rate=0.1, num_clients=0)
    alg = scaffold(optax.sgd(0.1), 1.0, client_learning_rate=0.1, num_clients=5)
    cohort = pack_clients([data.get_client(0)], batch_size=2)
    # No host preparation: the state carries its index, and a cohort that fits the
    # initial store runs through `apply` directly (jit_round grows stores when needed).
    state, _ = alg.apply(alg.init(model.init(jax.random.key(0))), cohort, jax.random.key(0),
                         model=model)
    assert IndexView(state).row_of == {0: 0}


def test_registry_entry_builds_with_the_facts_it_needs():
    assert ENTRY.name == "scaffold"
    assert set(ENTRY.needs) == {"num_clients", "client_learning_rate"}
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = ENTRY.build(optax.sgd(0.1), 1.0, aggregator=None, num_clients=5,
                      client_learning_rate=0.1)
    state, _, metrics = run(alg, model, [pack_cohort(data, [0, 1], 2, 1, 0, 0)])
    assert set(metrics) >= {"train/loss", "train/num_examples", "train/delta_norm",
                            "train/control_norm"}
