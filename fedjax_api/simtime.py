"""Simulated time in a run: the clock (`SimulatedClock`) that picks each round's clients on
the simulated devices, and the callback (`SimulatedTime`) that stamps the train records.

With `--devices-profile` (docs/simulated_time.md) each round's cohort comes from the clock
(`fedjax_core.simtime`): only clients online at the round's start are drawn, the selection
rule keeps some and sets the round's simulated duration, and a deadline with partial work
cuts clients' local steps (their mask), for every algorithm. FedBuff runs on the
asynchronous event timeline instead: each cohort is a server step's buffer, carrying its
updates' staleness (FedAsync: `--option rule=fedasync --clients-per-round 1`, one arrival
per server step). Every train record gets `time/simulated_s` (the clock after the round),
`time/round_simulated_s`, `time/clients_available` and `time/clients_dropped`. Without
`--devices-profile` nothing changes and no `time/` field appears.

The clock depends only on the seed, the profiles and the data sizes, never on training: a
resumed run replays it from round 0 (host numpy, milliseconds per round) and checks it
against the history's `time/simulated_s`, so resume keeps the clock exact.

Example:
  >>> cfg = config.resolve("shakespeare-plays", devices_profile="heterogeneous",
  ...                      selection="overcommit")
  >>> Experiment.from_config(cfg).run().history[-2]["time/simulated_s"]
"""

import threading
from pathlib import Path
from typing import Any

import attrs
import jax
import numpy as np

from fedjax_api.dataset import FederatedDataset, all_padding
from fedjax_api.errors import ConfigError
from fedjax_api.loop import Callback, Loop
from fedjax_core import simtime
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.data import Cohort
from fedjax_core.data.pack import step_bucket
from fedjax_core.data.sampling import SAMPLE_STREAM, host_rng
from fedjax_core.simtime import timeline as core_timeline

PROFILES = ("homogeneous", "heterogeneous")
AVAILABILITY = ("always", "diurnal")
ASYNC_ALGORITHMS = ("fedbuff",)
"""Algorithms that run on the asynchronous event timeline (unless told to draw staleness)."""

METRICS = ("time/simulated_s", "time/round_simulated_s", "time/clients_available",
           "time/clients_dropped")


def is_async(cfg: Any) -> bool:
    """Whether a simulated run of `cfg` trains on the asynchronous event timeline."""
    return (cfg.algorithm in ASYNC_ALGORITHMS
            and cfg.algorithm_options.get("staleness_source", "timeline") == "timeline")


def check(cfg: Any) -> None:
    """Refuses option combinations the clock cannot honour (one-line `ConfigError`s),
    including those that would break a private run's accounting (docs/privacy.md)."""
    if cfg.devices_profile is None:
        given = [name for name, on in (
            ("availability", cfg.availability != "always"), ("selection", cfg.selection != "all"),
            ("deadline", cfg.deadline is not None), ("overcommit", cfg.overcommit != 1.3),
            ("partial-work", cfg.partial_work), ("concurrency", cfg.concurrency is not None))
            if on]
        if given:
            raise ConfigError(f"--{given[0]} applies to simulated time; add --devices-profile "
                              "homogeneous|heterogeneous|FILE")
        return
    if (cfg.selection == "deadline") != (cfg.deadline is not None):
        raise ConfigError("--selection deadline and --deadline SECONDS go together")
    if cfg.partial_work and cfg.selection != "deadline":
        raise ConfigError("--partial-work needs --selection deadline --deadline SECONDS")
    if is_async(cfg) and cfg.selection != "all":
        raise ConfigError(f"{cfg.algorithm} runs asynchronously on the simulated clock; "
                          f"--selection {cfg.selection} is for synchronous rounds (or pass "
                          "--option staleness_source=drawn)")
    if cfg.concurrency is not None and not is_async(cfg):
        raise ConfigError("--concurrency applies to asynchronous runs (fedbuff) only")
    if cfg.sampling == "poisson" and (cfg.selection == "overcommit" or is_async(cfg)):
        what = "over-commit" if cfg.selection == "overcommit" else "asynchronous training"
        raise ConfigError(f"--sampling poisson cannot be combined with {what}: clients are no "
                          "longer drawn independently; use --sampling uniform")
    private = cfg.noise_multiplier is not None or cfg.dp_epsilon is not None
    if private:
        if is_async(cfg) or cfg.selection == "overcommit":
            raise ConfigError("a private run cannot use over-commit or asynchronous training "
                              "on the simulated clock: who takes part then depends on other "
                              "clients, which the accountant does not cover (docs/privacy.md)")
        if cfg.sampling != "poisson" and cfg.availability != "always":
            raise ConfigError("a private run with --availability needs --sampling poisson: a "
                              "fixed-size cohort drawn from the clients online has a larger "
                              "sampling rate than the accountant's (docs/privacy.md)")


