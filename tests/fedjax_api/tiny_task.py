"""A tiny registered task so facade and CLI tests run in seconds."""

import numpy as np

from fedjax_api import tasks
from fedjax_core.data import InMemoryFederatedData
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients

NAME = "tiny-test"


def with_domains(data):
    """Client i's examples get `domain_id = i % 2` (the model ignores the feature)."""
    return InMemoryFederatedData({
        cid: {**data.get_client(i), "domain_id": np.full(n, i % 2, np.int32)}
        for i, (cid, n) in enumerate(zip(data.client_ids, data.client_sizes))})


def _load(data_path):
    train = with_domains(unequal_clients(sizes=(5, 2, 9, 1, 4, 7), seed=0))
    test = with_domains(unequal_clients(sizes=(3, 4), seed=1))
    return tasks.Loaded(tiny_softmax_model(), train, test, {"accuracy": 0.25}, num_domains=2)


def register():
    tasks.register(tasks.TaskEntry(
        name=NAME, description="tiny softmax task for tests", source="tests",
        defaults=tasks.TaskDefaults(algorithm="fedavg", rounds=3, clients_per_round=3,
                                    batch_size=2, epochs=1, client_lr=0.5,
                                    server_lr={"fedavg": 1.0, "fedadam": 0.05},
                                    eval_batch_size=4, eval_train_clients=4),
        load=_load))


def empty_client_data():
    return InMemoryFederatedData({"a": {"x": np.zeros((0, 3), np.float32),
                                        "y": np.zeros(0, np.int32)}})
