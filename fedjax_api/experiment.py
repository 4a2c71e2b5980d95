"""`Experiment`: a run's settings, and the training loop (`fedjax_api.loop`) with the
callbacks they call for (`fedjax_api.callbacks`)."""

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import optax

from fedjax_api import distributed, privacy, rundir, simtime, tasks
from fedjax_api.callbacks import (
    Callback,
    Checkpoint,
    Evaluation,
    Evaluator,
    NonFiniteError,
    NonFiniteGuard,
    PrivacyLedger,
    RunLog,
    TensorBoard,
    TimeLimit,
)
from fedjax_api.config import ExperimentConfig
from fedjax_api.errors import ConfigError
from fedjax_api.loop import (
    Interrupted,
    Loop,
    OneServer,
    OnRecord,
    TimeLimitReached,
    cohort_sampler,
    final_metrics,
)
from fedjax_api.server import Server
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.aggregate.guard import skip_nonfinite
from fedjax_core.algorithms import registry
from fedjax_core.algorithms.base import FederatedAlgorithm
from fedjax_core.parallel import Plan

__all__ = ["Experiment", "Interrupted", "NonFiniteError", "RunResult", "TimeLimitReached",
           "build_algorithm"]


@attrs.frozen(kw_only=True)
class RunResult:
    """What `Experiment.run` returns.

    Attributes:
      server: the server after the last round.
      history: every record written to `metrics.jsonl`, in order.
      final: `{"test": metrics, "train": metrics}` evaluated after the last round.
      host: host work (sampling, reading, packing) of this run's rounds, done in a
        background thread: `{"host_s": seconds spent, "wait_s": seconds the round loop
        waited for it, "hidden_fraction": share of host_s that overlapped other work}`.
      stopped: why a callback ended the run early (`Loop.stop`), or None.
    """

    server: Server
    history: list[dict]
    final: dict[str, dict[str, float]]
    host: dict[str, float] = attrs.field(factory=dict)
    stopped: str | None = None


