"""`Experiment`: sampling, the round loop, evaluation, the run directory and progress."""

import contextlib
import math
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import attrs
import jax
import numpy as np
import optax

from fedjax_api import checkpoint, distributed, privacy, rundir, tasks
from fedjax_api.config import ExperimentConfig
from fedjax_api.errors import ConfigError
from fedjax_api.prefetch import Prefetcher
from fedjax_api.resume import NOT_CONFIG
from fedjax_api.server import Server
from fedjax_core import parallel
from fedjax_core import evaluate as core_evaluate
from fedjax_core import personalization
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.aggregate.guard import skip_nonfinite
from fedjax_core.algorithms import registry
from fedjax_core.algorithms.base import EvalClients, FederatedAlgorithm
from fedjax_core.data import AlignedFederatedData
from fedjax_core.parallel import Plan

Callback = Callable[[dict], None]


class Interrupted(Exception):
    """The run stopped after round `round` at the user's request (Ctrl-C), checkpointed."""

    def __init__(self, round_num: int, out_dir: Path | None):
        self.round = round_num
        self.out_dir = out_dir
        resume = f"; resume with: fedjax resume {out_dir}" if out_dir is not None else ""
        super().__init__(f"interrupted after round {round_num}{resume}")


class NonFiniteError(ConfigError):
    """Training produced NaN or infinity; the message names the round and the last good
    checkpoint."""


def _versions() -> dict[str, str]:
    import fedjax_api
    return {"jax": jax.__version__, "optax": optax.__version__,
            "fedjax_sim": getattr(fedjax_api, "__version__", "0.1.0")}


