"""Tutorial: train your own Flax NNX CNN on a canned task through the facade.

`from_nnx` turns a function `nnx.Rngs -> nnx.Module` into a fedjax_core `Model(init, apply,
loss, metrics)`: the params are the module's `nnx.Param` state as a plain nested dict
(`nnx.split`), the graph definition and the rest of the state are closed over, and `apply`
rebuilds the module with `nnx.merge` inside the jitted round, with its dropout stream
reseeded from each step's key. The CNN below is the same network as in `flax_model.py`,
trained with FedAvg on EMNIST for a few rounds.

Run from the repository root (needs the `flax` extra and FedJAX's EMNIST files):

    .venv/bin/pip install -e '.[flax]'
    .venv/bin/fedjax data download emnist
    .venv/bin/python docs/examples/nnx_model.py
"""

from functools import partial
from pathlib import Path

import attrs
import optax
from flax import nnx

from fedjax_api import Experiment, tasks
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.models.adapters import from_nnx
from fedjax_core.models.linear import classification_loss, classification_metrics

TASK = "emnist"  # x: float32 [n, 28, 28, 1], y: int32 in 0..61
NUM_CLASSES = 62
ROUNDS = 5
CLIENTS_PER_ROUND = 10
OUT = "runs/nnx-model"


class CNN(nnx.Module):
    """Predicts class logits `[batch, num_classes]` from images `[batch, H, W, C]`."""

    def __init__(self, image_shape, num_classes: int, *, rngs: nnx.Rngs):
        height, width, channels = image_shape  # H and W divisible by 4
        self.conv0 = nnx.Conv(channels, 8, (3, 3), rngs=rngs)
        self.conv1 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.dropout = nnx.Dropout(0.25, rngs=rngs)  # its stream: from_nnx reseeds it per step
        self.dense = nnx.Linear(16 * (height // 4) * (width // 4), num_classes, rngs=rngs)

    def __call__(self, x):
        pool = partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2))
        x = pool(nnx.relu(self.conv0(x)))
        x = pool(nnx.relu(self.conv1(x)))
        return self.dense(self.dropout(x.reshape(x.shape[0], -1)))


def main() -> None:
    task = tasks.get(TASK, seed=0)
    image_shape = task.train.data.get_client(0)["x"].shape[1:]  # (28, 28, 1) for EMNIST
    model = from_nnx(lambda rngs: CNN(image_shape, NUM_CLASSES, rngs=rngs),
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
