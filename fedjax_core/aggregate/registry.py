"""Aggregators by name, for the facade and the command line.

Each aggregator module ends with `ENTRIES`, a list of `AggregatorEntry` whose
`build(**options)` makes the aggregator; this module collects them.
"""

import importlib
import inspect

from fedjax_core.aggregate.base import Aggregator, AggregatorEntry
from fedjax_core.aggregate.mean import mean
from fedjax_core.hyperparameters import check_types

MODULES = ("robust", "attacks", "compression", "privacy", "secure")
"""Modules of `fedjax_core.aggregate` that define `ENTRIES`."""

_BUILTIN = [AggregatorEntry("mean", "example-weighted mean of client deltas", mean,
                            "McMahan et al. 2017, Communication-Efficient Learning")]


def _collect() -> dict[str, AggregatorEntry]:
    table: dict[str, AggregatorEntry] = {}
    entries = list(_BUILTIN)
    for name in MODULES:
        entries.extend(importlib.import_module(f"fedjax_core.aggregate.{name}").ENTRIES)
    for e in entries:
        if e.name in table:
            raise RuntimeError(f"aggregator {e.name!r} is registered twice")
        table[e.name] = e
    return table


AGGREGATORS: dict[str, AggregatorEntry] = _collect()


def get(name: str) -> AggregatorEntry:
    """The registered aggregator `name`; a `KeyError` lists the choices."""
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise KeyError(f"unknown aggregator {name!r}; choose one of: "
                       f"{', '.join(sorted(AGGREGATORS))}") from None


def options(name: str) -> dict[str, object]:
    """The aggregator's options and their defaults."""
    params = inspect.signature(get(name).build).parameters
    return {p.name: p.default for p in params.values()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def build(name: str, **kwargs) -> Aggregator:
    """`get(name).build(**options)`; an unknown option raises `ValueError` listing the valid ones.

    Example:
      >>> agg = build("trimmed_mean", beta=0.1)
    """
    valid = options(name)
    for key in kwargs:
        if key not in valid:
            raise ValueError(f"aggregator {name!r} has no option {key!r}; its options are: "
                             f"{', '.join(valid) or 'none'}")
    return get(name).build(**kwargs)


def min_clients(name: str, given: dict | None = None) -> int:
    """The fewest clients per round the aggregator `name` with options `given` can combine:
    `num_byzantine + 3` for Krum and Multi-Krum (m - f - 2 >= 1 neighbours), the inner
    aggregator's for a wrapper (`inner="krum"`), else 1.

    Example:
      >>> min_clients("krum", {"num_byzantine": 2})
      5
    """
    opts = {**{k: v for k, v in options(name).items() if v is not inspect.Parameter.empty},
            **(given or {})}
    if name in ("krum", "multi_krum"):
        return int(opts["num_byzantine"]) + 3
    inner = opts.get("inner")
    return min_clients(inner) if isinstance(inner, str) and inner in AGGREGATORS else 1


def check_options(name: str, given: dict, clients_per_round: int | None = None) -> None:
    """Raises `ValueError` (one line) unless `build(name, **given)` makes an aggregator that
    can combine `clients_per_round` clients: every option named and of its type
    (`fedjax_core.hyperparameters.check_types`), the factory's own checks passed, and a
    cohort at least `min_clients` large.

    Example:
      >>> check_options("krum", {"num_byzantine": 2}, clients_per_round=4)
      Traceback (most recent call last):
      ValueError: aggregator 'krum' with num_byzantine=2 needs at least 5 clients per round ...
    """
    valid = options(name)
    for key in given:
        if key not in valid:
            raise ValueError(f"aggregator {name!r} has no option {key!r}; its options are: "
                             f"{', '.join(valid) or 'none'}")
    check_types(f"aggregator {name!r}", get(name).build, given, flag="--aggregator-option")
    inner = given.get("inner")
    if isinstance(inner, str) and inner not in AGGREGATORS:
        raise ValueError(f"aggregator {name!r} option inner: unknown aggregator {inner!r}; "
                         f"choose one of: {', '.join(sorted(AGGREGATORS))}")
    try:
        get(name).build(**given)
    except (TypeError, ValueError) as e:
        raise ValueError(f"aggregator {name!r}: {e}") from None
    need = min_clients(name, given)
    if clients_per_round is not None and clients_per_round < need:
        opts = "".join(f" {k}={v}" for k, v in given.items())
        fix = (" or lower --aggregator-option num_byzantine" if "num_byzantine" in valid
               else "")
        raise ValueError(f"aggregator {name!r}{opts and ' with' + opts} needs at least {need} "
                         f"clients per round, got --clients-per-round {clients_per_round}; "
                         f"raise --clients-per-round to {need}{fix}")