@contextlib.contextmanager
def _stop_on_sigint(stop: threading.Event):
    """The first Ctrl-C sets `stop` (the loop finishes the round and checkpoints); a second
    one interrupts at once. Only in the main thread (signal handlers live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if stop.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@attrs.frozen(kw_only=True)
class RunResult:
    """What `Experiment.run` returns.

    Attributes:
      server: the server after the last round.
      history: every record written to `metrics.jsonl`, in order.
      final: `{"test": metrics, "train": metrics}` evaluated after the last round.
    """

    server: Server
    history: list[dict]
    final: dict[str, dict[str, float]]
    host: dict[str, float] = attrs.field(factory=dict)
    """Host work (sampling, reading, packing) of this run's rounds, done in a background
    thread: `{"host_s": seconds spent, "wait_s": seconds the round loop waited for it,
    "hidden_fraction": share of host_s that overlapped other work}`."""


@attrs.frozen(kw_only=True)
class Experiment:
    """A federated training run of `rounds` rounds.

    Each round samples `clients_per_round` clients uniformly without replacement (seeded
    by `(seed, round)`), packs them, and runs one jitted round. While the device runs
    round r, the host already samples and packs round r+1.

    Attributes:
      task: the loaded task.
      algorithm: the federated algorithm.
      rounds: number of rounds.
      clients_per_round: cohort size.
      seed: seeds client sampling, shuffles, the model init and every client's key.
      eval_every: evaluate on the test set before training and every this many rounds
        (0: at the end only). The end of training is always evaluated, train too.
      eval_train_clients: size of the fixed sample of training clients evaluated at the end.
      plan: how a cohort is executed.
      devices: devices per process each round's cohort is split over (`plan` gets the
        mesh `distributed.mesh(devices)`); 0: all of them; 1 (the default): one device,
        unless several processes run together (`distributed.initialize`), whose meshes
        always span every process. Results equal the one-device run's up to float
        reassociation (docs/scaling.md). With several processes only process 0 writes
        `out_dir`.
      out_dir: where `config.json` and `metrics.jsonl` go; None writes nothing.
      config: the resolved config saved in the run dir.
      personalize_steps: when > 0, each evaluation also fine-tunes the global model on
        each test client's own training examples for this many SGD steps (at
        `personalize_lr`, the task's batch size) and reports the per-client accuracy
        distribution as `test/personalized_accuracy_clients_{mean,p10,worst}`.
      personalize_lr: the fine-tuning learning rate.
      sampling: "uniform" (`clients_per_round` clients without replacement) or "poisson"
        (each client with probability `clients_per_round / N`; cohorts padded to buckets).
      checkpoint_every: write a checkpoint every this many rounds (0: only after the
        last round); needs `out_dir`.
      keep_checkpoints: how many checkpoints to keep (the newest).
      skip_nonfinite_clients: drop clients whose update is NaN or infinite (counted in
        `train/nonfinite_clients`) instead of stopping the run.
      tensorboard: also write TensorBoard event files (`out_dir/tb/`).
      prefetch_depth: how many rounds ahead a background thread samples and packs
        cohorts while the device trains (`fedjax_api.prefetch.Prefetcher`); the run's
        `RunResult.host` says how much of that host time was hidden.
      privacy: a private run's `fedjax_api.privacy.PrivacySetup`; every train record then
        has `privacy/epsilon`, the epsilon spent so far (RDP: every round; PLD: at
        evaluations and the end, as each PLD query takes a fraction of a second).

    Every evaluation reports the per-client test accuracy distribution of the global
    model as `test/accuracy_clients_{mean,p10,worst}` (fairness across clients).

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
    prefetch_depth: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    _stop: threading.Event = attrs.field(factory=threading.Event, eq=False, repr=False,
                                         alias="_stop")

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
        algorithm = build_algorithm(cfg, task, None if dp is None else dp.aggregator)
        saved = cfg.to_dict()
        if dp is not None:  # calibrated when --dp-epsilon
            saved["resolved"] = {"noise_multiplier": dp.noise_multiplier}
        exp = cls(task=task, algorithm=algorithm, rounds=cfg.rounds,
                  clients_per_round=cfg.clients_per_round, seed=cfg.seed,
                  eval_every=cfg.eval_every, eval_train_clients=cfg.eval_train_clients,
                  plan=Plan(cfg.chunk_size), devices=cfg.devices, config=saved,
                  personalize_steps=cfg.personalize_steps, personalize_lr=cfg.client_lr,
                  sampling=cfg.sampling, privacy=dp, checkpoint_every=cfg.checkpoint_every,
                  keep_checkpoints=cfg.keep_checkpoints,
                  skip_nonfinite_clients=cfg.skip_nonfinite_clients, tensorboard=cfg.tensorboard)
        # Only a valid experiment creates its run directory.
        if cfg.out and not distributed.is_primary():  # process 0 checks and writes it
            exp = attrs.evolve(exp, out_dir=Path(cfg.out))
        elif cfg.out:
            if not resuming and (Path(cfg.out) / rundir.METRICS_FILE).exists():
                raise ConfigError(f"{cfg.out!r} already holds a run ({rundir.METRICS_FILE}); "
                                  "choose a new --out")
            exp = attrs.evolve(exp, out_dir=rundir.check_writable_dir(Path(cfg.out)))
        return exp

    def interrupt(self) -> None:
        """Asks a running `run` to stop after the current round: it writes a checkpoint and
        raises `Interrupted` (what Ctrl-C does)."""
        self._stop.set()

    def run(self, on_record: Callback | None = None, resume: bool = False) -> RunResult:
        """Runs every round; calls `on_record(record)` for each round and evaluation record.

        Records: `{"round": r, "kind": "train", "train/loss": ..., "round_time_s": ...,
        "wall_time_s": ...}` after round r (`wall_time_s` since the run started, across
        resumes), and `{"round": r, "kind": "eval", "test/accuracy": ..., ...}`.

        With `out_dir`, a checkpoint (server state, per-client state index, metric history,
        config, versions) is written every `checkpoint_every` rounds and after the last
        one. `resume=True` continues from the newest good checkpoint in `out_dir`: the
        same seed gives the same cohorts, keys and batches for every round, so the result
        is bit-identical to a run that never stopped. Ctrl-C (or `interrupt()`) finishes
        the round, checkpoints and raises `Interrupted`; a NaN or infinite training
        metric raises `NonFiniteError` naming the round and the last good checkpoint.

        With several processes, every process runs this (in step), only process 0 writes
        `out_dir`, and resuming reads it on every process (a shared file system).
        """
        server = Server.create(self.algorithm, self.task.model, seed=self.seed, plan=self.plan)
        history: list[dict] = []
        log = None
        if resume:
            if self.out_dir is None:
                raise ConfigError("resuming needs the run directory (out_dir)")
            done, state, meta = checkpoint.load(self.out_dir, template=server.state)
            for reason in meta.get("skipped", []):
                warnings.warn(f"skipped a damaged checkpoint: {reason}", stacklevel=2)
            server = attrs.evolve(server, state=state, round=done)
            history = list(meta["history"])
            if done >= self.rounds:
                raise ConfigError(f"the run in {str(self.out_dir)!r} is complete ({done} "
                                  "rounds); to train longer, resume with --rounds N "
                                  "--allow-changes rounds")
            if distributed.is_primary():
                log = rundir.MetricsLog(self.out_dir, truncate_after_round=done,
                                        tensorboard=self.tensorboard)
        elif self.out_dir is not None and distributed.is_primary():
            rundir.check_writable_dir(self.out_dir)
            rundir.write_json_atomic(self.out_dir / rundir.CONFIG_FILE,
                                     {**self.config, "versions": _versions()})
            if self.config:  # the same config as TOML, to re-run with `fedjax run --config`
                from fedjax_api import configfile
                cfg = ExperimentConfig(**{k: v for k, v in self.config.items()
                                          if k not in NOT_CONFIG})
                rundir.write_text_atomic(self.out_dir / "config.toml", configfile.dump(cfg))
            log = rundir.MetricsLog(self.out_dir, tensorboard=self.tensorboard)

        def emit(record):
            history.append(record)
            if log is not None:
                log.write(record)
            if on_record is not None:
                on_record(record)

        def save(round_num):
            if self.out_dir is None or not distributed.is_primary():
                return
            meta = {"config": self.config, "versions": _versions(), "history": history,
                    "sampler": {"seed": self.seed, "next_round": round_num}}
            checkpoint.save(self.out_dir, round_num, server.state, meta,
                            keep=self.keep_checkpoints)

        self._stop.clear()
        run_start = time.perf_counter()
        wall_before = max([r.get("wall_time_s", 0.0) for r in history], default=0.0)
        with _stop_on_sigint(self._stop), contextlib.ExitStack() as stack:
            try:
                train = self.task.train
                if train.seed != self.seed:  # `seed` governs sampling and shuffles too
                    train = train.with_seed(self.seed)
                start_round = server.round
                if self.eval_every and start_round == 0:
                    emit(self._eval_record(server, 0, train_too=False))
                # Cohorts of the next rounds are sampled and packed in a background
                # thread while the device trains (and the host logs and evaluates).
                cohorts = Prefetcher(lambda r: self._sample(train, r), start_round,
                                     self.rounds, depth=self.prefetch_depth)
                stack.callback(cohorts.close)
                for r in range(start_round, self.rounds):
                    start = time.perf_counter()
                    server = server.step(cohorts.get(r))  # dispatched asynchronously
                    metrics = {k: float(v) for k, v in server.metrics.items()}
                    self._check_finite(metrics, r + 1)
                    if self.privacy is not None and (
                            self.privacy.ledger.accountant == "rdp" or r + 1 == self.rounds
                            or (self.eval_every and (r + 1) % self.eval_every == 0)):
                        metrics["privacy/epsilon"] = self.privacy.ledger.epsilon_after(r + 1)
                    now = time.perf_counter()
                    emit({"round": r + 1, "kind": "train", **metrics,
                          "round_time_s": now - start,
                          "wall_time_s": wall_before + now - run_start})
                    last = r + 1 == self.rounds
                    if self.eval_every and (r + 1) % self.eval_every == 0 and not last:
                        emit(self._eval_record(server, r + 1, train_too=False))
                    if last:
                        emit(self._eval_record(server, self.rounds, train_too=True))
                    if last or self._stop.is_set() or (
                            self.checkpoint_every and (r + 1) % self.checkpoint_every == 0):
                        save(r + 1)
                    if self._stop.is_set() and not last:
                        raise Interrupted(r + 1, self.out_dir)
            finally:
                if log is not None:
                    log.close()
        final_record = history[-1]
        final = {split: {k.split("/", 1)[1]: v for k, v in final_record.items()
                         if k.startswith(split + "/")} for split in ("test", "train")}
        host = {"host_s": cohorts.host_s, "wait_s": cohorts.wait_s,
                "hidden_fraction": cohorts.hidden_fraction}
        return RunResult(server=server, history=history, final=final, host=host)

    def _check_finite(self, metrics: dict, round_num: int) -> None:
        """Stops the run when training produced NaN or infinity (the aggregate's norm; also
        the loss unless non-finite clients are skipped)."""
        names = ["train/delta_norm"] + ([] if self.skip_nonfinite_clients else ["train/loss"])
        bad = [(n, metrics[n]) for n in names if n in metrics and not math.isfinite(metrics[n])]
        if not bad:
            return
        name, value = bad[0]
        where = "no checkpoint was written yet"
        if self.out_dir is not None and (found := checkpoint.list_checkpoints(self.out_dir)):
            last_round, path = found[-1]
            where = f"the last good checkpoint is {path} (round {last_round})"
        raise NonFiniteError(
            f"round {round_num}: {name} is {value}; the run stopped and {where}. Lower the "
            "learning rate or clip updates, or pass --skip-nonfinite-clients to drop "
            "diverging clients")

    def _eval_record(self, server: Server, round_num: int, train_too: bool) -> dict:
        start = time.perf_counter()
        server = attrs.evolve(server, state=parallel.local_copy(server.state))  # one device
        bs = self.task.defaults.eval_batch_size
        record = {"round": round_num, "kind": "eval"}
        test = self.task.test.data
        if self.algorithm.evaluate is not None:  # its own models (clusters, personal ones)
            record.update({f"test/{k}": v for k, v in server.evaluate(
                test, bs, clients=self._eval_clients(server, test)).items()})
        else:
            per_client = core_evaluate.metric_totals(self.task.model, server.params, test, bs)
            record.update({f"test/{k}": v for k, v in
                           core_evaluate.global_metrics(per_client, test).items()})
            if "accuracy" in per_client:
                record.update({f"test/{k}": v for k, v in personalization.client_distribution(
                    core_evaluate.ratios(per_client)["accuracy"], "accuracy_").items()})
        if self.personalize_steps:
            tuned = personalization.finetune_evaluate(
                self.task.model, server.params, optax.sgd(self.personalize_lr),
                self.personalize_steps, self._train_of_test(), test,
                self.task.train.batch_size, bs, seed=self.seed, round_num=round_num,
                plan=self.plan._replace(mesh=None))
            if "accuracy" in tuned:
                record.update({f"test/{k}": v for k, v in personalization.client_distribution(
                    tuned["accuracy"], "personalized_accuracy_").items()})
        if train_too and self.eval_train_clients:
            sample = self.task.train_eval.subset(self.eval_train_clients, seed=self.seed)
            record.update({f"train/{k}": v for k, v in server.evaluate(sample, bs).items()})
        record["eval_time_s"] = time.perf_counter() - start
        return record

    def _sample(self, train, round_num: int):
        if distributed.spans_processes(self.plan):  # this process packs its devices' share
            if self.sampling == "poisson":
                idx, size = train.poisson_indices(self.clients_per_round / train.num_clients,
                                                  round_num)
            else:
                idx, size = train.sample_indices(self.clients_per_round, round_num), None
            return distributed.sample_cohort(train, idx, round_num, self.plan, pad_to=size)
        if self.sampling == "poisson":
            return train.sample_poisson(self.clients_per_round / train.num_clients, round_num)
        return train.sample(self.clients_per_round, round_num)

    def _train_of_test(self) -> AlignedFederatedData:
        """Each test client's training examples (as evaluation reads them), aligned."""
        return AlignedFederatedData(self.task.train_eval.data, self.task.test.data.client_ids)

    def _eval_clients(self, server: Server, test) -> EvalClients:
        train = self._train_of_test()
        return EvalClients(rows=server.store_rows(train.positions), train=train)


def build_algorithm(cfg: ExperimentConfig, task: tasks.Task,
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

