"""The options of `fedjax run`, `fedjax sweep` and `fedjax resume`: made from the run-option
schema (`fedjax_api.options.RunOptions`, the options of `ExperimentConfig`), plus the
few that only the command line has (`--config`, `--set`, several processes).

`command(fn, parameters)` gives `fn(**given)` the Typer signature of `parameters(schema,
"run")` (or "sweep", "resume"); `values(schema, command, given)` turns what Typer parsed
back into config options (None: not given); `markdown(schema)` is docs/cli.md's table.
"""

import functools
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from fedjax_api import tasks
from fedjax_api.errors import ConfigError
from fedjax_api.options import Option, Schema

Command = Callable[..., Any]

ConfigFile = Annotated[Path | None, typer.Option(
    "--config", help="TOML experiment config (docs/config.md); options given on the command "
                     "line override it.")]
Sets = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE",
    help="Override a config key, repeatable, e.g. --set client.lr=0.1.")]

# Several processes (fedjax_api.distributed.initialize).
Coordinator = Annotated[str | None, typer.Option(
    metavar="HOST:PORT",
    help="Several processes: process 0's address and a free port, the same for every "
         "process; `auto` lets JAX detect a TPU pod, Slurm or Open MPI cluster. "
         "Default: $FEDJAX_COORDINATOR.")]
NumProcesses = Annotated[int | None, typer.Option(
    help="Several processes: how many. Default: $FEDJAX_NUM_PROCESSES.")]
ProcessId = Annotated[int | None, typer.Option(
    help="Several processes: this one, 0 .. P-1; process 0 writes the run directory. "
         "Default: $FEDJAX_PROCESS_ID.")]

DEFAULT_TASK = "shakespeare-plays"
"""The task of a `fedjax run` that names none (nor does its config file)."""

COMMAND_LINE_ONLY = [
    ("`--config`", "path", "TOML experiment config ([config.md](config.md))."),
    ("`--set KEY=VALUE`", "repeatable",
     "Override a config key, e.g. `--set algorithm.options.b2=0.999`."),
    ("`--coordinator`", "HOST:PORT or auto",
     "Join a multi-process run (`FEDJAX_COORDINATOR`; [scaling](scaling.md))."),
    ("`--num-processes`", "int", "Processes in the multi-process run (`FEDJAX_NUM_PROCESSES`)."),
    ("`--process-id`", "int", "This process, 0 .. num-processes - 1 (`FEDJAX_PROCESS_ID`)."),
]
"""The options of `fedjax run` that are not run options (docs/cli.md lists them too)."""


def launch_parameters() -> list[inspect.Parameter]:
    """`--coordinator`, `--num-processes`, `--process-id`."""
    return [param("coordinator", Coordinator), param("num_processes", NumProcesses),
            param("process_id", ProcessId)]


def file_parameters() -> list[inspect.Parameter]:
    """`--config FILE`, `--set KEY=VALUE`."""
    return [param("config_file", ConfigFile), param("set_", Sets)]


def param(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    """A keyword parameter `name: annotation = default` of a command."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=annotation)


def _listed(o: Option, command: str) -> bool:
    return command == "sweep" and o.sweep == "list"


def name(o: Option, command: str) -> str:
    """The parameter of `o` in `command` (e.g. `client_lr`, `option`, `seeds` in sweep)."""
    flag = o.sweep_flag if _listed(o, command) else o.flag
    return flag.lstrip("-").replace("-", "_").lower()


def help_text(o: Option, command: str) -> str:
    """`o.help`, with what `command` adds: the sweep's lists, resume's `--allow-changes`, the
    default."""
    text = o.help
    if _listed(o, command):
        example = "momentum=0.0,0.9" if o.type == "table" else "0,1,2" if o.base is int \
            else "0.01,0.03,0.1"
        text += f" Several comma-separated values are swept, e.g. {example}."
    valid = getattr(o.check, "text", "")
    if valid and (valid[0].isdigit() or valid[0] in "<>"):
        text += f" Valid: {valid}."
    if command == "resume":
        return f"{text} A change needs --allow-changes {o.field}."
    default = o.default_text()
    return f"{text} Default: {default}." if default and "Default:" not in text else text


def parameter(o: Option, command: str) -> inspect.Parameter:
    """The Typer parameter of `o` in `command` ("run", "sweep" or "resume")."""
    text = help_text(o, command)
    if o.flag == "TASK":
        text = (f"Task to run: {', '.join(tasks.names())} (see `fedjax tasks`)."
                + (f" Default: {DEFAULT_TASK}." if command == "run" else ""))
        return param("task", Annotated[str | None, typer.Argument(help=text)])
    flag = o.sweep_flag if _listed(o, command) else o.flag
    if o.type == "table":
        metavar = "NAME=V1,V2" if _listed(o, command) else o.metavar
        return param(name(o, command), Annotated[list[str] | None, typer.Option(
            flag, metavar=metavar, help=text)])
    if o.type == "array":  # repeatable: --track mlflow --track wandb
        return param(name(o, command), Annotated[list[str] | None, typer.Option(
            flag, metavar=o.metavar, help=text)])
    if o.type == "boolean":
        text += " A flag: it takes no value."
        return param(name(o, command), Annotated[bool, typer.Option(  # no <bool>: it takes no value
            flag, metavar="", help=text)], False)
    kind = str if _listed(o, command) else o.base
    return param(name(o, command), Annotated[kind | None, typer.Option(  # type: ignore
        flag, metavar=o.metavar, help=text)])


def parameters(schema: Schema, command: str) -> list[inspect.Parameter]:
    """The Typer parameters of every option of `schema` that `command` takes."""
    return [parameter(o, command) for o in schema.for_command(command)]


def command(fn: Command, params: list[inspect.Parameter]) -> Command:
    """`fn(**given)` with the signature `params` (which Typer reads)."""
    @functools.wraps(fn)
    def wrapper(**given: Any) -> Any:
        return fn(**given)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return wrapper


def values(schema: Schema, command: str, given: dict[str, Any]) -> dict[str, Any]:
    """What Typer parsed for `command` as config options: field -> value, None when not
    given (a flag left off, too). A table option's `NAME=VALUE`s become a dict (a sweep's
    `NAME=V1,V2` its first values, see `sweep_lists`); a sweep's lists their first value."""
    out: dict[str, Any] = {}
    for o in schema.for_command(command):
        value = given.get(name(o, command))
        if o.type == "table" and command == "sweep":
            fixed, swept = split_values(o.flag, value)
            value = {**fixed, **{k: v[0] for k, v in swept.items()}} or None
        elif o.type == "table":
            value = name_values(o.flag, value)
        elif o.type == "array":
            value = list(value) if value else None
        elif _listed(o, command) and value is not None:
            value = (numbers(o.sweep_flag, value, o.base) or [None])[0]
        out[o.field] = value if value is not False else None
    return out