def profiles(name: str, train: FederatedDataset, seed: int) -> simtime.DeviceProfiles:
    """The devices of `train`'s clients: a built-in profile or a CSV trace."""
    n = train.num_clients
    return _builtin_or_csv("--devices-profile", name, {
        "homogeneous": lambda: simtime.homogeneous(n),
        "heterogeneous": lambda: simtime.heterogeneous(n, seed)}, simtime.load_csv, train)


def availability(name: str, train: FederatedDataset, seed: int) -> simtime.Availability:
    """Who is online: always, the diurnal Markov model, or a CSV of intervals."""
    n = train.num_clients
    return _builtin_or_csv("--availability", name, {
        "always": lambda: simtime.AlwaysAvailable(n),
        "diurnal": lambda: simtime.DiurnalMarkov(n, seed)}, simtime.load_intervals_csv, train)


def _builtin_or_csv(flag: str, name: str, builtins: dict, load, train: FederatedDataset):
    """`builtins[name]()`, or `load(name, client ids)` of a CSV file; one-line errors."""
    if name in builtins:
        return builtins[name]()
    if not Path(name).is_file():
        raise ConfigError(f"{flag} {name!r} is neither {' nor '.join(builtins)} nor a CSV file")
    try:
        return load(name, train.data.client_ids)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class PoissonTimeline(simtime.SyncTimeline):
    """`SyncTimeline` with Poisson sampling: each client online at the round's start takes
    part with probability `rate` (the draw of `sampling.poisson` for the clients online;
    everyone online gives exactly its cohorts)."""

    def __init__(self, *args, rate: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.rate = rate

    def _round(self, r: int, begin: float) -> simtime.RoundPlan:
        t, avail = core_timeline.wait_for_clients(self.availability, begin)
        rng = host_rng(self.seed, r, SAMPLE_STREAM)
        chosen = np.flatnonzero(avail & (rng.random(len(avail)) < self.rate))
        return self.keep(r, begin, t, chosen, int(avail.sum()))


@attrs.frozen(kw_only=True)
class SimulatedClock:
    """A run's simulated clock: `sample(r)` is round r's cohort, `plan(r)` its `RoundPlan`.

    Attributes:
      timeline: the `SyncTimeline` (or `AsyncTimeline`) of the run.
      train: the training data (packs the cohorts).
      clients_per_round: K (the cohort's size; Poisson cohorts pad to their bucket).
      poisson: whether clients are Poisson-sampled.
    """

    timeline: Any
    train: FederatedDataset
    clients_per_round: int
    poisson: bool = False
    _lock: threading.Lock = attrs.field(factory=threading.Lock, eq=False, repr=False)

    def plan(self, r: int) -> simtime.RoundPlan:
        """Round r's plan (computed in order, once; thread-safe)."""
        with self._lock:
            return self.timeline.plan(r)

    def sample(self, r: int) -> Cohort:
        """Round r's cohort: the plan's clients in slot order, padded to the cohort size,
        their steps cut to the plan's, with the staleness of an asynchronous step."""
        plan = self.plan(r)
        pad = (step_bucket(max(len(plan.selected), 1)) if self.poisson
               else self.clients_per_round)
        if len(plan.clients) == 0:
            cohort = all_padding(self.train.cohort([0], r, pad_to=pad))
        else:
            cohort = self.train.cohort(plan.clients, r, pad_to=pad)
        if plan.capped:
            mask = np.array(cohort.mask)
            cut = np.arange(mask.shape[1])[None, :] >= plan.steps[:, None]
            mask[:len(plan.steps)] &= ~cut[:, :, None]
            cohort = cohort._replace(mask=mask)
        if plan.staleness is not None:
            tau = np.zeros(cohort.num_clients, np.int32)
            tau[:len(plan.staleness)] = plan.staleness
            cohort = cohort._replace(staleness=tau)
        return cohort

    def metrics(self, r: int) -> dict[str, float]:
        """The `time/` fields of round r's train record."""
        plan = self.plan(r)
        return {"time/simulated_s": plan.end_s, "time/round_simulated_s": plan.seconds,
                "time/clients_available": float(plan.available),
                "time/clients_dropped": float(len(plan.selected) - len(plan.clients))}


def clock(cfg: Any, train: FederatedDataset, params: Any) -> SimulatedClock:
    """The simulated clock of a run of `cfg` (an `ExperimentConfig`) on `train`, for a model
    with parameters `params` (their size sets the download and, through the aggregator's
    bits per client, the upload)."""
    d = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
    agg = (aggregators.build(cfg.aggregator, **cfg.aggregator_options)
           if cfg.aggregator != "mean" else None)
    sizes = np.asarray(train.data.client_sizes, np.int64)
    model = simtime.TimeModel(
        profiles(cfg.devices_profile, train, cfg.seed),
        simtime.client_steps(sizes, train.batch_size, train.epochs, train.max_steps),
        train.batch_size, float(core_timeline.FLOAT_BITS * d), simtime.upload_bits(agg, d))
    avail = availability(cfg.availability, train, cfg.seed)
    k = cfg.clients_per_round
    try:
        if is_async(cfg):
            concurrency = cfg.concurrency or min(2 * k, train.num_clients)
            timeline: Any = simtime.AsyncTimeline(
                model, avail, sizes, k, concurrency,
                int(cfg.algorithm_options.get("max_staleness", 4)), seed=cfg.seed)
        elif cfg.sampling == "poisson":
            timeline = PoissonTimeline(model, avail, sizes, k, seed=cfg.seed, rule=cfg.selection,
                                       deadline_s=cfg.deadline, partial=cfg.partial_work,
                                       rate=k / train.num_clients)
        else:
            timeline = simtime.SyncTimeline(model, avail, sizes, k, seed=cfg.seed,
                                            rule=cfg.selection, overcommit=cfg.overcommit,
                                            deadline_s=cfg.deadline, partial=cfg.partial_work)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return SimulatedClock(timeline=timeline, train=train, clients_per_round=k,
                          poisson=cfg.sampling == "poisson")


def from_config(config: dict[str, Any], train: FederatedDataset,
                params: Any) -> SimulatedClock | None:
    """The clock of a run whose config (`ExperimentConfig.to_dict()`) has
    `devices_profile`, else None (a config without it, e.g. a hand-made `Experiment`)."""
    if config.get("devices_profile") is None:
        return None
    return clock(_Options(config), train, params)


class _Options:
    """A config dict's fields as attributes (what `clock` reads)."""

    def __init__(self, config: dict[str, Any]):
        self.__dict__.update(config)


class SimulatedTime(Callback):
    """Adds the clock's `time/` fields to every train record; on resume, checks that the
    replayed clock matches the history's last `time/simulated_s` exactly."""

    def __init__(self, clock: SimulatedClock):
        self.clock = clock

    def on_start(self, loop: Loop) -> None:
        if loop.round == 0:
            return
        recorded = [r["time/simulated_s"] for r in loop.history
                    if r.get("kind") == "train" and r.get("round") == loop.round
                    and "time/simulated_s" in r]
        replayed = self.clock.plan(loop.round - 1).end_s
        if recorded and recorded[-1] != replayed:
            raise ConfigError(f"the simulated clock replayed to {replayed} s at round "
                              f"{loop.round}, but the run recorded {recorded[-1]} s; resume "
                              "with the run's own devices and availability files")

    def on_metrics(self, loop: Loop, metrics: list[dict[str, float]]) -> None:
        for m in metrics:
            m.update(self.clock.metrics(loop.round - 1))