@attrs.frozen(kw_only=True)
class Experiment:
    """A federated training run of `rounds` rounds: the training loop (`fedjax_api.loop`)
    with the callbacks its settings call for (`callbacks()`).

    Each round samples `clients_per_round` clients (seeded by `(seed, round)`), packs them,
    and runs one jitted round. While the device runs round r, the host already samples and
    packs round r+1 (`prefetch_depth` rounds ahead at most).

    Attributes:
      task, algorithm: the loaded task and the federated algorithm.
      plan: how a cohort is executed; it gets the mesh `distributed.mesh(devices)`.
      out_dir: the run directory (config.json, metrics.jsonl, checkpoints); None writes
        nothing. With several processes only process 0 writes it.
      config: the resolved config saved in the run dir (`ExperimentConfig.to_dict()`).
      privacy: a private run's `fedjax_api.privacy.PrivacySetup`.
      personalize_lr: the fine-tuning learning rate (`from_config`: the client's).

    The other attributes (`rounds`, `clients_per_round`, `seed`, `eval_every`,
    `eval_train_clients`, `devices`, `personalize_steps`, `sampling`, `checkpoint_every`,
    `keep_checkpoints`, `skip_nonfinite_clients`, `tensorboard`, `time_limit`) are the run
    options of those names (`ExperimentConfig`, docs/cli.md).

    Example:
      >>> exp = Experiment.from_config(config.resolve("shakespeare-plays", rounds=20))
      >>> result = exp.run()
      >>> result.final["test"]["accuracy"]
    """

    task: tasks.Task
    algorithm: FederatedAlgorithm
    rounds: int
    clients_per_round: int
    seed: int = 0
    eval_every: int = 0
    eval_train_clients: int = 100
    plan: Plan = Plan()
    devices: int = 1
    out_dir: Path | None = None
    config: dict = attrs.field(factory=dict)
    personalize_steps: int = 0
    personalize_lr: float = 0.1
    sampling: str = "uniform"
    privacy: "privacy.PrivacySetup | None" = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    skip_nonfinite_clients: bool = False
    tensorboard: bool = False
    time_limit: float | None = None
    prefetch_depth: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    interrupt_event: threading.Event = attrs.field(factory=threading.Event, eq=False,
                                                   repr=False)

    def __attrs_post_init__(self):
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")
        n = self.task.train.num_clients
        if not 1 <= self.clients_per_round <= n:
            raise ConfigError(f"clients per round must be between 1 and the {n} training "
                              f"clients of task {self.task.name!r}, got {self.clients_per_round}")
        if self.plan.mesh is None:
            object.__setattr__(self, "plan",
                               self.plan._replace(mesh=distributed.mesh(self.devices)))

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, resuming: bool = False) -> "Experiment":
        """Loads the task, builds the algorithm (client SGD at `client_lr`) and checks `out`
        (which must not hold a run unless `resuming`; then call `run(resume=True)`)."""
        task = tasks.get(cfg.task, seed=cfg.seed, batch_size=cfg.batch_size, epochs=cfg.epochs,
                         max_steps=cfg.max_steps, data_path=cfg.data)
        if cfg.device_data:  # the examples stay on the device; rounds send an index
            task = attrs.evolve(task, train=attrs.evolve(task.train, device_resident=True))
        dp = privacy.setup(cfg, task.train.num_clients) if cfg.private else None
        saved = cfg.to_dict()
        if dp is not None:  # calibrated when --dp-epsilon
            saved["resolved"] = {"noise_multiplier": dp.noise_multiplier}
        exp = cls(task=task, algorithm=build_algorithm(cfg, task, dp and dp.aggregator),
                  rounds=cfg.rounds, clients_per_round=cfg.clients_per_round, seed=cfg.seed,
                  eval_every=cfg.eval_every, eval_train_clients=cfg.eval_train_clients,
                  plan=Plan(cfg.chunk_size), devices=cfg.devices, config=saved,
                  personalize_steps=cfg.personalize_steps, personalize_lr=cfg.client_lr,
                  sampling=cfg.sampling, privacy=dp, checkpoint_every=cfg.checkpoint_every,
                  keep_checkpoints=cfg.keep_checkpoints, time_limit=cfg.time_limit,
                  skip_nonfinite_clients=cfg.skip_nonfinite_clients, tensorboard=cfg.tensorboard)
        # Only a valid experiment creates its run directory; process 0 checks and writes it.
        if cfg.out and distributed.is_primary():
            if not resuming and (Path(cfg.out) / rundir.METRICS_FILE).exists():
                raise ConfigError(f"{cfg.out!r} already holds a run ({rundir.METRICS_FILE}); "
                                  "choose a new --out")
            rundir.check_writable_dir(Path(cfg.out))
        return attrs.evolve(exp, out_dir=Path(cfg.out)) if cfg.out else exp

    def interrupt(self) -> None:
        """Asks a running `run` to stop after the current round: it writes a checkpoint and
        raises `Interrupted` (what Ctrl-C does)."""
        self.interrupt_event.set()

    def evaluator(self) -> Evaluator:
        """How this run evaluates (`callbacks.Evaluator`)."""
        return Evaluator(task=self.task, seed=self.seed, plan=self.plan,
                         eval_train_clients=self.eval_train_clients,
                         personalize_steps=self.personalize_steps,
                         personalize_lr=self.personalize_lr)

    def callbacks(self, resume_round: int | None = None) -> list[Callback]:
        """The callbacks this run's settings call for, in order: the NaN guard, the privacy
        ledger, evaluation, then (process 0, with `out_dir`) the run directory, TensorBoard
        and checkpoints, and the time limit."""
        names = ("train/delta_norm",) + (() if self.skip_nonfinite_clients else ("train/loss",))
        out: list[Callback] = [NonFiniteGuard(names, out_dir=self.out_dir)]
        if self.privacy is not None:
            out.append(PrivacyLedger(self.privacy.ledger, self.eval_every))
        out.append(Evaluation([self.evaluator()], self.eval_every))
        if self.out_dir is not None and distributed.is_primary():
            out.append(RunLog(self.out_dir, self.config, resume_round=resume_round))
            if self.tensorboard:
                out.append(TensorBoard(self.out_dir, resume_round=resume_round))
            out.append(Checkpoint(self.out_dir, every=self.checkpoint_every,
                                  keep=self.keep_checkpoints, config=self.config,
                                  seed=self.seed))
        if self.time_limit is not None:
            out.append(TimeLimit(self.time_limit))
        return out

    def run(self, on_record: Callable[[dict], object] | None = None, resume: bool = False,
            callbacks: Sequence[Callback] = ()) -> RunResult:
        """Runs every round; calls `on_record(record)` with each record (a round's "train"
        record, an "eval" record: docs/cli.md) and the hooks of `callbacks` (your own: log
        to a tracker, stop early, save predictions) after this run's own.

        `resume=True` continues from the newest good checkpoint in `out_dir`: the same seed
        gives the same cohorts, keys and batches for every round, so the result is
        bit-identical to a run that never stopped. Ctrl-C (or `interrupt()`) finishes the
        round, checkpoints and raises `Interrupted`; a NaN or infinite training metric
        raises `NonFiniteError` naming the round and the last good checkpoint. With several
        processes, every process runs this in step; resuming reads `out_dir` on each.
        """
        server = Server.create(self.algorithm, self.task.model, seed=self.seed, plan=self.plan)
        history: list[dict] = []
        if resume:
            if self.out_dir is None:
                raise ConfigError("resuming needs the run directory (out_dir)")
            server, meta = server.restore(self.out_dir)
            history = list(meta["history"])
            if server.round >= self.rounds:
                raise ConfigError(f"the run in {str(self.out_dir)!r} is complete "
                                  f"({server.round} rounds); to train longer, resume with "
                                  "--rounds N --allow-changes rounds")
        train = self.task.train
        if train.seed != self.seed:  # `seed` governs sampling and shuffles too
            train = train.with_seed(self.seed)
        self.interrupt_event.clear()
        clock = simtime.from_config(self.config, train, server.params)  # None: no simulated time
        loop = Loop(OneServer(server), rounds=self.rounds, histories=[history],
                    sample=clock.sample if clock else cohort_sampler(
                        train, self.clients_per_round, self.sampling, self.plan),
                    callbacks=[*([simtime.SimulatedTime(clock)] if clock else []),
                               *self.callbacks(server.round if resume else None),
                               *([OnRecord(on_record)] if on_record else []), *callbacks],
                    out_dir=self.out_dir, interrupt_event=self.interrupt_event,
                    prefetch_depth=self.prefetch_depth)
        loop.run()
        return RunResult(server=loop.server, history=history, final=final_metrics(history),
                         host=loop.host, stopped=loop.stopped)


