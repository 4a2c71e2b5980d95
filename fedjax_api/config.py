"""`ExperimentConfig`: every option of a run, declared once, validated, the task's defaults
filled in (`resolve`). The declarations are the schema (`fedjax_api.options`) that the
command line, config files and docs are made from."""

from typing import Any

import attrs

from fedjax_api import tasks
from fedjax_api.errors import ConfigError, unknown
from fedjax_api.options import (
    OneOf,
    Schema,
    at_least,
    non_negative,
    one_of,
    option,
    positive,
    probability,
)
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.algorithms import registry

NOT_RESUMABLE: dict[str, Any] = {"resumable": False, "sweep": "no"}


@attrs.frozen(kw_only=True)
class ExperimentConfig:
    """A fully resolved run configuration (what `config.json` in the run dir holds).

    `algorithm_options` are the algorithm's own hyperparameters (the task's defaults for
    it, updated by the user's), e.g. `{"b2": 0.999}` for FedAdam; `aggregator` and
    `aggregator_options` name a registered aggregator and its options. Each field is one
    option of `fedjax run` (see its `help`, or docs/cli.md).
    """

    task: str = option(key="task", flag="TASK", resumable=False,
                       check=OneOf(tasks.names, kind="task"),
                       help="The task: a registered name (`fedjax tasks`).")
    rounds: int = option(task=True, key="rounds", check=at_least(1), help="Training rounds.")
    seed: int = option(0, key="seed", check=at_least(0), resumable=False, sweep="list",
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
    clients_per_round: int = option(task=True, key="client.per_round", check=at_least(1),
                                    help="Clients sampled per round.")
    batch_size: int = option(task=True, key="client.batch_size", check=at_least(1),
                             help="Client batch size.")
    epochs: int = option(task=True, key="client.epochs", check=at_least(1),
                         help="Local epochs per round.")
    max_steps: int | None = option(None, task=True, key="client.max_steps", check=at_least(1),
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
    eval_every: int = option(0, task=True, key="eval.every", check=at_least(0),
                             help="Evaluate the test set at round 0 and every N rounds (0: "
                                  "only at the end).")
    eval_train_clients: int = option(100, task=True, key="eval.train_clients",
                                     check=at_least(0), help="Training clients (a fixed "
                                                             "sample) evaluated at the end.")
    personalize_steps: int = option(
        0, key="eval.personalize_steps", check=at_least(0), sweep="no",
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
        None, key="privacy.noise_cohort_size", check=at_least(1), **NOT_RESUMABLE,
        help="DP: add the noise a cohort of this many clients would need (simulate fewer).")
    out: str | None = option(None, key="run.out", resumable=False, metavar="DIR",
                             help="Run directory (config.json, metrics.jsonl, checkpoints; a "
                                  "sweep's holds one per member). Default: "
                                  "runs/TASK/ALGORITHM-TIME.")
    data: str | None = option(None, key="run.data", metavar="PATH",
                              help="Where a task reads its files (e.g. the LEAF folder for "
                                   "femnist-leaf).")
    chunk_size: int = option(1, task=True, key="run.chunk_size", check=at_least(1),
                             help="Clients trained together under vmap (1: one by one).")
    device_data: bool = option(False, key="run.device_data", sweep="no",
                               help="Keep every training example on the device; each round "
                                    "sends an index (large cohorts of small examples).")
    devices: int = option(1, key="run.devices", check=at_least(0), sweep="no",
                          help="Devices (per process) each round's clients are split over; "
                               "0: all. On a CPU-only machine, starts that many CPU devices.")
    checkpoint_every: int = option(50, key="run.checkpoint_every", check=at_least(0),
                                   sweep="no", help="Write a checkpoint every N rounds and "
                                                    "after the last (0: only after the last).")
    keep_checkpoints: int = option(3, key="run.keep_checkpoints", check=at_least(1),
                                   sweep="no", help="Checkpoints kept (the newest).")
    tensorboard: bool = option(False, key="run.tensorboard",
                               help="Also write TensorBoard event files under out/tb/ (the "
                                    "tensorboard extra).")
    time_limit: float | None = option(
        None, key="run.time_limit", check=positive, sweep="no", metavar="SECONDS",
        help="Stop after the round during which this many seconds have passed, with a "
             "checkpoint (exit code 3); `fedjax resume` continues the run.")

    def __attrs_post_init__(self):
        _check_options(self)
        _check_privacy(self)

    @property
    def private(self) -> bool:
        """True when the run is differentially private (DP-FedAvg)."""
        return self.noise_multiplier is not None or self.dp_epsilon is not None

    def to_dict(self) -> dict[str, Any]:
        """Every option by field name (what config.json holds)."""
        return attrs.asdict(self)


OPTIONS = Schema(ExperimentConfig)
"""The run options, read from `ExperimentConfig`'s declarations."""


def _check_options(cfg: ExperimentConfig) -> None:
    needs = registry.get(cfg.algorithm).needs
    supplied = sorted(set(cfg.algorithm_options) & set(needs))
    if supplied:
        raise ConfigError(f"{', '.join(supplied)} of algorithm {cfg.algorithm!r} come from "
                          "the task and config; do not set them as options")
    try:
        registry.check_options(cfg.algorithm, cfg.algorithm_options)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    valid = aggregators.options(cfg.aggregator)
    for key in cfg.aggregator_options:
        if key not in valid:
            raise ConfigError(f"aggregator {cfg.aggregator!r} has no option {key!r}; its "
                              f"options are: {', '.join(valid) or 'none'}")


DP_ALGORITHMS = ("fedavg", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedprox", "ditto",
                 "apfl", "fedbuff")
"""Algorithms whose clients share nothing with the server but their aggregated deltas, so
that DP-FedAvg's clipped, noised sum covers all they send."""


def _check_privacy(cfg: ExperimentConfig) -> None:
    if cfg.aggregator in ("dp_gaussian", "dp_adaptive"):
        raise ConfigError(f"for DP-FedAvg use --clip with --noise-multiplier or --dp-epsilon "
                          f"(and --dp-delta, --adaptive-clip) instead of --aggregator "
                          f"{cfg.aggregator}, so that the run is accounted")
    dp_flags = [name for name, v in (("clip", cfg.clip), ("dp-delta", cfg.dp_delta),
                                     ("noise-cohort-size", cfg.noise_cohort_size))
                if v is not None] + (["adaptive-clip"] if cfg.adaptive_clip else [])
    if not cfg.private:
        if dp_flags:
            raise ConfigError(f"--{dp_flags[0]} only applies to a private run; add "
                              "--noise-multiplier or --dp-epsilon (with --dp-delta)")
        return
    if cfg.noise_multiplier is not None and cfg.dp_epsilon is not None:
        raise ConfigError("give either --noise-multiplier or --dp-epsilon (which calibrates "
                          "the noise multiplier), not both")
    if cfg.dp_delta is None:
        raise ConfigError("a private run needs --dp-delta (e.g. 1e-6, below 1 / the number "
                          "of clients)")
    if cfg.clip is None:
        raise ConfigError("a private run needs --clip, the L2 norm each client's update is "
                          "clipped to (the initial one with --adaptive-clip)")
    if cfg.algorithm not in DP_ALGORITHMS:
        raise ConfigError(f"algorithm {cfg.algorithm!r} sends the server more than its "
                          f"aggregated update, which DP-FedAvg does not cover; choose one of: "
                          f"{', '.join(DP_ALGORITHMS)}")
    if cfg.aggregator != "mean":
        raise ConfigError(f"--aggregator {cfg.aggregator} cannot be combined with DP: a private "
                          "run aggregates with DP-FedAvg's clipped, noised sum")
    if cfg.noise_cohort_size is not None and cfg.noise_cohort_size < cfg.clients_per_round:
        raise ConfigError(f"--noise-cohort-size ({cfg.noise_cohort_size}) must be at least the "
                          f"clients per round ({cfg.clients_per_round})")


def resolve(task: str, *, schema: Schema = OPTIONS, **options: Any) -> ExperimentConfig:
    """Fills every option left as None from the task's defaults and validates the result.

    The options marked `task=True` in the schema come from `tasks.TaskDefaults`; the
    server learning rate and the algorithm's options depend on the algorithm (e.g. 1.0
    for FedAvg, 1e-2 for FedAdam on Shakespeare), and `algorithm_options` given here
    update the task's for it.

    Args:
      task: a registered task.
      schema: the options (`OPTIONS`, or a schema of a config class of one's own).
      **options: field values; None means "not given".

    Example:
      >>> cfg = resolve("shakespeare-plays", rounds=50, algorithm="fedadam")
      >>> cfg.server_lr
      0.01
    """
    d = tasks.entry(task).defaults
    opts = {k: v for k, v in options.items() if v is not None}
    algorithm = opts.pop("algorithm", d.algorithm)
    if algorithm not in registry.ALGORITHMS:
        raise unknown("algorithm", algorithm, registry.ALGORITHMS)
    per_algorithm = {"server_lr": d.server_lr.get(algorithm, 1.0),
                     "algorithm_options": dict(d.algorithm_options.get(algorithm, {}))}
    values: dict[str, Any] = {o.field: per_algorithm.get(o.field, getattr(d, o.field, None))
                              for o in schema.options if o.from_task and o.field != "algorithm"}
    wrong = set(opts) - set(schema.by_field)
    if wrong:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(wrong))}")
    values["algorithm_options"] = {**values["algorithm_options"],
                                   **opts.pop("algorithm_options", {})}
    values.update(opts)
    return schema.config_class(task=task, algorithm=algorithm, **values)
