"""`ExperimentConfig`: the options of a run (each declared once, in
`fedjax_api.options.RunOptions`), checked together, and `resolve`, which fills in the task's
defaults."""

from typing import Any

import attrs

from fedjax_api import simtime, tasks
from fedjax_api.errors import ConfigError, unknown
from fedjax_api.options import RunOptions, Schema
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.algorithms import registry


@attrs.frozen(kw_only=True)
class ExperimentConfig(RunOptions):
    """A fully resolved run configuration (what `config.json` in the run dir holds): the
    run options (`fedjax_api.options.RunOptions`, where each is declared once), checked
    together.

    `algorithm_options` are the algorithm's own hyperparameters (the task's defaults for
    it, updated by the user's), e.g. `{"b2": 0.999}` for FedAdam; `aggregator` and
    `aggregator_options` name a registered aggregator and its options.
    """

    def __attrs_post_init__(self):
        _check_options(self)
        _check_privacy(self)
        simtime.check(self)

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
        aggregators.check_options(cfg.aggregator, cfg.aggregator_options,
                                  None if cfg.private else cfg.clients_per_round)
    except ValueError as e:
        raise ConfigError(str(e)) from None


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
