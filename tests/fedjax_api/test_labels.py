"""Labels outside the model's classes are one line naming the client and the value (issue
15): checked when a task is built (data in memory) or when a cohort is packed (lazy data);
a cohort that cannot fit in memory is refused before it is packed."""

import numpy as np
import pytest

from fedjax_api import dataset, labels, tasks
from fedjax_api.dataset import FederatedDataset
from fedjax_api.errors import ConfigError
from fedjax_core.data import InMemoryFederatedData
from fedjax_core.data.federated_data import PreprocessedFederatedData
from fedjax_core.privacy import accounting
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients


def _with_label(value: int) -> InMemoryFederatedData:
    base = unequal_clients(sizes=(3, 4, 2), classes=4)
    clients = {cid: dict(base.get_client(i)) for i, cid in enumerate(base.client_ids)}
    clients["c1"] = {**clients["c1"], "y": np.array([0, 1, value, 2], np.int32)}
    return InMemoryFederatedData(clients)


def _register(name: str, train, test=None):
    tasks.register(tasks.TaskEntry(
        name=name, description="labels test", source="tests",
        defaults=tasks.TaskDefaults(algorithm="fedavg", rounds=1, clients_per_round=2,
                                    batch_size=2, epochs=1, client_lr=0.1,
                                    server_lr={"fedavg": 1.0}),
        load=lambda _: tasks.Loaded(tiny_softmax_model(), train,
                                    test or unequal_clients(sizes=(2,), seed=1))))


@pytest.mark.parametrize("value", [-1, 4, 99])
def test_a_bad_label_in_memory_is_refused_when_the_task_is_built(value):
    _register("bad-labels", _with_label(value))
    with pytest.raises(ConfigError, match=f"training client 'c1' has label {value}, outside "
                                          r"the model's 4 classes \(0 \.\. 3\)"):
        tasks.get("bad-labels")


def test_a_bad_test_label_names_the_test_client():
    _register("bad-test-labels", unequal_clients(sizes=(3, 4)), _with_label(7))
    with pytest.raises(ConfigError, match="test client 'c1' has label 7"):
        tasks.get("bad-test-labels")


def test_good_labels_pass_and_the_classes_come_from_the_model():
    data = unequal_clients(sizes=(3, 4), classes=4)
    assert labels.num_classes(tiny_softmax_model(classes=4), data) == 4
    assert labels.num_classes(tiny_softmax_model(classes=7), data) == 7
    labels.check_clients(data, 4)


def test_lazy_data_is_checked_per_cohort_when_packed():
    reads = []
    lazy = PreprocessedFederatedData(_with_label(-1),
                                     lambda cid, c: reads.append(cid) or c, True)
    _register("lazy-labels", lazy)
    task = tasks.get("lazy-labels")  # reads one client (the largest: c1) for the shapes
    assert task.train.num_classes == 4 and reads == ["c1"]
    ds = FederatedDataset(data=lazy, batch_size=2, num_classes=4)
    ds.cohort([0, 2], round=0)  # clients without the bad label pack
    with pytest.raises(ConfigError, match="training client 'c1' has label -1"):
        ds.cohort([2, 1], round=0)
    with pytest.raises(ConfigError, match="training client 'c1' has label -1"):
        device = FederatedDataset(data=lazy, batch_size=2, num_classes=4,
                                    device_resident=True)
        device.cohort([0], round=0)


def test_a_cohort_too_large_for_memory_is_refused_before_packing(monkeypatch):
    monkeypatch.setattr(dataset, "physical_memory", lambda: 2**20)
    ds = FederatedDataset(data=unequal_clients(sizes=(3, 4)), batch_size=100_000)
    with pytest.raises(ConfigError, match=r"a cohort of 2 clients x 1 steps x batch 100000 "
                                          r"needs at least .* GiB, more than this machine's "
                                          r".*; lower --batch-size"):
        ds.cohort([0, 1], round=0)
    ds = FederatedDataset(data=unequal_clients(sizes=(3, 4)), batch_size=1, epochs=10_000)
    with pytest.raises(ConfigError, match=r"x 40000 steps x batch 1"):
        ds.cohort([0, 1], round=0)
    assert FederatedDataset(data=unequal_clients(sizes=(3, 4)), batch_size=2).cohort(
        [0, 1], round=0).num_steps == 2


def test_an_unreachable_noise_target_says_what_is_reachable():
    with pytest.raises(ValueError, match=r"target epsilon 1e-08 is out of reach: the most "
                                         r"noise tried \(noise multiplier .*\) still gives "
                                         r"epsilon 0\.0299; raise the target epsilon"):
        accounting.calibrate_noise(1e-8, 1e-12, accounting.FixedSizeSampling(100, 1), 1)
