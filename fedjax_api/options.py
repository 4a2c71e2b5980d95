"""Every run option, declared once.

A run option is a field of `fedjax_api.config.ExperimentConfig` declared with `option(...)`:
its type (the annotation), its default (or the task's), its valid range (`check`), its help
text, its config-file key, whether `fedjax sweep` takes it (and as a list) and whether
`fedjax resume --allow-changes` may change it. `Schema` reads these declarations, and the
rest is made from them: `ExperimentConfig`'s validation (one-line `ConfigError`s), the
config-file keys (`fedjax_api.configfile`), config.json (`ExperimentConfig.to_dict`), the
options of `fedjax run`, `fedjax sweep` and `fedjax resume` (`cli.options`), and the option
tables of docs/cli.md and docs/config.md. A new option is one declaration plus its use:

    time_limit: float | None = option(
        None, key="run.time_limit", check=positive, sweep="no",
        help="Stop after the round during which this many seconds have passed.")

Example:
  >>> from fedjax_api.config import OPTIONS
  >>> OPTIONS.by_field["client_lr"].key, OPTIONS.by_field["client_lr"].type
  ('client.lr', 'number')
"""

import builtins
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

import attrs

from fedjax_api.errors import ConfigError, unknown

METADATA = "fedjax_option"
"""The key of an option's declaration in its attrs field's metadata."""

TYPE_WORDS = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "table"}
"""Python type -> config-file type."""


@attrs.frozen
class Check:
    """A valid range: `check(name, value)` raises `ConfigError("NAME PROBLEM, got VALUE")`
    unless `ok(value)`; `text` is the range as the docs show it (e.g. `>= 1`)."""

    ok: Callable[[Any], bool]
    problem: str
    text: str

    def __call__(self, name: str, value: Any) -> None:
        if not self.ok(value):
            raise ConfigError(f"{name} {self.problem}, got {value}")


def at_least(low: int) -> Check:
    """An integer of at least `low`."""
    return Check(lambda v: v >= low, f"must be at least {low}", f">= {low}")


non_negative = Check(lambda v: v >= 0, "must be a non-negative number", ">= 0")  # NaN fails
positive = Check(lambda v: v > 0, "must be a positive number", "> 0")
probability = Check(lambda v: 0 < v < 1, "must be between 0 and 1", "in (0, 1)")


@attrs.frozen
class OneOf:
    """A name among `choices()` (fixed, or a registry's); otherwise `unknown KIND 'x'; did
    you mean ...? choose one of: ...`, KIND being `kind` or the option's name."""

    choices: Callable[[], Iterable[str]]
    kind: str | None = None
    text: str = "name"

    def __call__(self, name: str, value: Any) -> None:
        names = list(self.choices())
        if value not in names:
            raise unknown(self.kind or name, value, names)


def one_of(*names: str) -> OneOf:
    """One of the fixed `names`."""
    return OneOf(lambda: names, text=" or ".join(f"`{n}`" for n in names))


REQUIRED: Any = attrs.NOTHING
"""The default of an option that every config must give (or take from the task)."""


def option(default: Any = REQUIRED, *, key: str, help: str,
           check: Check | OneOf | None = None, task: bool = False, resumable: bool = True,
           sweep: Literal["no", "one", "list"] = "one", flag: str | None = None,
           metavar: str | None = None, sweep_flag: str | None = None) -> Any:
    """Declares one run option as an attrs field of a config class (`ExperimentConfig`).

    Args:
      default: its value when nothing sets it; `REQUIRED`: none (the task's, or given).
      key: its dotted config-file key, e.g. "client.lr".
      help: one or two sentences, for `--help`, docs/cli.md and docs/config.md.
      check: its valid range (`at_least(1)`, `positive`, `one_of("a", "b")`, ...); None
        values of an optional option are not checked.
      task: `config.resolve` fills it from the task's defaults (`tasks.TaskDefaults`).
      resumable: `fedjax resume --allow-changes NAME` may change it (and `fedjax resume`
        takes it as an option).
      sweep: "no": `fedjax sweep` does not take it; "one": one value, shared by the
        members; "list": comma-separated values, one member each.
      flag: the command-line flag, if not `--name-with-dashes`; "TASK": the argument.
      metavar: the value's name in `--help`.
      sweep_flag: `fedjax sweep`'s flag for the list, if not `flag` (e.g. `--seeds`).

    Returns:
      The `attrs.field`, validated by `check` and by type.
    """
    meta = {"default": default, "key": key, "help": help, "check": check, "from_task": task,
            "resumable": resumable, "sweep": sweep, "flag": flag, "metavar": metavar,
            "sweep_flag": sweep_flag}
    extra: dict[str, Any] = {}
    if isinstance(default, dict):
        extra["factory"] = lambda: dict(default)
    elif default is not REQUIRED:
        extra["default"] = default
    return attrs.field(validator=_validate, metadata={METADATA: meta}, **extra)


