"""Tutorial: train your own Flax CNN on a canned task through the facade.

`from_flax` turns a `flax.linen.Module` into a fedjax_core `Model(init, apply, loss,
metrics)`; the task keeps its data, sampling and defaults and only its model is replaced.
Here a small CNN (two 3x3 convolutions, max pooling, dropout, one dense layer, 49,918
parameters for EMNIST's 62 classes) trains with FedAvg on EMNIST for a few rounds.

Run from the repository root (needs the `flax` extra and FedJAX's EMNIST files):

    .venv/bin/pip install -e '.[flax]'
    .venv/bin/fedjax data download emnist
    .venv/bin/python docs/examples/flax_model.py
"""

from pathlib import Path

import attrs
import flax.linen as nn
import optax

from fedjax_api import Experiment, tasks
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.models.adapters import from_flax
from fedjax_core.models.linear import classification_loss, classification_metrics

TASK = "emnist"  # x: float32 [n, 28, 28, 1], y: int32 in 0..61
NUM_CLASSES = 62
ROUNDS = 5
CLIENTS_PER_ROUND = 10
OUT = "runs/flax-model"


class CNN(nn.Module):
    """Predicts class logits `[batch, num_classes]` from images `[batch, H, W, C]`."""

    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):  # from_flax passes train=True when training
        x = nn.max_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = nn.Dropout(0.25, deterministic=not train)(x.reshape(x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


def main() -> None:
    task = tasks.get(TASK, seed=0)
    example = task.train.data.get_client(0)  # any batch with the real shape and dtype
    model = from_flax(CNN(NUM_CLASSES), {"x": example["x"][:1]},
                      loss=classification_loss, metrics=classification_metrics)
    Path(OUT).mkdir(parents=True, exist_ok=True)
    experiment = Experiment(
        task=attrs.evolve(task, model=model),  # the same task with our model
        algorithm=fedavg(client_optimizer=optax.sgd(0.05), server_optimizer=optax.sgd(1.0)),
        rounds=ROUNDS, clients_per_round=CLIENTS_PER_ROUND, seed=0, out_dir=Path(OUT))

    def show(record):
        if record["kind"] == "train":
            print(f"round {record['round']}: train loss {record['train/loss']:.4f}")

    result = experiment.run(on_record=show)
    print(f"test after {ROUNDS} rounds:", result.final["test"])
    print(f"run directory: {OUT} (config.json, metrics.jsonl, checkpoints/)")


if __name__ == "__main__":
    main()
