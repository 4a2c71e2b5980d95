"""Every run option, declared once (`RunOptions`).

A run option is a field of `RunOptions` (the options of `fedjax_api.config.ExperimentConfig`)
declared with `option(...)`: its type (the annotation), its default (or the task's), its
valid range (`check`), its help text, its config-file key, whether `fedjax sweep` takes it
(and as a list) and whether `fedjax resume --allow-changes` may change it. `Schema` reads these declarations, and the
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
import math
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

import attrs

from fedjax_api import tasks
from fedjax_api.errors import ConfigError, unknown
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.algorithms import registry
from fedjax_core.models.precision import PRECISIONS

METADATA = "fedjax_option"
"""The key of an option's declaration in its attrs field's metadata."""

TYPE_WORDS = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "table",
              tuple: "array"}
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


def _power(n: float) -> str:
    """`10000000` -> `10^7`, `4294967295` -> `2^32 - 1`; other numbers as they are."""
    for base in (10, 2):
        k = round(math.log(n + 1, base)) if n > 0 else 0
        if k >= 4 and base ** k == n:
            return f"{base}^{k}"
        if k > 4 and base ** k - 1 == n:
            return f"{base}^{k} - 1"
    return f"{n:g}" if isinstance(n, float) else str(n)


@attrs.frozen
class Range:
    """A valid numeric range: at least `low` (more than it when `open_low`), at most `high`
    (when given), and finite when `finite`; `check(name, value)` raises `ConfigError("NAME
    PROBLEM, got VALUE")` naming the bound broken. `problem` is what a value below `low`
    (or NaN) is told; `why` says why `high` (e.g. "to fit in 32 bits")."""

    low: float
    high: float | None = None
    open_low: bool = False
    finite: bool = False
    problem: str = ""
    why: str = "to fit in memory; lower it"

    @property
    def text(self) -> str:
        """The range as the docs show it, e.g. `>= 1`, `1 .. 10^7`, `> 0, finite`."""
        if self.high is not None:
            return f"{_power(self.low)} .. {_power(self.high)}"
        return f"{'>' if self.open_low else '>='} {_power(self.low)}" + (
            ", finite" if self.finite else "")

    def __call__(self, name: str, value: Any) -> None:
        if not (value > self.low if self.open_low else value >= self.low):  # NaN too
            raise ConfigError(f"{name} {self.problem or f'must be at least {self.low}'}, "
                              f"got {value}")
        if self.finite and not math.isfinite(value):
            raise ConfigError(f"{name} must be finite, got {value}")
        if self.high is not None and value > self.high:
            power = f" ({_power(self.high)})" if _power(self.high) != str(self.high) else ""
            raise ConfigError(f"{name} must be at most {self.high}{power} {self.why}, got "
                              f"{value}")


def at_least(low: int, high: int | None = None, why: str = "to fit in memory; lower it") -> Range:
    """An integer of at least `low` (and at most `high`, when given)."""
    return Range(low, high, why=why)


non_negative = Range(0.0, finite=True, problem="must be a non-negative number")
positive = Range(0.0, open_low=True, finite=True, problem="must be a positive number")
probability = Check(lambda v: 0 < v < 1, "must be between 0 and 1", "in (0, 1)")

MAX_COUNT = 10**7
"""The most rounds, clients or steps an option may ask for (the run would not fit in memory
or time long before)."""

SEED_RANGE = at_least(0, 2**32 - 1, why="(seeds fit in 32 bits)")


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
           check: Check | Range | OneOf | None = None, task: bool = False, resumable: bool = True,
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
    if isinstance(default, tuple):  # an array of strings: a list given becomes a tuple
        extra["converter"] = lambda v: tuple(v) if isinstance(v, list) else v
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
    if base is tuple:
        ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if not ok:
        raise ConfigError(f"{name} expects {'an' if base in (int, tuple) else 'a'} "
                          f"{TYPE_WORDS[base]}{' of strings' if base is tuple else ''}, "
                          f"got {value!r}")
    check = attribute.metadata[METADATA]["check"]
    if check is not None:
        check(name, value)


@attrs.frozen(kw_only=True)
class Option:
    """One run option, as `Schema` reads it from its declaration (see `option`).

    Attributes:
      field: the config field, e.g. "client_lr".
      key: the config-file key, e.g. "client.lr".
      type: the config-file type: "string", "integer", "number", "boolean", "table" or
        "array" (of strings).
      base: the Python type (`int`, `float`, `str`, `bool`, `dict` or `tuple`).
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
    check: Check | Range | OneOf | None
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
                or self.default == {} or self.default == ():
            return None
        return str(self.default)


