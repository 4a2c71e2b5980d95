"""The federated algorithm a run configures: `build_algorithm` makes it from the run's
options (`ExperimentConfig`, or a sweep member's `AlgorithmOptions`) and its task, for
`Experiment` and `Sweep` alike.

Example:
  >>> alg = build_algorithm(config.resolve("synthetic", algorithm="fedprox"), task)
"""

from typing import Any, NamedTuple

import optax

from fedjax_api import tasks
from fedjax_api.config import ExperimentConfig
from fedjax_api.errors import ConfigError
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.aggregate.guard import skip_nonfinite
from fedjax_core.algorithms import registry
from fedjax_core.algorithms.base import FederatedAlgorithm


class AlgorithmOptions(NamedTuple):
    """What `build_algorithm` reads of a config (`from_config`): a sweep member's settings
    carry traced learning rates, which an `ExperimentConfig` would refuse."""

    algorithm: str
    client_lr: Any
    server_lr: Any
    aggregator: str
    aggregator_options: dict
    algorithm_options: dict
    skip_nonfinite_clients: bool

    @classmethod
    def of(cls, cfg: ExperimentConfig | dict) -> "AlgorithmOptions":
        """The options of a config, or of a dict holding its fields."""
        values = cfg if isinstance(cfg, dict) else cfg.to_dict()
        return cls(**{name: values[name] for name in cls._fields})


def build_algorithm(cfg: ExperimentConfig | AlgorithmOptions, task: tasks.Task,
                    aggregator: Aggregator | None = None) -> FederatedAlgorithm:
    """The configured algorithm with its aggregator (or `aggregator`, e.g. a private run's);
    supplies what the algorithm `needs` (the number of training clients, of domains, the
    client learning rate)."""
    entry = registry.get(cfg.algorithm)
    facts = {"num_clients": task.train.num_clients, "num_domains": task.num_domains,
             "client_learning_rate": cfg.client_lr}
    if "num_domains" in entry.needs and not task.num_domains:
        raise ConfigError(f"algorithm {cfg.algorithm!r} needs examples with a domain_id; "
                          f"task {task.name!r} has none (try emnist or stackoverflow)")
    try:
        if aggregator is None and (cfg.aggregator != "mean" or cfg.aggregator_options):
            aggregator = aggregators.build(cfg.aggregator, **cfg.aggregator_options)
        if cfg.skip_nonfinite_clients:
            aggregator = skip_nonfinite(aggregator)
        return registry.build(cfg.algorithm, optax.sgd(cfg.client_lr), cfg.server_lr,
                              aggregator=aggregator, **cfg.algorithm_options,
                              **{k: facts[k] for k in entry.needs})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build {cfg.algorithm} with aggregator {cfg.aggregator}: "
                          f"{e}") from None