def _base(annotation: Any) -> tuple[type, bool]:
    """`int | None` -> `(int, True)`; `dict[str, Any]` -> `(dict, False)`."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional, (annotation,) = len(args) < len(typing.get_args(annotation)), args
    return typing.get_origin(annotation) or annotation, optional


def _validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    name = attribute.name.replace("_", "-")
    base, optional = _base(attribute.type)
    if value is None:
        if not optional:
            raise ConfigError(f"{name} needs a value, got None")
        return
    ok = isinstance(value, base) and (base is bool or not isinstance(value, bool))
    if base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"{name} expects {'an' if base is int else 'a'} "
                          f"{TYPE_WORDS[base]}, got {value!r}")
    check = attribute.metadata[METADATA]["check"]
    if check is not None:
        check(name, value)


@attrs.frozen(kw_only=True)
class Option:
    """One run option, as `Schema` reads it from its declaration (see `option`).

    Attributes:
      field: the config field, e.g. "client_lr".
      key: the config-file key, e.g. "client.lr".
      type: the config-file type: "string", "integer", "number", "boolean" or "table".
      base: the Python type (`int`, `float`, `str`, `bool` or `dict`).
      optional: None is a valid value (unset).
      default: the default value, or `REQUIRED`.
      from_task: the task's defaults fill it.
      help, check, resumable, sweep, metavar: as given to `option`.
      flag: the command-line flag (`--client-lr`), or "TASK" for the argument.
      sweep_flag: `fedjax sweep`'s flag.
    """

    field: str
    key: str
    type: str
    base: builtins.type
    optional: bool
    default: Any
    from_task: bool
    help: str
    check: Check | OneOf | None
    resumable: bool
    sweep: str
    flag: str
    metavar: str | None
    sweep_flag: str

    @property
    def param(self) -> str:
        """The command's parameter name: the flag in snake_case (`option`, `task`)."""
        return self.flag.lstrip("-").replace("-", "_").lower()

    def default_text(self) -> str | None:
        """The default in words: "the task's", the value, or None when it is unset/off."""
        if self.from_task:
            return "the task's"
        if self.default is REQUIRED or self.default is None or self.default is False \
                or self.default == {}:
            return None
        return str(self.default)


class Schema:
    """The run options declared (with `option`) in the attrs class `config_class`.

    Attributes:
      config_class: the config class, e.g. `ExperimentConfig`.
      options: every option, in declaration order.
      by_field, by_key: option by field name, by dotted config-file key.

    Example:
      >>> @attrs.frozen(kw_only=True)
      ... class FooConfig(ExperimentConfig):
      ...     foo: int = option(3, key="run.foo", check=at_least(0), help="Foo.")
      >>> Schema(FooConfig).by_field["foo"].flag
      '--foo'
    """

    def __init__(self, config_class: type):
        self.config_class = config_class
        self.options: tuple[Option, ...] = tuple(
            _read(a) for a in attrs.fields(config_class) if METADATA in a.metadata)
        self.by_field = {o.field: o for o in self.options}
        self.by_key = {o.key: o for o in self.options}

    def for_command(self, command: str) -> list[Option]:
        """The options `fedjax COMMAND` takes ("run", "sweep" or "resume")."""
        if command == "sweep":
            return [o for o in self.options if o.sweep != "no"]
        if command == "resume":
            return [o for o in self.options if o.resumable]
        return list(self.options)


def _read(a: attrs.Attribute) -> Option:
    meta = dict(a.metadata[METADATA])
    base, optional = _base(a.type)
    flag = meta.pop("flag") or f"--{a.name.replace('_', '-')}"
    sweep_flag = meta.pop("sweep_flag") or flag
    return Option(field=a.name, type=TYPE_WORDS[base], base=base, optional=optional,
                  flag=flag, sweep_flag=sweep_flag, **meta)
