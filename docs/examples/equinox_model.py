"""Tutorial: train your own Equinox CNN on a canned task through the facade.

`from_equinox` turns a function `key -> eqx.Module` into a fedjax_core `Model(init, apply,
loss, metrics)`: the params are the module's floating-point arrays (`eqx.partition`), the
rest is closed over, and the module, written for ONE example as Equinox modules usually
are, is `vmap`ped over each batch with one dropout key per example. The CNN below is the
same network as in `flax_model.py`, trained with FedAvg on EMNIST for a few rounds.

Run from the repository root (needs the `equinox` extra and FedJAX's EMNIST files):

    .venv/bin/pip install -e '.[equinox]'
    .venv/bin/fedjax data download emnist
    .venv/bin/python docs/examples/equinox_model.py
"""

from pathlib import Path

import attrs
import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from fedjax_api import Experiment, tasks
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.models.adapters import from_equinox
from fedjax_core.models.linear import classification_loss, classification_metrics

TASK = "emnist"  # x: float32 [n, 28, 28, 1], y: int32 in 0..61
NUM_CLASSES = 62
ROUNDS = 5
CLIENTS_PER_ROUND = 10
OUT = "runs/equinox-model"


class CNN(eqx.Module):
    """Predicts class logits `[num_classes]` from ONE image `[H, W, C]` (H, W divisible by 4)."""

    conv0: eqx.nn.Conv2d
    conv1: eqx.nn.Conv2d
    pool: eqx.nn.MaxPool2d
    dropout: eqx.nn.Dropout
    dense: eqx.nn.Linear

    def __init__(self, key, image_shape, num_classes):
        k0, k1, k2 = jax.random.split(key, 3)
        height, width, channels = image_shape
        self.conv0 = eqx.nn.Conv2d(channels, 8, 3, padding=1, key=k0)  # "SAME", as Flax's
        self.conv1 = eqx.nn.Conv2d(8, 16, 3, padding=1, key=k1)
        self.pool = eqx.nn.MaxPool2d(2, stride=2)
        self.dropout = eqx.nn.Dropout(0.25)  # from_equinox turns it off unless training
        self.dense = eqx.nn.Linear(16 * (height // 4) * (width // 4), num_classes, key=k2)

    def __call__(self, x, *, key=None):  # key: this example's dropout key when training
        x = jnp.moveaxis(x, -1, 0)  # Equinox convolutions are channels-first: [C, H, W]
        x = self.pool(jax.nn.relu(self.conv0(x)))
        x = self.pool(jax.nn.relu(self.conv1(x)))
        return self.dense(self.dropout(x.reshape(-1), key=key))


def main() -> None:
    task = tasks.get(TASK, seed=0)
    image_shape = task.train.data.get_client(0)["x"].shape[1:]  # (28, 28, 1) for EMNIST
    model = from_equinox(lambda key: CNN(key, image_shape, NUM_CLASSES),
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
