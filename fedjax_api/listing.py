"""Listings of what a run can be made of, for people: the registered tasks, algorithms and
aggregators with their options (`fedjax tasks`, `fedjax algorithms`), and the generated
tables of docs/config.md (the config keys, the registries), which its tests keep current.

Example:
  >>> [(name, defaults) for name, _, defaults in tasks()][:1]
  [('cifar100', 'fedyogi, 4000 rounds x 10 clients, batch 20, 1 epoch, client lr 0.01')]
"""

import inspect
from collections.abc import Iterable
from typing import Any, NamedTuple

from fedjax_api import tasks as task_registry
from fedjax_api.config import OPTIONS
from fedjax_api.options import REQUIRED, Schema
from fedjax_api.toml_text import literal
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.algorithms import registry as algorithms


class Entry(NamedTuple):
    """A registered algorithm or aggregator: `options` maps each option a user sets to its
    default (`inspect.Parameter.empty` when required); `filled` names those the run fills
    in itself (an algorithm's `needs`)."""

    name: str
    description: str
    options: dict[str, Any]
    paper: str
    filled: tuple[str, ...] = ()


def tasks(names: Iterable[str] | None = None) -> list[tuple[str, str, str]]:
    """`(name, description, defaults)` of every task (or of `names`), the defaults as
    `fedavg, 1200 rounds x 10 clients, batch 4, 1 epoch, client lr 1`."""
    out = []
    for name in (task_registry.names() if names is None else names):
        e = task_registry.entry(name)
        d = e.defaults
        out.append((name, e.description,
                    f"{d.algorithm}, {d.rounds} rounds x {d.clients_per_round} clients, "
                    f"batch {d.batch_size}, {d.epochs} epoch{'s' if d.epochs > 1 else ''}, "
                    f"client lr {d.client_lr:g}"
                    + (f", max {d.max_steps} steps" if d.max_steps else "")))
    return out


def algorithm_entries() -> list[Entry]:
    """Every registered algorithm, by name."""
    out = []
    for name in sorted(algorithms.ALGORITHMS):
        e = algorithms.ALGORITHMS[name]
        out.append(Entry(name, e.description, {k: v for k, v in algorithms.options(name).items()
                                               if k not in e.needs}, e.paper, tuple(e.needs)))
    return out


def aggregator_entries() -> list[Entry]:
    """Every registered aggregator, by name."""
    return [Entry(name, e.description, aggregators.options(name), e.paper)
            for name, e in sorted(aggregators.AGGREGATORS.items())]


def options_text(options: dict[str, Any], markdown: bool = False) -> str:
    """`proximal_weight=0.01, mu` (markdown: `` `proximal_weight = 0.01`, `mu` ``), or
    "none"."""
    if not markdown:
        return ", ".join(k if v is inspect.Parameter.empty else f"{k}={v}"
                         for k, v in options.items()) or "none"
    return ", ".join(f"`{k}`" if v is inspect.Parameter.empty else f"`{k}` (unset)"
                     if v is None else f"`{k} = {literal(v)}`"
                     for k, v in options.items()) or "none"


def registries_markdown(task_names: Iterable[str] | None = None) -> str:
    """The registered tasks, algorithms (with options and defaults) and aggregators (with
    options), for docs/config.md."""
    lines = ["### Tasks (`task`)", ""]
    lines += [f"- `{name}`: {description}. Defaults: {defaults}."
              for name, description, defaults in tasks(task_names)]
    for title, entries in (("Algorithms (`algorithm.name`, `[algorithm.options]`)",
                            algorithm_entries()),
                           ("Aggregators (`aggregator.name`, `[aggregator.options]`)",
                            aggregator_entries())):
        lines += ["", f"### {title}", ""]
        for e in entries:
            filled = f"; filled in by the run: {', '.join(e.filled)}" if e.filled else ""
            lines.append(f"- `{e.name}`: {e.description}. Options: "
                         f"{options_text(e.options, markdown=True)}{filled}.")
    return "\n".join(lines) + "\n"


def default_of(field: str, schema: Schema = OPTIONS) -> str:
    """The default of `field` as docs/config.md shows it."""
    o = schema.by_field[field]
    if o.from_task or o.default is REQUIRED:
        return "the task's" if o.from_task else "-"
    if o.default is None or o.default == {}:
        return "unset" if o.default is None else "none"
    return f"`{literal(o.default)}`"


def flag_of(field: str, schema: Schema = OPTIONS) -> str:
    """The `fedjax run` option that sets `field`."""
    o = schema.by_field[field]
    return f"`{o.flag}{' ' + str(o.metavar) if o.type == 'table' else ''}`"


def schema_markdown(schema: Schema = OPTIONS) -> str:
    """The table of every config key, for docs/config.md."""
    rows = ["| key | type | default | `fedjax run` option | `ExperimentConfig` field | meaning |",
            "| --- | --- | --- | --- | --- | --- |"]
    for k in schema.options:
        rows.append(f"| `{k.key}` | {k.type} | {default_of(k.field, schema)} | "
                    f"{flag_of(k.field, schema)} | `{k.field}` | {k.help} |")
    return "\n".join(rows) + "\n"