def sweep_lists(schema: Schema, given: dict[str, Any]) -> dict[str, Any]:
    """The lists of a `fedjax sweep`: field -> its values (None: not given), and for a
    table option the options given several values (refused where it takes one value)."""
    out: dict[str, Any] = {}
    for o in schema.for_command("sweep"):
        value = given.get(name(o, "sweep"))
        if o.type == "table":
            _, swept = split_values(o.flag, value)
            if swept and o.sweep != "list":
                raise ConfigError(f"{o.flag} {next(iter(swept))} takes one value; a sweep "
                                  "varies learning rates, seeds and algorithm options")
            out[o.field] = swept
        elif _listed(o, "sweep"):
            out[o.field] = numbers(o.sweep_flag, value, o.base)
    return out


def name_values(flag: str, items: list[str] | None) -> dict[str, Any] | None:
    """`["a=1", "b=adam"]` -> `{"a": 1, "b": "adam"}` (JSON numbers and booleans parsed)."""
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} expects NAME=VALUE, got {item!r}")
        out[key.strip()] = _json_or_text(raw)
    return out


def split_values(flag: str, items: list[str] | None) -> tuple[dict, dict]:
    """`["b2=0.99,0.999", "eps=0.001"]` -> `({"eps": 0.001}, {"b2": [0.99, 0.999]})`:
    the options with one value (fixed) and those with several (swept)."""
    fixed, swept = {}, {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise ConfigError(f"{flag} expects NAME=VALUE or NAME=V1,V2,..., got {item!r}")
        parts = [_json_or_text(part) for part in raw.split(",")]
        parts = [p.strip() if isinstance(p, str) else p for p in parts]
        if len(parts) == 1:
            fixed[key.strip()] = parts[0]
        else:
            swept[key.strip()] = parts
    return fixed, swept


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def numbers(flag: str, text: str | None, kind: type = float) -> list | None:
    """`"0.01,0.1"` -> `[0.01, 0.1]`; None when not given; a `ConfigError` names the flag."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        try:
            out.append(kind(part.strip()))
        except ValueError:
            what, e = ("integers", "0,1,2") if kind is int else ("numbers", "0.01,0.1")
            raise ConfigError(f"{flag} expects comma-separated {what}, e.g. {e}; got "
                              f"{text!r}") from None
    return out


def check_task_word(task: str | None, schema: Schema) -> None:
    """Refuses a TASK of `true`/`false` (left by `--tensorboard true`: a flag takes no value)
    with a line naming the flags, rather than "unknown task 'true'"."""
    if task is not None and task.lower() in ("true", "false", "yes", "no", "on", "off"):
        flags = ", ".join(o.flag for o in schema.options if o.type == "boolean")
        raise ConfigError(f"{task!r} is not a task: the flags ({flags}) take no value; give "
                          f"the flag alone to turn it on, leave it off for false")


def markdown(schema: Schema) -> str:
    """The option table of docs/cli.md: every run option, then the command line's own."""
    rows = ["| option | type | default | config key | `sweep` | `resume` | meaning |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for o in schema.options:
        kind = "flag" if o.type == "boolean" else "repeatable `NAME=VALUE`" \
            if o.type == "table" else "repeatable" if o.type == "array" \
            else {str: "str", int: "int", float: "float"}[o.base]
        text = getattr(o.check, "text", None)
        if text is not None:
            kind = text if text.startswith(("`", "name")) else f"{kind} {text}"
        default = DEFAULT_TASK if o.flag == "TASK" else o.default_text() or "-"
        sweep = {"no": "-", "one": "yes", "list": f"list (`{o.sweep_flag}`)"}[o.sweep]
        rows.append(f"| `{o.flag}` | {kind} | {default} | `{o.key}` | {sweep} | "
                    f"{'yes' if o.resumable else '-'} | {o.help} |")
    rows += [f"| {flag} | {kind} | - | - | - | - | {text} |"
             for flag, kind, text in COMMAND_LINE_ONLY]
    return "\n".join(rows) + "\n"