class Schema:
    """The run options declared (with `option`) in the attrs class `config_class`.

    Attributes:
      config_class: the config class, e.g. `ExperimentConfig`.
      options: every option, in declaration order.
      by_field, by_key, by_path: option by field name, by dotted config-file key, by the
        key's parts (`("client", "lr")`).
      sections: the config-file sections (`client`, `server`, ...), in order.

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
        self.by_path = {tuple(o.key.split(".")): o for o in self.options}
        self.sections = list(dict.fromkeys(k.split(".")[0] for k in self.by_key if "." in k))

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


NOT_RESUMABLE: dict[str, Any] = {"resumable": False, "sweep": "no"}


@attrs.frozen(kw_only=True)
class RunOptions:
    """Every run option, declared once: the fields of `fedjax_api.config.ExperimentConfig`
    (which checks them together). The command line, config files, config.json and the docs
    are made from these declarations (`Schema`)."""

    task: str = option(key="task", flag="TASK", resumable=False,
                       check=OneOf(tasks.names, kind="task"),
                       help="The task: a registered name (`fedjax tasks`).")
    rounds: int = option(task=True, key="rounds", check=at_least(1, MAX_COUNT), help="Training rounds.")
    seed: int = option(0, key="seed", check=SEED_RANGE, resumable=False, sweep="list",
                       sweep_flag="--seeds",
                       help="Seed of sampling, shuffling, initialization and client keys.")
    algorithm: str = option(task=True, key="algorithm.name", resumable=False,
                            check=OneOf(lambda: registry.ALGORITHMS, kind="algorithm"),
                            help="Federated algorithm (`fedjax algorithms`).")
    algorithm_options: dict[str, Any] = option(
        {}, task=True, key="algorithm.options", flag="--option", metavar="NAME=VALUE",
        resumable=False, sweep="list",
        help="An algorithm option, repeatable, e.g. --option proximal_weight=0.1 (see "
             "`fedjax algorithms`); merged over the task's defaults for the algorithm.")
    client_lr: float = option(task=True, key="client.lr", check=non_negative, sweep="list",
                              help="Client SGD learning rate.")
    clients_per_round: int = option(task=True, key="client.per_round",
                                    check=at_least(1, MAX_COUNT),
                                    help="Clients sampled per round.")
    batch_size: int = option(task=True, key="client.batch_size",
                             check=at_least(1, 10**6),
                             help="Client batch size.")
    epochs: int = option(task=True, key="client.epochs", check=at_least(1, 10**4),
                         help="Local epochs per round.")
    max_steps: int | None = option(None, task=True, key="client.max_steps",
                                   check=at_least(1, MAX_COUNT),
                                   help="Cap on each client's local steps per round.")
    sampling: str = option("uniform", key="client.sampling", check=one_of("uniform", "poisson"),
                           resumable=False,
                           help="Client sampling: uniform (a fixed-size cohort, without "
                                "replacement) or poisson (each client with probability "
                                "clients-per-round / clients).")
    server_lr: float = option(task=True, key="server.lr", check=non_negative, sweep="list",
                              help="Server learning rate; the task's default depends on the "
                                   "algorithm.")
    skip_nonfinite_clients: bool = option(
        False, key="server.skip_nonfinite_clients",
        help="Drop clients whose update is NaN or infinite (counted in "
             "train/nonfinite_clients) instead of stopping the run.")
    aggregator: str = option("mean", key="aggregator.name", resumable=False,
                             check=OneOf(lambda: aggregators.AGGREGATORS, kind="aggregator"),
                             help="How the server combines client updates (`fedjax "
                                  "algorithms`).")
    aggregator_options: dict[str, Any] = option(
        {}, key="aggregator.options", flag="--aggregator-option", metavar="NAME=VALUE",
        resumable=False, help="An aggregator option, repeatable, e.g. --aggregator-option "
                              "beta=0.1.")
    eval_every: int = option(0, task=True, key="eval.every", check=at_least(0, MAX_COUNT),
                             help="Evaluate the test set at round 0 and every N rounds (0: "
                                  "only at the end).")
    eval_train_clients: int = option(100, task=True, key="eval.train_clients",
                                     check=at_least(0, MAX_COUNT), help="Training clients (a fixed "
                                                             "sample) evaluated at the end.")
    eval_test_clients: int | None = option(
        None, task=True, key="eval.test_clients", check=at_least(0, MAX_COUNT),
        help="Evaluate a fixed sample of N test clients (drawn once from the seed, the same "
             "at every evaluation) instead of the whole test set; 0: the whole test set; N "
             "at least the test clients: all of them. Default: the task's (docs/tasks.md).")
    final_eval: str = option(
        "full", key="eval.final", check=one_of("full", "sampled"),
        help="The evaluation after the last round, with --eval-test-clients: full (the "
             "whole test set) or sampled (the same sample as the periodic ones).")
    personalize_steps: int = option(
        0, key="eval.personalize_steps", check=at_least(0, 10**6), sweep="no",
        help="At each evaluation, also fine-tune on each test client's own training data "
             "for this many steps and report the per-client accuracy.")
    clip: float | None = option(None, key="privacy.clip", check=positive, **NOT_RESUMABLE,
                                help="DP: L2 norm each client's update is clipped to (the "
                                     "initial one with --adaptive-clip).")
    noise_multiplier: float | None = option(
        None, key="privacy.noise_multiplier", check=non_negative, **NOT_RESUMABLE,
        help="DP: Gaussian noise std on the clipped sum, in units of --clip.")
    dp_epsilon: float | None = option(
        None, key="privacy.epsilon", check=positive, **NOT_RESUMABLE,
        help="DP: target epsilon after all rounds; calibrates --noise-multiplier (give one "
             "of the two).")
    dp_delta: float | None = option(None, key="privacy.delta", check=probability,
                                    **NOT_RESUMABLE, help="DP: target delta.")
    dp_accountant: str = option("rdp", key="privacy.accountant", check=one_of("rdp", "pld"),
                                **NOT_RESUMABLE, help="DP accountant: rdp or pld.")
    adaptive_clip: bool = option(False, key="privacy.adaptive_clip", **NOT_RESUMABLE,
                                 help="DP: adapt the clip norm to the median update norm "
                                      "(private quantile estimation).")
    noise_cohort_size: int | None = option(
        None, key="privacy.noise_cohort_size", check=at_least(1, 10**9), **NOT_RESUMABLE,
        help="DP: add the noise a cohort of this many clients would need (simulate fewer).")
    out: str | None = option(None, key="run.out", resumable=False, metavar="DIR",
                             help="Run directory (config.json, metrics.jsonl, checkpoints; a "
                                  "sweep's holds one per member). Default: "
                                  "runs/TASK/ALGORITHM-TIME.")
    data: str | None = option(None, key="run.data", metavar="PATH",
                              help="Where a task reads its files (e.g. the LEAF folder for "
                                   "femnist-leaf).")
    chunk_size: int | None = option(
        None, task=True, key="run.chunk_size", check=at_least(1, 10**6),
        help="Clients trained together under vmap (1: one by one). Unset: chosen for the "
             "backend (1 on CPU; on GPU/TPU the largest that fits half the device memory).")
    deterministic: str = option(
        "auto", key="run.deterministic", check=one_of("auto", "on", "off"), sweep="no",
        help="Deterministic GPU kernels (XLA's --xla_gpu_deterministic_ops), so the same "
             "seed gives the same bits; auto: on when the backend is a GPU.")
    device_data: bool = option(False, key="run.device_data", sweep="no",
                               help="Keep every training example on the device; each round "
                                    "sends an index (large cohorts of small examples).")
    devices: int = option(1, key="run.devices", check=at_least(0, 2**16), sweep="no",
                          help="Devices (per process) each round's clients are split over; "
                               "0: all. On a CPU-only machine, starts that many CPU devices.")
    client_store: str = option(
        "auto", key="run.client_store", check=one_of("auto", "device", "host", "disk"),
        sweep="no", resumable=False,
        help="Where per-client state (SCAFFOLD's controls, Ditto's models, ...) lives: device, "
             "host memory, or a file in out/client_store/; auto: the device "
             "when the population's rows fit a quarter of its free memory, else host, else "
             "disk (docs/scaling.md).")
    client_store_dtype: str = option(
        "f32", key="run.client_store_dtype", check=one_of("f32", "bf16"), sweep="no",
        resumable=False,
        help="Keep per-client float rows as f32, or bf16 (half the memory; host or disk "
             "store only; error in docs/scaling.md).")
    precision: str = option(
        "f32", key="run.precision", check=one_of(*PRECISIONS), sweep="one", resumable=False,
        help="The model's forward and backward pass in f32, or in bf16 (bfloat16) with f32 "
             "params, optimizer states, updates and aggregation (docs/performance.md).")
    checkpoint_every: int = option(50, key="run.checkpoint_every",
                                   check=at_least(0, MAX_COUNT),
                                   sweep="no", help="Write a checkpoint every N rounds and "
                                                    "after the last (0: only after the last).")
    keep_checkpoints: int = option(3, key="run.keep_checkpoints",
                                   check=at_least(1, 10**4),
                                   sweep="no", help="Checkpoints kept (the newest).")
    track: tuple[str, ...] = option(
        (), key="run.track", sweep="no", metavar="TRACKER",
        check=Check(lambda v: all(s.partition(":")[0] in ("mlflow", "wandb") for s in v),
                    "must name mlflow[:URI] or wandb[:PROJECT]",
                    "`mlflow[:URI]` or `wandb[:PROJECT]`"),
        help="Also log the config, every metric, the final table and the plots to MLflow "
             "(default URI ./mlruns, a local store) or Weights & Biases (offline unless "
             "WANDB_MODE says otherwise), repeatable; a resumed run continues the same "
             "tracked run (the mlflow and wandb extras; docs/tracking.md).")
    tensorboard: bool = option(False, key="run.tensorboard",
                               help="Also write TensorBoard event files under out/tb/ (the "
                                    "tensorboard extra).")
    time_limit: float | None = option(
        None, key="run.time_limit", check=positive, sweep="no", metavar="SECONDS",
        help="Stop after the round during which this many seconds have passed, with a "
             "checkpoint (exit code 3); `fedjax resume` continues the run.")
    # Simulated time (fedjax_api.simtime, docs/simulated_time.md): off unless a profile is given.
    devices_profile: str | None = option(
        None, key="time.devices_profile", metavar="NAME|FILE", **NOT_RESUMABLE,
        help="Simulate wall-clock time with these devices: homogeneous, heterogeneous "
             "(log-normal compute and bandwidth) or a CSV trace; adds time/simulated_s to "
             "every train record. Off by default.")
    availability: str = option(
        "always", key="time.availability", metavar="NAME|FILE", **NOT_RESUMABLE,
        help="Who is online (with --devices-profile): always, diurnal (time-zone phase, "
             "Markov on/off spells) or a CSV of online intervals.")
    selection: str = option("all", key="time.selection",
                            check=one_of("all", "overcommit", "deadline"), **NOT_RESUMABLE,
                            help="Round rule (with --devices-profile): wait for all, "
                                 "over-commit (keep the first K of ceil(overcommit K)) or "
                                 "deadline.")
    deadline: float | None = option(None, key="time.deadline", check=positive,
                                    metavar="SECONDS", **NOT_RESUMABLE,
                                    help="Round deadline in simulated seconds (--selection "
                                         "deadline).")
    overcommit: float = option(1.3, key="time.overcommit", check=Range(1.0, 100.0),
                               **NOT_RESUMABLE,
                               help="Over-commit factor (--selection overcommit).")
    partial_work: bool = option(False, key="time.partial_work", **NOT_RESUMABLE,
                                help="With --selection deadline: clients that would miss it "
                                     "run the local steps that fit instead of being dropped.")
    concurrency: int | None = option(None, key="time.concurrency", check=at_least(1, MAX_COUNT),
                                     **NOT_RESUMABLE,
                                     help="Asynchronous runs (fedbuff) on the simulated clock: "
                                          "clients training at once (default: 2 x "
                                          "clients-per-round).")
