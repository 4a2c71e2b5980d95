"""Experiment config files (TOML) and dotted `--set` overrides.

A config file groups the flat `ExperimentConfig` fields into sections (`[client]`,
`[server]`, `[algorithm]`, ...) by each option's declared key (`fedjax_api.options`;
`SCHEMA` maps each dotted key to its option), and docs/config.md is checked against it. Precedence, lowest first: the
task's defaults < the file < `--set KEY=VALUE` < options given on the command line.

Example:
  >>> cfg = resolve_file("exp.toml", ["client.lr=0.1", "algorithm.options.b2=0.999"],
  ...                    {"rounds": 5})
  >>> print(dump(cfg))          # the resolved config, re-runnable with --config
"""

import difflib
import os
import tomllib
from collections.abc import Iterable
from typing import Any

from fedjax_api import config, tasks
from fedjax_api.config import OPTIONS, ConfigError, ExperimentConfig
from fedjax_api.options import Option, Schema
from fedjax_api.toml_text import (
    TYPE_WORDS,
    check_plain,
    describe,
    literal,
    parse,
    printable,
    show_key,
)
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.algorithms import registry as algorithms

SCHEMA: dict[str, Option] = OPTIONS.by_key
"""Every key of a config file (`ExperimentConfig`'s options), in the order `dump` writes
them: dotted key -> `fedjax_api.options.Option` (`.field`, `.type`, `.help`)."""

SHORTHANDS = {"algorithm": "algorithm.name", "aggregator": "aggregator.name"}
"""`algorithm = "fedadam"` is short for `[algorithm] name = "fedadam"` (no options then)."""

_OPTION_PATHS = {("algorithm", "options"), ("aggregator", "options")}


# ---------------------------------------------------------------------------------- load


def load(path: str | os.PathLike, schema: Schema = OPTIONS) -> dict[str, Any]:
    """The options a config file sets, flat, as `config.resolve` takes them.

    Keys the file leaves out are absent (the task's defaults fill them later). The
    result may hold "task".

    Raises:
      ConfigError: the file is missing or unreadable, is not TOML (the message gives the
        line and column), has a key `SCHEMA` does not know (with the closest valid one),
        or a value of the wrong type.
    """
    name = os.fspath(path)
    name = name if name.isprintable() else printable(name)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {name} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {name} is a directory, not a TOML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {name}: {e.strerror or e}") from None
    return _flatten(parse(raw, name), f"{name}: ", schema)


def _flatten(doc: dict, where: str, schema: Schema) -> dict[str, Any]:
    """A parsed TOML document (nested tables) -> flat `ExperimentConfig` options."""
    out: dict[str, Any] = {}
    for path, value in _leaves(doc, (), schema):
        k = _key_of(where, path, value, schema)
        out[k.field] = _check_type(where, show_key(path), k.type, value)
    return out


def _key_of(where: str, path: tuple, value: Any, schema: Schema) -> Option:
    """The option at `path` (a shorthand taking a name string); a ConfigError otherwise."""
    if path in schema.by_path:
        return schema.by_path[path]
    if len(path) == 1 and path[0] in SHORTHANDS and isinstance(value, str):
        return schema.by_key[SHORTHANDS[path[0]]]
    if len(path) == 1 and path[0] in schema.sections:
        also = " or a name string" if path[0] in SHORTHANDS else ""
        raise ConfigError(f"{where}{path[0]} expects a table [{path[0]}]{also}, got "
                          f"{describe(value)}")
    raise _unknown_key(where, path, schema)


def _leaves(table: dict, prefix: tuple, schema: Schema) -> Iterable[tuple[tuple, Any]]:
    """(path, value) of every value, descending into tables but for the schema's keys (an
    option table is one value); an empty section sets nothing."""
    for name, value in table.items():
        path = prefix + (name,)
        if not isinstance(value, dict) or path in schema.by_path:
            yield path, value
        elif value:
            yield from _leaves(value, path, schema)
        elif not (len(path) == 1 and name in schema.sections):
            yield path, value