class AlgorithmOptions(NamedTuple):
    """What `build_algorithm` reads of a config (`from_config`): a sweep member's settings
    carry traced learning rates, which an `ExperimentConfig` would refuse."""

    algorithm: str
    client_lr: Any
    server_lr: Any
    aggregator: str
    aggregator_options: dict
    algorithm_options: dict
    skip_nonfinite_clients: bool

    @classmethod
    def of(cls, cfg: "ExperimentConfig | dict") -> "AlgorithmOptions":
        """The options of a config, or of a dict holding its fields."""
        values = cfg if isinstance(cfg, dict) else cfg.to_dict()
        return cls(**{name: values[name] for name in cls._fields})


def build_algorithm(cfg: "ExperimentConfig | AlgorithmOptions", task: tasks.Task,
                    aggregator: Aggregator | None = None) -> FederatedAlgorithm:
    """The configured algorithm with its aggregator (or `aggregator`, e.g. a private run's);
    supplies what the algorithm `needs` (the number of training clients, of domains, the
    client learning rate)."""
    entry = registry.get(cfg.algorithm)
    facts = {"num_clients": task.train.num_clients, "num_domains": task.num_domains,
             "client_learning_rate": cfg.client_lr}
    if "num_domains" in entry.needs and not task.num_domains:
        raise ConfigError(f"algorithm {cfg.algorithm!r} needs examples with a domain_id; "
                          f"task {task.name!r} has none (try emnist or stackoverflow)")
    try:
        if aggregator is None and (cfg.aggregator != "mean" or cfg.aggregator_options):
            aggregator = aggregators.build(cfg.aggregator, **cfg.aggregator_options)
        if cfg.skip_nonfinite_clients:
            aggregator = skip_nonfinite(aggregator)
        return registry.build(cfg.algorithm, optax.sgd(cfg.client_lr), cfg.server_lr,
                              aggregator=aggregator, **cfg.algorithm_options,
                              **{k: facts[k] for k in entry.needs})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build {cfg.algorithm} with aggregator {cfg.aggregator}: "
                          f"{e}") from None
