"""`Experiment`: sampling, the round loop, evaluation, the run directory and progress."""

import time
from pathlib import Path
from typing import Callable

import attrs
import jax
import numpy as np
import optax

from fedjax_api import rundir, tasks
from fedjax_api.config import ExperimentConfig
from fedjax_api.errors import ConfigError
from fedjax_api.server import Server
from fedjax_core import evaluate as core_evaluate
from fedjax_core import personalization
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.algorithms import registry
from fedjax_core.algorithms.base import EvalClients, FederatedAlgorithm
from fedjax_core.data import AlignedFederatedData
from fedjax_core.parallel import Plan

Callback = Callable[[dict], None]


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
      out_dir: where `config.json` and `metrics.jsonl` go; None writes nothing.
      config: the resolved config saved in the run dir.
      personalize_steps: when > 0, each evaluation also fine-tunes the global model on
        each test client's own training examples for this many SGD steps (at
        `personalize_lr`, the task's batch size) and reports the per-client accuracy
        distribution as `test/personalized_accuracy_clients_{mean,p10,worst}`.
      personalize_lr: the fine-tuning learning rate.

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
    out_dir: Path | None = None
    config: dict = attrs.field(factory=dict)
    personalize_steps: int = 0
    personalize_lr: float = 0.1

    def __attrs_post_init__(self):
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")
        n = self.task.train.num_clients
        if not 1 <= self.clients_per_round <= n:
            raise ConfigError(f"clients per round must be between 1 and the {n} training "
                              f"clients of task {self.task.name!r}, got {self.clients_per_round}")

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> "Experiment":
        """Loads the task, builds the algorithm (client SGD at `client_lr`) and checks `out`."""
        task = tasks.get(cfg.task, seed=cfg.seed, batch_size=cfg.batch_size, epochs=cfg.epochs,
                         max_steps=cfg.max_steps, data_path=cfg.data)
        algorithm = build_algorithm(cfg, task)
        exp = cls(task=task, algorithm=algorithm, rounds=cfg.rounds,
                  clients_per_round=cfg.clients_per_round, seed=cfg.seed,
                  eval_every=cfg.eval_every, eval_train_clients=cfg.eval_train_clients,
                  plan=Plan(cfg.chunk_size), config=cfg.to_dict(),
                  personalize_steps=cfg.personalize_steps, personalize_lr=cfg.client_lr)
        # Only a valid experiment creates its run directory.
        if cfg.out:
            if (Path(cfg.out) / rundir.METRICS_FILE).exists():
                raise ConfigError(f"{cfg.out!r} already holds a run ({rundir.METRICS_FILE}); "
                                  "choose a new --out")
            exp = attrs.evolve(exp, out_dir=rundir.check_writable_dir(Path(cfg.out)))
        return exp

    def run(self, on_record: Callback | None = None) -> RunResult:
        """Runs every round; calls `on_record(record)` for each round and evaluation record.

        Records: `{"round": r, "kind": "train", "train/loss": ..., "round_time_s": ...}`
        after round r, and `{"round": r, "kind": "eval", "test/accuracy": ..., ...}`.
        """
        log = None
        if self.out_dir is not None:
            rundir.write_json_atomic(self.out_dir / rundir.CONFIG_FILE, {
                **self.config, "versions": {"jax": jax.__version__, "optax": optax.__version__}})
            log = rundir.MetricsLog(self.out_dir)
        history: list[dict] = []

        def emit(record):
            history.append(record)
            if log is not None:
                log.write(record)
            if on_record is not None:
                on_record(record)

        try:
            server = Server.create(self.algorithm, self.task.model, seed=self.seed, plan=self.plan)
            train = self.task.train
            if train.seed != self.seed:  # `seed` governs sampling and shuffles too
                train = attrs.evolve(train, seed=self.seed)
            if self.eval_every:
                emit(self._eval_record(server, 0, train_too=False))
            cohort = train.sample(self.clients_per_round, 0)
            for r in range(self.rounds):
                start = time.perf_counter()
                server = server.step(cohort)  # dispatched asynchronously
                if r + 1 < self.rounds:
                    cohort = train.sample(self.clients_per_round, r + 1)  # overlaps the device
                metrics = {k: float(v) for k, v in server.metrics.items()}
                emit({"round": r + 1, "kind": "train", **metrics,
                      "round_time_s": time.perf_counter() - start})
                if self.eval_every and (r + 1) % self.eval_every == 0 and r + 1 < self.rounds:
                    emit(self._eval_record(server, r + 1, train_too=False))
            final_record = self._eval_record(server, self.rounds, train_too=True)
            emit(final_record)
        finally:
            if log is not None:
                log.close()
        final = {split: {k.split("/", 1)[1]: v for k, v in final_record.items()
                         if k.startswith(split + "/")} for split in ("test", "train")}
        return RunResult(server=server, history=history, final=final)

    def _eval_record(self, server: Server, round_num: int, train_too: bool) -> dict:
        start = time.perf_counter()
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
                plan=self.plan)
            if "accuracy" in tuned:
                record.update({f"test/{k}": v for k, v in personalization.client_distribution(
                    tuned["accuracy"], "personalized_accuracy_").items()})
        if train_too and self.eval_train_clients:
            sample = self.task.train_eval.subset(self.eval_train_clients, seed=self.seed)
            record.update({f"train/{k}": v for k, v in server.evaluate(sample, bs).items()})
        record["eval_time_s"] = time.perf_counter() - start
        return record

    def _train_of_test(self) -> AlignedFederatedData:
        """Each test client's training examples (as evaluation reads them), aligned."""
        return AlignedFederatedData(self.task.train_eval.data, self.task.test.data.client_ids)

    def _eval_clients(self, server: Server, test) -> EvalClients:
        train = self._train_of_test()
        rows = np.array([server.client_index.row_of.get(int(p), -1) if p >= 0 else -1
                         for p in train.positions], np.int64)
        return EvalClients(rows=rows, train=train)


def build_algorithm(cfg: ExperimentConfig, task: tasks.Task) -> FederatedAlgorithm:
    """The configured algorithm with its aggregator; supplies what the algorithm `needs`
    (the number of training clients, of domains, the client learning rate)."""
    entry = registry.get(cfg.algorithm)
    facts = {"num_clients": task.train.num_clients, "num_domains": task.num_domains,
             "client_learning_rate": cfg.client_lr}
    if "num_domains" in entry.needs and not task.num_domains:
        raise ConfigError(f"algorithm {cfg.algorithm!r} needs examples with a domain_id; "
                          f"task {task.name!r} has none (try emnist or stackoverflow)")
    try:
        aggregator = (None if cfg.aggregator == "mean" and not cfg.aggregator_options else
                      aggregators.build(cfg.aggregator, **cfg.aggregator_options))
        return registry.build(cfg.algorithm, optax.sgd(cfg.client_lr), cfg.server_lr,
                              aggregator=aggregator, **cfg.algorithm_options,
                              **{k: facts[k] for k in entry.needs})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build {cfg.algorithm} with aggregator {cfg.aggregator}: "
                          f"{e}") from None