def _unknown_key(where: str, path: tuple, schema: Schema) -> ConfigError:
    """`unknown key 'client.lrr'; did you mean 'client.lr'? (keys of [client]: ...)`."""
    shown = show_key(path)
    last, keys, sections = path[-1], list(schema.by_key), schema.sections
    guesses = ([schema.by_field[last].key] if last in schema.by_field else []) \
        or [k for k in keys if k.split(".")[-1] == last] \
        or difflib.get_close_matches(shown, keys, n=1, cutoff=0.6)
    hint = ("; did you mean " + " or ".join(repr(g) for g in guesses) + "?") if guesses else ""
    if len(path) > 1 and path[0] in sections:
        valid = f"keys of [{path[0]}]: " + ", ".join(
            k.split(".", 1)[1] for k in keys if k.startswith(path[0] + "."))
    else:
        valid = "top-level keys: " + ", ".join(
            [k for k in keys if "." not in k] + [f"[{s}]" for s in sections])
    return ConfigError(f"{where}unknown key {printable(shown)}{hint} ({valid}; see "
                       "docs/config.md)")


def _check_type(where: str, key: str, kind: str, value: Any) -> Any:
    ok = {"string": isinstance(value, str),
          "integer": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "boolean": isinstance(value, bool),
          "table": isinstance(value, dict),
          "array": _strings(value)}[kind]
    if not ok:
        raise ConfigError(f"{where}{key} expects {TYPE_WORDS[kind]}, got {describe(value)}")
    if kind == "number":
        return float(value)
    if kind == "table":
        assert isinstance(value, dict)  # `ok` checked it
        for name, v in value.items():
            check_plain(where, f"{key}.{show_key((name,))}", v)
        return dict(value)
    if kind == "array":
        assert isinstance(value, list)  # `ok` checked it
        return tuple(value)
    return value


def _strings(value: Any) -> bool:
    """An array of strings (the type of `run.track`)."""
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# ------------------------------------------------------------------------------ overrides


def apply_overrides(options: dict[str, Any], sets: Iterable[str],
                    schema: Schema = OPTIONS) -> dict[str, Any]:
    """`options` (flat, as `load` returns them) updated by each `KEY=VALUE` of `sets`.

    KEY is a dotted key of `SCHEMA` (`client.lr`, `aggregator.name`, or the shorthand
    `algorithm`), or `algorithm.options.NAME` / `aggregator.options.NAME` for one option.
    VALUE is a TOML value (`0.1`, `true`, `"text"`, `[1, 2]`, `{b2 = 0.999}`); for a
    string key, or when it is not TOML, it is the text as written (`--set
    aggregator.name=krum`). A whole option table (`--set algorithm.options={b2=0.9}`)
    replaces the file's; a single option is merged into it. Later sets win.

    Example:
      >>> apply_overrides({"client_lr": 1.0}, ["client.lr=0.1", "algorithm.options.b2=0.999"])
      {'client_lr': 0.1, 'algorithm_options': {'b2': 0.999}}
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in options.items()}
    by_path = schema.by_path
    for item in sets:
        where = f"--set {printable(item)}: "
        raw_key, sep, raw = item.partition("=")
        if not sep or not raw_key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. client.lr=0.1), got "
                              f"{printable(item)}")
        path = _parse_key(raw_key, where)
        if len(path) >= 3 and path[:2] in _OPTION_PATHS:
            value = _parse_value(raw, "option")
            check_plain(where, show_key(path), value)
            for name in reversed(path[3:]):  # algorithm.options.a.b=1 sets a = {b = 1}
                value = {name: value}
            out.setdefault(by_path[path[:2]].field, {})[path[2]] = value
            continue
        kind = (by_path[path].type if path in by_path
                else "string" if len(path) == 1 and path[0] in SHORTHANDS else "option")
        value = _parse_value(raw, kind)
        for name in reversed(path):  # client.lr=0.1 reads as the file {client = {lr = 0.1}}
            value = {name: value}
        out.update(_flatten(value, where, schema))
    return out


def _parse_key(raw_key: str, where: str) -> tuple[str, ...]:
    """`client.lr` or `algorithm.options."odd name"` -> its parts, by TOML's key grammar."""
    bad = ConfigError(f"{where}{printable(raw_key.strip())} is not a dotted key like client.lr")
    if "\n" in raw_key or "\r" in raw_key:
        raise bad
    try:
        doc = tomllib.loads(f"{raw_key} = 0")
    except (ValueError, RecursionError):
        raise bad from None
    path: list[str] = []
    while isinstance(doc, dict) and len(doc) == 1:
        (name, doc), = doc.items()
        path.append(name)
    if not path or doc != 0 or isinstance(doc, bool):
        raise bad
    return tuple(path)


