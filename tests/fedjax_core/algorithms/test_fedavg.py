"""FedAvg / FedOpt against a plain per-client Python loop."""

import jax
import numpy as np
import optax
import pytest

from fedjax_core import parallel
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.fedopt import fedadam, fedavgm
from fedjax_core.data import pack_cohort
from tests.fedjax_core.helpers import (
    plain_local_train,
    tiny_softmax_model,
    unequal_clients,
)


def reference_round(model, params, cohort, client_opt, server_opt, server_state):
    """One FedOpt round written as the paper's pseudocode, one client at a time."""
    deltas, weights = [], []
    for c in range(cohort.num_clients):
        w = plain_local_train(model, params, cohort, c, client_opt)
        deltas.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, w))
        weights.append(float(cohort.num_examples[c]))
    total = sum(weights)
    mean_delta = jax.tree.map(lambda *ds: sum(wt * d for wt, d in zip(weights, ds)) / total, *deltas)
    updates, server_state = server_opt.update(mean_delta, server_state, params)
    return optax.apply_updates(params, updates), server_state


@pytest.mark.parametrize("client_opt, server_opt", [
    (optax.sgd(0.3), optax.sgd(1.0)),
    (optax.adam(0.05), optax.sgd(0.7, momentum=0.9)),
])
def test_fedavg_matches_plain_loop(client_opt, server_opt):
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = fedavg(client_opt, server_opt)
    params = model.init(jax.random.key(1))
    state = alg.init(params)
    ref_params, ref_server = params, server_opt.init(params)
    step = jit_round(alg, model)
    for r in range(3):
        cohort = pack_cohort(data, [4, 0, 2, 1], batch_size=2, epochs=2, seed=3, round_num=r)
        state, metrics = step(state, cohort, jax.random.key(r))
        ref_params, ref_server = reference_round(model, ref_params, cohort, client_opt,
                                                 server_opt, ref_server)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                     state.params, ref_params)
    assert float(metrics["train/num_examples"]) == 4 + 5 + 9 + 2


def test_fedopt_variants_are_fedavg_with_server_optimizer():
    model = tiny_softmax_model()
    data = unequal_clients()
    params = model.init(jax.random.key(0))
    cohort = pack_cohort(data, [0, 1, 2], batch_size=3, epochs=1, seed=0, round_num=0)
    a = fedadam(optax.sgd(0.1), 0.01)
    b = fedavg(optax.sgd(0.1), optax.adam(0.01, b1=0.9, b2=0.99, eps=1e-3))
    sa, _ = jit_round(a, model)(a.init(params), cohort, jax.random.key(0))
    sb, _ = jit_round(b, model)(b.init(params), cohort, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, sa.params, sb.params)
    m = fedavgm(optax.sgd(0.1), 1.0, momentum=0.9)
    sm, _ = jit_round(m, model)(m.init(params), cohort, jax.random.key(0))
    assert sm.server[0].trace is not None


@pytest.mark.parametrize("chunk_size", [2, 3, 5, 8])
def test_result_does_not_depend_on_chunk_size(chunk_size):
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = fedavg(optax.sgd(0.2), optax.sgd(1.0))
    state0 = alg.init(model.init(jax.random.key(0)))
    cohort = pack_cohort(data, [0, 1, 2, 3, 4], batch_size=2, epochs=1, seed=0, round_num=0)
    one, m1 = jit_round(alg, model, parallel.Plan(1))(state0, cohort, jax.random.key(5))
    many, mc = jit_round(alg, model, parallel.Plan(chunk_size))(state0, cohort, jax.random.key(5))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), one.params, many.params)
    np.testing.assert_allclose(m1["train/loss"], mc["train/loss"], rtol=1e-6)


def test_padding_changes_nothing():
    """Extra padded steps, a larger batch dimension and an empty client leave the round unchanged."""
    from fedjax_core.data import pack_clients
    from fedjax_core.data.sampling import SHUFFLE_STREAM, host_rng

    model = tiny_softmax_model()
    data = unequal_clients()
    clients = [data.get_client(i) for i in (0, 2)]
    rngs = lambda: [host_rng(0, 0, SHUFFLE_STREAM, s) for s in range(2)]  # noqa: E731
    tight = pack_clients(clients, batch_size=2, epochs=1, rngs=rngs(), bucket=False)
    assert tight.num_steps == 5
    padded = pack_clients(clients, batch_size=2, epochs=1, rngs=rngs(), bucket=True)
    assert padded.num_steps == 6 and not padded.mask[:, 5].any()
    alg = fedavg(optax.sgd(0.2), optax.sgd(1.0))
    state0 = alg.init(model.init(jax.random.key(0)))
    a, _ = jit_round(alg, model)(state0, tight, jax.random.key(0))
    b, _ = jit_round(alg, model)(state0, padded, jax.random.key(0))
    b8, _ = jit_round(alg, model, parallel.Plan(2))(state0, padded, jax.random.key(0))
    for other in (b, b8):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a.params, other.params)
    # An empty client (weight 0) does not move the mean.
    empty = {k: v[:0] for k, v in clients[0].items()}
    with_empty = pack_clients(clients + [empty], batch_size=2, epochs=1, rngs=rngs() + [None],
                              bucket=False)
    c, _ = jit_round(alg, model)(state0, with_empty, jax.random.key(0))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a.params, c.params)


def test_round_is_traced_once_across_rounds():
    model = tiny_softmax_model()
    data = unequal_clients(sizes=(4, 4, 4, 4, 4, 4))
    alg = fedavg(optax.sgd(0.1), optax.sgd(1.0))
    traces = []

    def counting_apply(state, cohort, key, *, model, plan):
        traces.append(1)
        return alg.apply(state, cohort, key, model=model, plan=plan)

    counted = alg._replace(apply=counting_apply)
    step = jit_round(counted, model, parallel.Plan(2))
    state = counted.init(model.init(jax.random.key(0)))
    for r in range(4):
        idx = np.random.default_rng(r).choice(6, 3, replace=False)
        state, _ = step(state, pack_cohort(data, idx, 2, 1, seed=0, round_num=r), jax.random.key(r))
    assert len(traces) == 1


def test_same_seed_same_bits():
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = fedavg(optax.sgd(0.2), optax.sgd(1.0))
    outs = []
    for _ in range(2):
        state = alg.init(model.init(jax.random.key(0)))
        cohort = pack_cohort(data, [1, 2, 3], 2, 2, seed=11, round_num=4)
        state, _ = jit_round(alg, model)(state, cohort, jax.random.key(4))
        outs.append(state.params)
    jax.tree.map(np.testing.assert_array_equal, *outs)
