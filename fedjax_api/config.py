"""`ExperimentConfig`: every option of a run, validated, with the task's defaults filled in."""

from typing import Any

import attrs

from fedjax_api import tasks
from fedjax_api.errors import ConfigError, unknown
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.algorithms import registry


def _at_least(low):
    def check(instance, attribute, value):
        if value < low:
            raise ConfigError(f"{attribute.name.replace('_', '-')} must be at least {low}, "
                              f"got {value}")
    return check


def _non_negative_float(instance, attribute, value):
    if not value >= 0:  # also rejects NaN
        raise ConfigError(f"{attribute.name.replace('_', '-')} must be a non-negative number, "
                          f"got {value}")


def _known_algorithm(instance, attribute, value):
    if value not in registry.ALGORITHMS:
        raise unknown("algorithm", value, registry.ALGORITHMS)


def _one_of(*choices):
    def check(instance, attribute, value):
        if value not in choices:
            raise unknown(attribute.name.replace("_", "-"), value, choices)
    return check


def _optional_positive(instance, attribute, value):
    if value is not None and not value > 0:
        raise ConfigError(f"{attribute.name.replace('_', '-')} must be a positive number, "
                          f"got {value}")


def _optional_non_negative(instance, attribute, value):
    if value is not None:
        _non_negative_float(instance, attribute, value)


def _optional_probability(instance, attribute, value):
    if value is not None and not 0 < value < 1:
        raise ConfigError(f"{attribute.name.replace('_', '-')} must be between 0 and 1, "
                          f"got {value}")


def _known_aggregator(instance, attribute, value):
    if value not in aggregators.AGGREGATORS:
        raise unknown("aggregator", value, aggregators.AGGREGATORS)


def _known_task(instance, attribute, value):
    tasks.entry(value)


@attrs.frozen(kw_only=True)
class ExperimentConfig:
    """A fully resolved run configuration (what `config.json` in the run dir holds).

    `algorithm_options` are the algorithm's own hyperparameters (the task's defaults for
    it, updated by the user's), e.g. `{"b2": 0.999}` for FedAdam or
    `{"proximal_weight": 0.1}` for FedProx; `aggregator` and `aggregator_options` name a
    registered aggregator and its options; `personalize_steps` > 0 adds, at each
    evaluation, the per-client test accuracy after that many local fine-tuning steps.
    """

    def __attrs_post_init__(self):
        _check_options(self.algorithm, self.algorithm_options, self.aggregator,
                       self.aggregator_options)
        _check_privacy(self)

    @property
    def private(self) -> bool:
        """True when the run is differentially private (DP-FedAvg)."""
        return self.noise_multiplier is not None or self.dp_epsilon is not None

    task: str = attrs.field(validator=_known_task)
    algorithm: str = attrs.field(validator=_known_algorithm)
    rounds: int = attrs.field(validator=_at_least(1))
    clients_per_round: int = attrs.field(validator=_at_least(1))
    client_lr: float = attrs.field(validator=_non_negative_float)
    server_lr: float = attrs.field(validator=_non_negative_float)
    batch_size: int = attrs.field(validator=_at_least(1))
    epochs: int = attrs.field(validator=_at_least(1))
    seed: int = attrs.field(default=0, validator=_at_least(0))
    eval_every: int = attrs.field(default=0, validator=_at_least(0))
    eval_train_clients: int = attrs.field(default=100, validator=_at_least(0))
    chunk_size: int = attrs.field(default=1, validator=_at_least(1))
    devices: int = attrs.field(default=1, validator=_at_least(0))
    max_steps: int | None = attrs.field(default=None,
                                        validator=attrs.validators.optional(_at_least(1)))
    algorithm_options: dict[str, Any] = attrs.field(factory=dict)
    aggregator: str = attrs.field(default="mean", validator=_known_aggregator)
    aggregator_options: dict[str, Any] = attrs.field(factory=dict)
    personalize_steps: int = attrs.field(default=0, validator=_at_least(0))
    sampling: str = attrs.field(default="uniform", validator=_one_of("uniform", "poisson"))
    clip: float | None = attrs.field(default=None, validator=_optional_positive)
    noise_multiplier: float | None = attrs.field(default=None, validator=_optional_non_negative)
    dp_epsilon: float | None = attrs.field(default=None, validator=_optional_positive)
    dp_delta: float | None = attrs.field(default=None, validator=_optional_probability)
    dp_accountant: str = attrs.field(default="rdp", validator=_one_of("rdp", "pld"))
    adaptive_clip: bool = False
    noise_cohort_size: int | None = attrs.field(default=None,
                                                validator=attrs.validators.optional(_at_least(1)))
    checkpoint_every: int = attrs.field(default=50, validator=_at_least(0))
    keep_checkpoints: int = attrs.field(default=3, validator=_at_least(1))
    skip_nonfinite_clients: bool = False
    tensorboard: bool = False
    device_data: bool = False
    data: str | None = None
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _check_options(algorithm: str, algorithm_options: dict, aggregator: str,
                   aggregator_options: dict) -> None:
    needs = registry.get(algorithm).needs
    supplied = sorted(set(algorithm_options) & set(needs))
    if supplied:
        raise ConfigError(f"{', '.join(supplied)} of algorithm {algorithm!r} come from the "
                          "task and config; do not set them as options")
    try:
        registry.check_options(algorithm, algorithm_options)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    valid = aggregators.options(aggregator)
    for key in aggregator_options:
        if key not in valid:
            raise ConfigError(f"aggregator {aggregator!r} has no option {key!r}; its options "
                              f"are: {', '.join(valid) or 'none'}")


DP_ALGORITHMS = ("fedavg", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedprox", "ditto",
                 "apfl", "fedbuff")
"""Algorithms whose clients share nothing with the server but their aggregated deltas, so
that DP-FedAvg's clipped, noised sum covers all they send."""


def _check_privacy(cfg: "ExperimentConfig") -> None:
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


def resolve(task: str, **options: Any) -> ExperimentConfig:
    """Fills every option left as None from the task's defaults and validates the result.

    The server learning rate default depends on the algorithm (e.g. 1.0 for FedAvg,
    1e-2 for FedAdam on Shakespeare). `algorithm_options` given here update the task's
    defaults for the algorithm.

    Example:
      >>> cfg = resolve("shakespeare-plays", rounds=50, algorithm="fedadam")
      >>> cfg.server_lr
      0.01
    """
    d = tasks.entry(task).defaults
    opts = {k: v for k, v in options.items() if v is not None}
    algorithm = opts.pop("algorithm", d.algorithm)
    _known_algorithm(None, None, algorithm)
    values = dict(
        rounds=d.rounds, clients_per_round=d.clients_per_round, client_lr=d.client_lr,
        server_lr=d.server_lr.get(algorithm, 1.0), batch_size=d.batch_size, epochs=d.epochs,
        eval_every=d.eval_every, eval_train_clients=d.eval_train_clients,
        chunk_size=d.chunk_size, max_steps=d.max_steps,
        algorithm_options=dict(d.algorithm_options.get(algorithm, {})))
    unknown = set(opts) - set(attrs.fields_dict(ExperimentConfig))
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}")
    values["algorithm_options"].update(opts.pop("algorithm_options", {}))
    values.update(opts)
    return ExperimentConfig(task=task, algorithm=algorithm, **values)
