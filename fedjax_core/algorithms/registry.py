"""Algorithms by name, for the facade and the command line.

Each algorithm module ends with `ENTRY` (or `ENTRIES`), an `AlgorithmEntry` whose
`build(client_optimizer, server_learning_rate, aggregator=None, **options)` makes the
algorithm; this module collects them. A factory that follows the convention
`name(client_optimizer, server_optimizer, *, aggregator=None, **options)` is its own
builder (its `server_optimizer` takes the float server learning rate).
"""

import importlib
import inspect

import optax

from fedjax_core.aggregate.base import Aggregator
from fedjax_core.algorithms.base import AlgorithmEntry, FederatedAlgorithm
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.fedopt import fedadagrad, fedadam, fedavgm, fedyogi
from fedjax_core.hyperparameters import check_types

MODULES = ("fedprox", "fedsgd", "fednova", "qffl", "scaffold", "feddyn", "ditto", "apfl",
           "mime", "agnostic_fedavg", "hypcluster", "fedbuff")
"""Modules of `fedjax_core.algorithms` that define `ENTRY` or `ENTRIES`."""


def _fedavg(client_optimizer, server_learning_rate, aggregator=None):
    return fedavg(client_optimizer, server_learning_rate, aggregator=aggregator)


_REDDI = "Reddi et al. 2021, Adaptive Federated Optimization"
_BUILTIN = [
    AlgorithmEntry("fedavg", "Federated Averaging: mean of client deltas, server SGD",
                   _fedavg, "McMahan et al. 2017, Communication-Efficient Learning"),
    AlgorithmEntry("fedadam", "FedAvg with Adam on the server", fedadam, _REDDI),
    AlgorithmEntry("fedyogi", "FedAvg with Yogi on the server", fedyogi, _REDDI),
    AlgorithmEntry("fedadagrad", "FedAvg with Adagrad on the server", fedadagrad, _REDDI),
    AlgorithmEntry("fedavgm", "FedAvg with momentum SGD (0.9) on the server", fedavgm,
                   "Hsu et al. 2019; " + _REDDI),
]


def _collect() -> dict[str, AlgorithmEntry]:
    entries = list(_BUILTIN)
    for name in MODULES:
        module = importlib.import_module(f"fedjax_core.algorithms.{name}")
        entries.extend(getattr(module, "ENTRIES", None) or [module.ENTRY])
    table: dict[str, AlgorithmEntry] = {}
    for e in entries:
        if e.name in table:
            raise RuntimeError(f"algorithm {e.name!r} is registered twice")
        table[e.name] = e
    return table


ALGORITHMS: dict[str, AlgorithmEntry] = _collect()


def get(name: str) -> AlgorithmEntry:
    """The registered algorithm `name`; a `KeyError` lists the choices."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; choose one of: "
                       f"{', '.join(sorted(ALGORITHMS))}") from None


_FIXED = ("client_optimizer", "server_learning_rate", "server_optimizer", "aggregator")


def options(name: str) -> dict[str, object]:
    """The algorithm's own options and their defaults (`inspect.Parameter.empty` when
    required), e.g. `{"b1": 0.9, "b2": 0.99, "eps": 0.001}` for FedAdam. The facts in
    `needs` are included; the facade fills them."""
    params = inspect.signature(get(name).build).parameters
    return {p.name: p.default for p in params.values()
            if p.name not in _FIXED and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def check_options(name: str, given: dict) -> None:
    """Raises `ValueError` naming an option `name` does not take, with its valid ones, or
    one whose value is not of its type (`fedjax_core.hyperparameters.check_types`)."""
    valid = options(name)
    needs = get(name).needs
    for key in given:
        if key not in valid:
            listed = ", ".join(k for k in valid if k not in needs) or "none"
            raise ValueError(f"algorithm {name!r} has no option {key!r}; its options are: "
                             f"{listed}")
    check_types(f"algorithm {name!r}", get(name).build, given, skip=tuple(needs))


def build(name: str, client_optimizer: optax.GradientTransformation,
          server_learning_rate: float, aggregator: Aggregator | None = None,
          **options) -> FederatedAlgorithm:
    """`get(name).build(client_optimizer, server_learning_rate, aggregator, **options)`.

    `options` are the algorithm's own hyperparameters (e.g. `b2=0.999, eps=1e-8` for
    FedAdam, `proximal_weight=0.01` for FedProx) and the facts it `needs` (e.g.
    `num_clients`); unknown names raise `ValueError`.

    Example:
      >>> alg = build("fedprox", optax.sgd(0.1), 1.0, proximal_weight=0.1)
    """
    check_options(name, options)
    missing = [k for k in get(name).needs if k not in options]
    if missing:
        raise ValueError(f"algorithm {name!r} needs {', '.join(missing)} (the facade "
                         "supplies them from the task and config)")
    return get(name).build(client_optimizer, server_learning_rate, aggregator=aggregator,
                           **options)
