"""Aggregators by name, for the facade and the command line.

Each aggregator module ends with `ENTRIES`, a list of `AggregatorEntry` whose
`build(**options)` makes the aggregator; this module collects them.
"""

import importlib
import inspect

from fedjax_core.aggregate.base import Aggregator, AggregatorEntry
from fedjax_core.aggregate.mean import mean

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
