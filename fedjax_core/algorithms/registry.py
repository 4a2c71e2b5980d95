"""Algorithms by name, for the facade and the command line."""

import optax

from fedjax_core.aggregate.base import Aggregator
from fedjax_core.algorithms.base import AlgorithmEntry, FederatedAlgorithm
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.fedopt import fedadagrad, fedadam, fedavgm, fedyogi


def _fedavg(client_optimizer, server_learning_rate, aggregator=None):
    return fedavg(client_optimizer, optax.sgd(server_learning_rate), aggregator)


_REDDI = "Reddi et al. 2021, Adaptive Federated Optimization"
ALGORITHMS: dict[str, AlgorithmEntry] = {
    e.name: e for e in [
        AlgorithmEntry("fedavg", "Federated Averaging: mean of client deltas, server SGD",
                       _fedavg, "McMahan et al. 2017, Communication-Efficient Learning"),
        AlgorithmEntry("fedadam", "FedAvg with Adam on the server", fedadam, _REDDI),
        AlgorithmEntry("fedyogi", "FedAvg with Yogi on the server", fedyogi, _REDDI),
        AlgorithmEntry("fedadagrad", "FedAvg with Adagrad on the server", fedadagrad, _REDDI),
        AlgorithmEntry("fedavgm", "FedAvg with momentum SGD (0.9) on the server", fedavgm,
                       "Hsu et al. 2019; " + _REDDI),
    ]
}


def get(name: str) -> AlgorithmEntry:
    """The registered algorithm `name`; a `KeyError` lists the choices."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; choose one of: "
                       f"{', '.join(sorted(ALGORITHMS))}") from None


def build(name: str, client_optimizer: optax.GradientTransformation,
          server_learning_rate: float, aggregator: Aggregator | None = None,
          **server_options) -> FederatedAlgorithm:
    """`get(name).build(client_optimizer, server_learning_rate, aggregator, **server_options)`.

    `server_options` are the algorithm's own hyperparameters, e.g. `b2=0.999, eps=1e-8`
    for FedAdam or `momentum=0.9` for FedAvgM.
    """
    return get(name).build(client_optimizer, server_learning_rate, aggregator=aggregator,
                           **server_options)
