"""`FederatedDataset(device_resident=True)`: indexed cohorts through the facade."""

import attrs
import jax
import numpy as np
import optax
import pytest

from fedjax_api import ConfigError, Experiment, Server, tasks
from fedjax_api.dataset import FederatedDataset
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.scaffold import scaffold
from fedjax_core.data.device import IndexedBatches, gather
from fedjax_core.parallel import Plan
from tests.fedjax_api.tiny_task import NAME
from tests.fedjax_core.helpers import unequal_clients


def same(dense, indexed):
    assert isinstance(indexed.batches, IndexedBatches) and isinstance(dense.batches, dict)
    got = gather(indexed.batches)
    for k, v in dense.batches.items():
        np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)
        assert got[k].dtype == v.dtype
    for field in ("mask", "num_examples", "client_index"):
        np.testing.assert_array_equal(getattr(indexed, field), getattr(dense, field))


def datasets(**kw):
    data = unequal_clients(sizes=(5, 2, 0, 9, 1, 4, 7, 3, 6, 2), seed=2)
    dense = FederatedDataset(data=data, batch_size=2, seed=3, **kw)
    return dense, attrs.evolve(dense, device_resident=True)


@pytest.mark.parametrize("kw", [dict(), dict(epochs=2, max_steps=5),
                                dict(max_cohort_bytes=1)])  # max_cohort_bytes=1: bucketed
def test_sample_and_poisson_give_the_dense_cohorts(kw):
    dense, device = datasets(**kw)
    for r in range(3):
        same(dense.sample(clients=4, round=r), device.sample(clients=4, round=r))
        same(dense.sample_poisson(0.3, r), device.sample_poisson(0.3, r))
    same(dense.cohort([2, 0], 1, pad_to=4), device.cohort([2, 0], 1, pad_to=4))
    # The examples go to the device once and are shared by every cohort.
    a, b = device.sample(clients=2, round=0), device.sample(clients=3, round=1)
    assert a.batches.source is b.batches.source is device.device_examples.features


def test_empty_poisson_round_is_all_padding():
    dense, device = datasets()
    r = next(r for r in range(200) if len(dense.sample_poisson(0.02, r).client_index) == 1
             and dense.sample_poisson(0.02, r).client_index[0] == -1)
    c = device.sample_poisson(0.02, r)
    assert not c.mask.any() and (c.batches.index == 0).all() and (c.client_index == -1).all()
    same(dense.sample_poisson(0.02, r), c)


def test_transform_on_device_is_refused():
    dense, device = datasets()
    flip = lambda arrays, rng: arrays  # noqa: E731
    with pytest.raises(ConfigError, match="device_resident data cannot be augmented"):
        attrs.evolve(device, transform=flip)
    with pytest.raises(ConfigError, match="transform"):
        FederatedDataset(data=dense.data, batch_size=2, transform=flip, device_resident=True)


@pytest.mark.parametrize("chunk", [1, 3])
def test_server_rounds_equal_the_dense_rounds(chunk):
    dense, device = datasets()
    plan = Plan(chunk_size=chunk)
    for make in (lambda: fedavg(optax.sgd(0.4), optax.adam(0.05)),
                 lambda: scaffold(optax.sgd(0.3), 1.0, client_learning_rate=0.3,
                                   num_clients=dense.num_clients)):
        servers = []
        for ds in (dense, device):
            model = tasks.get(NAME).model
            s = Server.create(make(), model, seed=1, plan=plan)
            for r in range(3):
                s = s.step(ds.sample(clients=5, round=r))
            servers.append(s)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6),
                     servers[1].state, servers[0].state)
        assert servers[0].round == 3


@pytest.mark.parametrize("sampling", ["uniform", "poisson"])
def test_experiment_with_a_device_resident_task(sampling):
    task = tasks.get(NAME)
    on_device = attrs.evolve(task, train=attrs.evolve(task.train, device_resident=True))
    results = []
    for t in (task, on_device):
        exp = Experiment(task=t, algorithm=fedavg(optax.sgd(0.5)), rounds=3,
                         clients_per_round=3, seed=2, sampling=sampling, plan=Plan(2))
        results.append(exp.run())
    losses = [[h["train/loss"] for h in r.history if h["kind"] == "train"] for r in results]
    assert len(losses[0]) == 3
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(results[1].final["test"]["accuracy"],
                               results[0].final["test"]["accuracy"], atol=1e-6)


def test_with_seed_shares_the_device_copy_and_samples_like_a_new_dataset():
    dense, resident = datasets()
    first = resident.device_examples
    other = resident.with_seed(7)
    assert other.seed == 7 and resident.seed != 7
    assert other.device_examples is first  # not put on the device again
    same(attrs.evolve(dense, seed=7).sample(3, round=2), other.sample(3, round=2))
    a, b = resident.sample(3, round=2), other.sample(3, round=2)  # another seed, other draws
    assert not (np.array_equal(a.client_index, b.client_index)
                and np.array_equal(a.batches.index, b.batches.index))


def test_device_examples_are_placed_once_replicated_on_the_mesh():
    from fedjax_api.loop import cohort_sampler
    from fedjax_core import parallel
    dense, device = datasets()
    plan = Plan(chunk_size=1, mesh=parallel.client_mesh(8))
    before = device.device_examples.features["x"]
    assert len(before.sharding.device_set) == 1  # put on one device at first
    sample = cohort_sampler(device, 8, "uniform", plan)
    a, b = sample(0), sample(1)
    source = a.batches.source["x"]
    assert b.batches.source["x"] is source  # the same arrays every round: no copy
    assert source.sharding == parallel.replicated(plan)  # what the round reads: no copy
    assert len(source.sharding.device_set) == 8 and source.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(source), np.asarray(before))
    model = tasks.get(NAME).model
    on_mesh = Server.create(fedavg(optax.sgd(0.4)), model, seed=1, plan=plan)
    one = Server.create(fedavg(optax.sgd(0.4)), model, seed=1, plan=Plan(chunk_size=1))
    for r in range(2):
        on_mesh, one = on_mesh.step(sample(r)), one.step(dense.sample(clients=8, round=r))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), on_mesh.params,
                 one.params)
