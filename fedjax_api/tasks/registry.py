"""The task registry: a task is a dataset, a model and the literature's default hyperparameters."""

from typing import Callable, NamedTuple

import attrs

from fedjax_api import labels
from fedjax_api.dataset import FederatedDataset
from fedjax_api.errors import unknown
from fedjax_core.data import FederatedData, InMemoryFederatedData
from fedjax_core.data.pack import Transform
from fedjax_core.models.base import Model


@attrs.frozen(kw_only=True)
class TaskDefaults:
    """Hyperparameters a task runs with unless told otherwise.

    Attributes:
      algorithm: registry name of the default algorithm.
      rounds: training rounds.
      clients_per_round: cohort size.
      batch_size: client batch size.
      epochs: local epochs.
      client_lr: client SGD learning rate.
      server_lr: server learning rate for each algorithm name.
      eval_batch_size: evaluation batch size.
      chunk_size: clients per vmapped chunk; None: chosen for the backend
        (`fedjax_api.accelerator.default_chunk_size`: 1 on CPU).
      eval_every: evaluate the test set every this many rounds (0: only at the end).
      eval_train_clients: training clients (a fixed sample) evaluated at the end.
      eval_test_clients: test clients (a fixed sample, drawn from the seed) of the periodic
        evaluations; None: the whole test set (the last evaluation uses the whole test set
        either way, unless `--final-eval sampled`).
      max_steps: cap on each client's local steps per round (None: no cap).
      algorithm_options: the algorithms' own hyperparameters per algorithm name,
        e.g. `{"fedadam": {"b2": 0.999, "eps": 1e-8}}`.
    """

    algorithm: str
    rounds: int
    clients_per_round: int
    batch_size: int
    epochs: int
    client_lr: float
    server_lr: dict[str, float]
    eval_batch_size: int = 256
    chunk_size: int | None = None
    eval_every: int = 0
    eval_train_clients: int = 100
    eval_test_clients: int | None = None
    max_steps: int | None = None
    algorithm_options: dict[str, dict[str, float]] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class Task:
    """A loaded task.

    Attributes:
      name: registry name.
      model: the model.
      train: training clients, batched with the default batch size and epochs.
      test: test clients.
      train_eval: the training clients as evaluation reads them (same clients as
        `train`, without training-time augmentation).
      defaults: the default hyperparameters.
      baselines: reference numbers to print beside results (e.g. the
        most-frequent-class accuracy).
      source: where the data and the hyperparameters come from.
      num_domains: number of example domains (`domain_id` feature), 0 when none.
    """

    name: str
    model: Model
    train: FederatedDataset
    test: FederatedDataset
    train_eval: FederatedDataset
    defaults: TaskDefaults
    baselines: dict[str, float] = attrs.field(factory=dict)
    source: str = ""
    num_domains: int = 0


class Loaded(NamedTuple):
    """What a task's loader returns.

    `train_transform` augments sampled training clients each round (e.g. random crops);
    `train_eval` is the training clients as evaluation sees them (e.g. central crops),
    when that differs from `train`. `num_domains` > 0 when every example carries a
    `domain_id` feature in `0 .. num_domains - 1` (for agnostic_fedavg).
    """

    model: Model
    train: FederatedData
    test: FederatedData
    baselines: dict[str, float] = {}
    train_transform: Transform | None = None
    train_eval: FederatedData | None = None
    num_domains: int = 0


class TaskEntry(NamedTuple):
    """A registered task: `load(data_path)` reads its data (`data_path` is the user's
    `--data`, None for tasks that know where their files are)."""

    name: str
    description: str
    source: str
    defaults: TaskDefaults
    load: Callable[[str | None], Loaded]


TASKS: dict[str, TaskEntry] = {}


def register(entry: TaskEntry) -> None:
    """Adds a task to the registry (its loader runs at each `get`)."""
    TASKS[entry.name] = entry


def names() -> list[str]:
    return sorted(TASKS)


def entry(name: str) -> TaskEntry:
    """The registry entry of `name`; a `ConfigError` lists the choices."""
    try:
        return TASKS[name]
    except KeyError:
        raise unknown("task", name, names()) from None


def _check_labels(loaded: Loaded) -> int | None:
    """Checks the labels of the splits held in memory against the model's classes
    (`fedjax_api.labels`) and returns the classes to check the lazily read training data's
    cohorts against (None when it was checked here, or has no integer labels)."""
    classes = labels.num_classes(loaded.model, loaded.train)
    if classes is None:
        return None
    splits = [("training", loaded.train), ("test", loaded.test)]
    if loaded.train_eval is not None:
        splits.append(("training", loaded.train_eval))
    for split, data in splits:
        if isinstance(data, InMemoryFederatedData):
            labels.check_clients(data, classes, split)
    return None if isinstance(loaded.train, InMemoryFederatedData) else classes


def get(name: str, *, seed: int = 0, batch_size: int | None = None,
        epochs: int | None = None, max_steps: int | None = None,
        data_path: str | None = None) -> Task:
    """Loads task `name` with its defaults (batch size, epochs and the step cap can be
    overridden; `data_path` is where tasks like `femnist-leaf` read their files)."""
    e = entry(name)
    loaded = e.load(data_path)
    d = e.defaults
    lazy = _check_labels(loaded)
    train = FederatedDataset(data=loaded.train,
                             batch_size=d.batch_size if batch_size is None else batch_size,
                             epochs=d.epochs if epochs is None else epochs, seed=seed,
                             max_steps=d.max_steps if max_steps is None else max_steps,
                             transform=loaded.train_transform, num_classes=lazy)
    test = FederatedDataset(data=loaded.test, batch_size=d.eval_batch_size, seed=seed)
    train_eval = (train if loaded.train_eval is None else
                  FederatedDataset(data=loaded.train_eval, batch_size=d.eval_batch_size, seed=seed))
    return Task(name=name, model=loaded.model, train=train, test=test, train_eval=train_eval,
                defaults=d,
                baselines=dict(loaded.baselines), source=e.source,
                num_domains=loaded.num_domains)
