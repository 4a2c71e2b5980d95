"""`parallel.sum_clients`: the cohort's sum without stacking, and FedAvg's use of it."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import parallel
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.aggregate.mean import mean
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.data import pack_cohort
from tests.fedjax_core.helpers import close, mlp_round_memory, tiny_softmax_model, unequal_clients


def affine(c):
    # Non-zero on an all-zero (padding) client, so a padding client that counted would
    # change the sum.
    return {"s": jnp.sum(c["x"] ** 2) + 1.0, "v": 2.0 * c["x"][0] + 1.0}


def inputs(n, seed=0):
    return {"x": jnp.asarray(np.random.default_rng(seed).normal(size=(n, 3, 2)), jnp.float32)}


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 10])
def test_sum_clients_equals_the_summed_stack(chunk):
    x = inputs(7)
    want = jax.tree.map(lambda y: y.sum(0), jax.vmap(affine)(x))
    got = jax.jit(parallel.sum_clients, static_argnums=(0, 2))(affine, x,
                                                               parallel.Plan(chunk))
    close(got, want, 1e-6)
    assert float(got["s"]) == pytest.approx(float(jnp.sum(x["x"] ** 2)) + 7.0, rel=1e-6)


@pytest.mark.parametrize("devices, chunk, clients", [(8, 1, 8), (8, 2, 5), (3, 2, 11),
                                                     (2, 4, 12)])
def test_sum_clients_over_devices_matches_one_device(devices, chunk, clients):
    x = inputs(clients, seed=1)
    plan = parallel.Plan(chunk, parallel.client_mesh(devices))
    got = jax.jit(parallel.sum_clients, static_argnums=(0, 2))(affine, x, plan)
    close(got, jax.tree.map(lambda y: y.sum(0), jax.vmap(affine)(x)), 1e-6)


def test_sum_clients_checks_the_plan():
    with pytest.raises(ValueError, match="chunk_size"):
        parallel.sum_clients(affine, inputs(3), parallel.Plan(0))


def stacked_mean() -> Aggregator:
    """The same mean without the flag: FedAvg then stacks the deltas (map_clients)."""
    m = mean()
    return Aggregator(m.init, m.apply)


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_fedavg_sums_deltas_as_the_stacked_mean_does(chunk):
    model, data = tiny_softmax_model(), unequal_clients(sizes=(5, 2, 9, 1, 4, 7, 3))
    results = []
    for aggregator in (None, stacked_mean()):
        alg = fedavg(optax.sgd(0.5), optax.adam(0.05), aggregator=aggregator)
        step = jit_round(alg, model, parallel.Plan(chunk))
        state = alg.init(model.init(jax.random.key(1)))
        for r in range(3):
            cohort = pack_cohort(data, [r, 6 - r, 3, (r + 4) % 7, 5], batch_size=2, epochs=2,
                                 seed=0, round_num=r)
            state, metrics = step(state, cohort, jax.random.fold_in(jax.random.key(2), r))
        results.append((state, metrics))
    assert mean().stream is not None and stacked_mean().stream is None
    close(results[0], results[1], 1e-6)


def _round_temp_bytes(aggregator, clients: int) -> int:
    return mlp_round_memory(fedavg(optax.sgd(0.1), optax.sgd(1.0), aggregator=aggregator),
                            clients)[0]


def test_fedavg_round_memory_does_not_grow_with_the_cohort():
    params_bytes = 4 * (16 * 256 + 256 + 256 * 64 + 64)
    small, large = _round_temp_bytes(None, 8), _round_temp_bytes(None, 128)
    # Stacked deltas would add 120 copies of the parameters; the sum adds none.
    assert large - small < 8 * params_bytes, (small, large)
    stacked = _round_temp_bytes(stacked_mean(), 128)
    assert stacked - large > 100 * params_bytes, (large, stacked)
