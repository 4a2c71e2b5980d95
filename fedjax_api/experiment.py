"""`Experiment`: sampling, the round loop, evaluation, the run directory and progress."""

import time
from pathlib import Path
from typing import Callable

import attrs
import jax
import optax

from fedjax_api import rundir, tasks
from fedjax_api.config import ExperimentConfig
from fedjax_api.errors import ConfigError
from fedjax_api.server import Server
from fedjax_core.algorithms import registry
from fedjax_core.algorithms.base import FederatedAlgorithm
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
        algorithm = registry.build(cfg.algorithm, optax.sgd(cfg.client_lr), cfg.server_lr,
                                   **cfg.server_options)
        exp = cls(task=task, algorithm=algorithm, rounds=cfg.rounds,
                  clients_per_round=cfg.clients_per_round, seed=cfg.seed,
                  eval_every=cfg.eval_every, eval_train_clients=cfg.eval_train_clients,
                  plan=Plan(cfg.chunk_size), config=cfg.to_dict())
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
        record.update({f"test/{k}": v for k, v in server.evaluate(self.task.test, bs).items()})
        if train_too and self.eval_train_clients:
            sample = self.task.train_eval.subset(self.eval_train_clients, seed=self.seed)
            record.update({f"train/{k}": v for k, v in server.evaluate(sample, bs).items()})
        record["eval_time_s"] = time.perf_counter() - start
        return record

