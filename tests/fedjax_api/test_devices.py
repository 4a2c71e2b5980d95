"""`Experiment(devices=N)` / `--devices N` on one process, and the host-side split of a
cohort between processes (`FederatedDataset.cohort(slots=...)`, `distributed`).

tests/conftest.py starts 8 CPU devices; results are compared with the one-device run to
1e-6 (float reassociation across devices).
"""

import jax
import numpy as np
import pytest

from fedjax_api import ConfigError, Experiment, config, distributed, tasks
from fedjax_core import parallel
from fedjax_core.data.pack import pad_cohort
from tests.fedjax_api.tiny_task import NAME

TOL = 1e-6


def close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=TOL, rtol=TOL), a, b)


def train_metrics(history):
    return [(r["round"], r["train/loss"], r["train/delta_norm"]) for r in history
            if r["kind"] == "train"]


@pytest.mark.parametrize("algorithm, sampling", [("fedavg", "uniform"), ("scaffold", "uniform"),
                                                 ("fedavg", "poisson")])
def test_experiment_over_devices_matches_one_device(algorithm, sampling, tmp_path):
    results = {}
    for devices in (1, 8, 3):
        cfg = config.resolve(NAME, algorithm=algorithm, rounds=3, clients_per_round=5,
                             sampling=sampling, devices=devices, eval_every=2,
                             out=str(tmp_path / f"d{devices}"))
        exp = Experiment.from_config(cfg)
        assert parallel.num_shards(exp.plan) == devices
        results[devices] = exp.run()
    one = results[1]
    for devices in (8, 3):
        close(results[devices].server.state, one.server.state)
        np.testing.assert_allclose(train_metrics(results[devices].history),
                                   train_metrics(one.history), atol=TOL, rtol=TOL)
        for split in ("test", "train"):
            for name, value in one.final[split].items():
                assert results[devices].final[split][name] == pytest.approx(value, abs=TOL)
    params = results[8].server.params
    assert jax.tree.leaves(params)[0].sharding == parallel.replicated(results[8].server.plan)


def test_devices_zero_means_all_and_too_many_is_one_clear_error():
    task = tasks.get(NAME)
    from fedjax_core.algorithms.fedavg import fedavg
    exp = Experiment(task=task, algorithm=fedavg(), rounds=1, clients_per_round=2, devices=0)
    assert exp.plan.mesh.size == len(jax.local_devices()) == 8
    one = Experiment(task=task, algorithm=fedavg(), rounds=1, clients_per_round=2)
    assert one.plan.mesh is None
    with pytest.raises(ConfigError, match="--devices 9 asks for more devices than the 8 cpu "
                                          "device\\(s\\) of this process"):
        Experiment.from_config(config.resolve(NAME, devices=9))
    with pytest.raises(ConfigError, match="devices must be at least 0, got -1"):
        config.resolve(NAME, devices=-1)


# ------------------------------------------------------------- a process's share of a cohort


def test_cohort_slots_are_the_full_cohorts_slots():
    train = tasks.get(NAME, seed=3).train
    for r in range(3):
        idx = train.sample_indices(5, r)
        full = pad_cohort(train.cohort(idx, r), 8)
        for slots in (range(4), range(4, 8), range(2, 6), range(6, 8)):
            part = train.cohort(idx, r, pad_to=8, slots=slots)
            np.testing.assert_array_equal(part.mask, full.mask[slots.start:slots.stop])
            np.testing.assert_array_equal(part.num_examples,
                                          full.num_examples[slots.start:slots.stop])
            np.testing.assert_array_equal(part.client_index,
                                          full.client_index[slots.start:slots.stop])
            for k, v in full.batches.items():
                np.testing.assert_array_equal(part.batches[k], v[slots.start:slots.stop])
    only_padding = train.cohort(idx, 0, pad_to=8, slots=range(6, 8))
    assert not only_padding.mask.any() and list(only_padding.client_index) == [-1, -1]
    with pytest.raises(ValueError, match="do not lie in a cohort of 8 clients"):
        train.cohort(idx, 0, pad_to=8, slots=range(6, 10))


def test_poisson_indices_are_what_sample_poisson_packs():
    train = tasks.get(NAME).train
    for r in range(4):
        idx, size = train.poisson_indices(0.5, r)
        cohort = train.sample_poisson(0.5, r)
        assert cohort.num_clients == size
        assert list(cohort.client_index[:len(idx)]) == list(idx)
        assert (cohort.client_index[len(idx):] == -1).all()


def test_sample_cohort_assembles_global_arrays_over_the_mesh():
    train = tasks.get(NAME).train
    plan = parallel.Plan(1, distributed.mesh(4))
    idx = train.sample_indices(5, 2)
    cohort = distributed.sample_cohort(train, idx, 2, plan)
    full = pad_cohort(train.cohort(idx, 2), 8)  # padded to a multiple of the 4 devices
    assert cohort.mask.sharding == parallel.cohort_sharding(plan)
    np.testing.assert_array_equal(cohort.mask, full.mask)
    np.testing.assert_array_equal(cohort.batches["x"], full.batches["x"])
    np.testing.assert_array_equal(cohort.num_examples, full.num_examples)
    assert isinstance(cohort.client_index, np.ndarray)
    np.testing.assert_array_equal(cohort.client_index, full.client_index)
    assert distributed.cohort_size(5, plan) == 8 and distributed.cohort_size(0, plan) == 4
    assert not distributed.spans_processes(plan) and distributed.is_primary()


# ------------------------------------------------------------------- multi-process settings


def test_settings_come_from_arguments_then_environment():
    env = {"FEDJAX_COORDINATOR": "10.0.0.1:1234", "FEDJAX_NUM_PROCESSES": "4",
           "FEDJAX_PROCESS_ID": "3"}
    assert distributed.settings(environ={}) is None
    assert distributed.settings(environ=env) == ("10.0.0.1:1234", 4, 3)
    assert distributed.settings("h:1", 2, 0, environ=env) == ("h:1", 2, 0)
    assert distributed.settings(environ={"FEDJAX_COORDINATOR": "auto"}) == ("auto", None, None)
    assert not distributed.initialize(environ={})  # nothing asked: one process, no change


@pytest.mark.parametrize("kwargs, env, message", [
    ({"num_processes": 2}, {}, "several processes need --coordinator HOST:PORT, --process-id"),
    ({"coordinator": "h:1", "num_processes": 2}, {}, "need --process-id too"),
    ({}, {"FEDJAX_NUM_PROCESSES": "two"}, "FEDJAX_NUM_PROCESSES must be an integer, got 'two'"),
    ({"coordinator": "nohost", "num_processes": 2, "process_id": 0}, {}, "must be HOST:PORT"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {},
     "--process-id must be between 0 and 1"),
    ({"coordinator": "h:1", "num_processes": 0, "process_id": 0}, {},
     "--num-processes must be at least 1"),
])
def test_bad_settings_are_one_clear_error(kwargs, env, message):
    with pytest.raises(ConfigError, match=message):
        distributed.settings(environ=env, **kwargs)