def _parse_value(raw: str, kind: str) -> Any:
    """A TOML value, else the text as written (stripped); a string key always takes text
    unless the text is a quoted TOML string."""
    try:
        doc = tomllib.loads(f"v = {raw}")
    except (ValueError, RecursionError):
        return raw.strip()
    if set(doc) != {"v"}:
        return raw.strip()
    value = doc["v"]
    if kind == "string" and not isinstance(value, str):
        return raw.strip()
    return value


# ------------------------------------------------------------------------------- resolve


def resolve_file(path: str | os.PathLike | None, sets: Iterable[str] = (),
                 cli_options: dict[str, Any] | None = None, *,
                 default_task: str | None = None, schema: Schema = OPTIONS) -> ExperimentConfig:
    """The run's `ExperimentConfig`: task defaults < file < `sets` < `cli_options`.

    Args:
      path: a TOML config file, or None.
      sets: `KEY=VALUE` overrides (`--set`), applied in order.
      cli_options: options given explicitly on the command line, flat, as
        `config.resolve` takes them, plus "task"; None values mean "not given". Their
        `algorithm_options` / `aggregator_options` are merged into the file's.
      default_task: the task when neither the command line nor the file names one.
      schema: the options (those of `ExperimentConfig`, or of a config class of one's own).

    Raises:
      ConfigError: anything `load`, `apply_overrides` or `config.resolve` refuses, or an
        option the chosen algorithm or aggregator does not take (with the closest one).
    """
    opts = load(path, schema) if path is not None else {}
    opts = apply_overrides(opts, sets, schema)
    from_file = {name: set(opts.get(name, ())) for name in ("algorithm_options",
                                                             "aggregator_options")}
    for name, value in (cli_options or {}).items():
        if value is None:
            continue
        if name in from_file:
            opts[name] = {**opts.get(name, {}), **value}
        else:
            opts[name] = value
    task = opts.pop("task", None) or default_task
    if task is None:
        raise ConfigError("no task: give one (fedjax run TASK) or set task = \"NAME\" in "
                          "the config file")
    algorithm = opts.get("algorithm") or tasks.entry(task).defaults.algorithm
    _check_option_names("algorithm", algorithm, from_file["algorithm_options"])
    _check_option_names("aggregator", opts.get("aggregator", "mean"),
                        from_file["aggregator_options"])
    return config.resolve(task, schema=schema, **opts)


def _check_option_names(kind: str, name: str, given: Iterable[str]) -> None:
    """Names the closest valid option when the file or --set gives one that the algorithm
    (or aggregator) does not take; `ExperimentConfig` checks the rest."""
    if kind == "algorithm":
        if name not in algorithms.ALGORITHMS:
            return  # config.resolve names the unknown algorithm
        valid = [k for k in algorithms.options(name) if k not in algorithms.get(name).needs]
    else:
        if name not in aggregators.AGGREGATORS:
            return
        valid = list(aggregators.options(name))
    for option in given:
        if option not in valid:
            close = difflib.get_close_matches(option, valid, n=1, cutoff=0.5)
            hint = f" did you mean '{kind}.options.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key "
                              f"{printable(kind + '.options.' + show_key((option,)))}: "
                              f"{kind} {name!r} has no option {printable(option)};{hint} "
                              f"its options are: {', '.join(valid) or 'none'}")


# ---------------------------------------------------------------------------------- dump


def dump(cfg: ExperimentConfig | dict[str, Any], schema: Schema = OPTIONS) -> str:
    """`cfg` (or its `to_dict()`) as a config file in the schema's layout; `load` of it
    resolves back to `cfg`.

    Unset (None) values are left out; so are option values of None, which TOML cannot
    write (a comment names them), and values the schema has no key for.
    """
    values = cfg if isinstance(cfg, dict) else cfg.to_dict()
    root, sections = [], {}
    for k in schema.options:
        value = values.get(k.field)
        if value is None or (k.type in ("table", "array") and not value):
            continue
        section, _, name = k.key.rpartition(".")
        if k.type == "table":  # TOML has no None: name it in a comment
            sections[k.key] = [f"# {show_key((n,))}: None, which TOML cannot write (left out)"
                               if v is None else f"{show_key((n,))} = {literal(v)}"
                               for n, v in value.items()]
        elif section:
            sections.setdefault(section, []).append(f"{name} = {literal(value)}")
        else:
            root.append(f"{name} = {literal(value)}")
    out = ["# fedjax-sim experiment config (docs/config.md); run it with",
           "# `fedjax run --config THIS_FILE`", *root]
    for section, lines in sections.items():
        out += ["", f"[{section}]", *lines]
    return "\n".join(out) + "\n"

