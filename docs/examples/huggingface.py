"""Tutorial: a Hugging Face `datasets.Dataset` of images, partitioned with Flower's
DirichletPartitioner(alpha=0.5), trained with FedAvg through the facade, logged to MLflow.

Offline (the images are drawn here), about 10 s of CPU, from the repository root:

    .venv/bin/python docs/examples/huggingface.py
"""

import numpy as np
import optax
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from fedjax_api import Experiment, tasks
from fedjax_api.partition_plot import plot_label_distribution
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.data.hf import from_hf
from fedjax_core.models import mlp

NUM_EXAMPLES, NUM_CLIENTS, COHORT, ROUNDS = 3000, 30, 10, 20
PLOT = "docs/images/huggingface_partition.png"


def images(n: int, seed: int) -> Dataset:
    """`n` 8x8 grayscale images of 4 classes: a brighter row (0, 1) or column (2, 3) in noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    bars = np.zeros((4, 8, 8), np.uint8)
    bars[0, 2], bars[1, 6], bars[2, :, 2], bars[3, :, 6] = 55, 55, 55, 55
    x = rng.integers(0, 201, (n, 8, 8)).astype(np.uint8) + bars[y]
    return Dataset.from_dict({"image": list(x), "label": y}, features=Features(
        {"image": Image(), "label": ClassLabel(names=["row 2", "row 6", "col 2", "col 6"])}))


hf = DatasetDict(train=images(NUM_EXAMPLES, seed=0), test=images(NUM_EXAMPLES // 5, seed=1))
dirichlet = DirichletPartitioner(num_partitions=NUM_CLIENTS, partition_by="label", alpha=0.5,
                                 min_partition_size=10, seed=0)
train, test = from_hf(hf, dirichlet, features={"x": "image", "y": "label"},
                      test_partitioner=IidPartitioner(num_partitions=10))
plot_label_distribution(train, PLOT, max_clients=NUM_CLIENTS)

defaults = tasks.TaskDefaults(algorithm="fedavg", rounds=ROUNDS, clients_per_round=COHORT,
                              batch_size=16, epochs=1, client_lr=0.1, server_lr={"fedavg": 1.0})
model = mlp((8, 8, 1), (32,), num_classes=4)
tasks.register(tasks.TaskEntry("hf-bars", "8x8 bars, Dirichlet(0.5) label skew", __file__, defaults,
                               lambda _: tasks.Loaded(model, train, test)))
experiment = Experiment(task=tasks.get("hf-bars"), algorithm=fedavg(optax.sgd(0.1), optax.sgd(1.0)),
                        rounds=ROUNDS, clients_per_round=COHORT, eval_every=5, eval_train_clients=0,
                        track=("mlflow:./mlruns",))
result = experiment.run()
for record in (r for r in result.history if r["kind"] == "eval"):
    print(f"round {record['round']}: test accuracy {record['test/accuracy']:.3f}")
print(f"{train}\ntest after {ROUNDS} rounds: {result.final['test']}")
