"""`Experiment`: a run's settings, and the training loop (`fedjax_api.loop`) with the
callbacks they call for (`fedjax_api.callbacks`)."""

import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import jax

from fedjax_api import (
    accelerator,
    distributed,
    privacy,
    rundir,
    simtime,
    state_store,
    tasks,
    tracking,
)
from fedjax_api.algorithm import build_algorithm
from fedjax_api.callbacks import (
    FINAL_EVAL_CHOICES,
    Callback,
    Checkpoint,
    Evaluation,
    Evaluator,
    NonFiniteError,
    NonFiniteGuard,
    PrivacyLedger,
    RunDirOwner,
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
from fedjax_core import client_store
from fedjax_core.algorithms.base import FederatedAlgorithm
from fedjax_core.models.precision import PRECISIONS, with_precision
from fedjax_core.parallel import Plan

__all__ = ["Experiment", "Interrupted", "NonFiniteError", "RunResult", "TimeLimitReached"]


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
    `eval_train_clients`, `eval_test_clients`, `final_eval`, `devices`,
    `personalize_steps`, `sampling`, `checkpoint_every`, `keep_checkpoints`,
    `skip_nonfinite_clients`, `tensorboard`, `track`, `time_limit`, `precision`) are the run options
    of those names (`ExperimentConfig`, docs/cli.md); `track` takes
    `("mlflow:./mlruns", "wandb:PROJECT")` (`fedjax_api.tracking`, docs/tracking.md).
    `precision="bf16"` runs the task's model under
    `fedjax_core.models.precision.with_precision` (bfloat16 forward and backward, f32 params,
    optimizer states and aggregation; training and evaluation alike).

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
    eval_test_clients: int | None = None
    final_eval: str = "full"
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
    track: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    time_limit: float | None = None
    prefetch_depth: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    client_store: str = "auto"
    client_store_dtype: str = "f32"
    precision: str = "f32"
    interrupt_event: threading.Event = attrs.field(factory=threading.Event, eq=False,
                                                   repr=False)

    def __attrs_post_init__(self):
        tracking.require(self.track)  # a tracker's package missing: one line, before work
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")
        n = self.task.train.num_clients
        if not 1 <= self.clients_per_round <= n:
            raise ConfigError(f"clients per round must be between 1 and the {n} training "
                              f"clients of task {self.task.name!r}, got {self.clients_per_round}")
        if self.eval_test_clients is not None and self.eval_test_clients < 0:
            raise ConfigError(f"eval-test-clients must be at least 0 (0: the whole test set), "
                              f"got {self.eval_test_clients}")
        if self.final_eval not in FINAL_EVAL_CHOICES:
            raise ConfigError(f"final-eval must be one of {', '.join(FINAL_EVAL_CHOICES)}, got "
                              f"{self.final_eval!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                              f"{self.precision!r}")
        if self.precision != "f32":  # the task's model computes in bf16; f32: left as it is
            object.__setattr__(self, "task", attrs.evolve(
                self.task, model=with_precision(self.task.model, self.precision)))
        if self.plan.mesh is None:
            object.__setattr__(self, "plan",
                               self.plan._replace(mesh=distributed.mesh(self.devices)))

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, resuming: bool = False) -> "Experiment":
        """Loads the task, builds the algorithm (client SGD at `client_lr`) and checks `out`
        (which must not hold a run unless `resuming`; then call `run(resume=True)`)."""
        tracking.require(cfg.track)  # before the task loads
        task = tasks.get(cfg.task, seed=cfg.seed, batch_size=cfg.batch_size, epochs=cfg.epochs,
                         max_steps=cfg.max_steps, data_path=cfg.data)
        if cfg.device_data:  # the examples stay on the device; rounds send an index
            task = attrs.evolve(task, train=attrs.evolve(task.train, device_resident=True))
        dp = privacy.setup(cfg, task.train.num_clients) if cfg.private else None
        saved = cfg.to_dict()
        if dp is not None:  # calibrated when --dp-epsilon
            saved["resolved"] = {"noise_multiplier": dp.noise_multiplier}
        same = {a.name: getattr(cfg, a.name) for a in attrs.fields(cls)  # run options
                if a.name in saved and a.name not in ("task", "algorithm")}
        exp = cls(task=task, algorithm=build_algorithm(cfg, task, dp and dp.aggregator),
                  plan=Plan(cfg.chunk_size or accelerator.default_chunk_size(
                      task, cfg.clients_per_round, cfg.devices)),
                  config=saved, personalize_lr=cfg.client_lr, privacy=dp, **same)
        # Only a valid experiment creates its run directory; process 0 checks and writes it.
        if cfg.out is not None and distributed.is_primary():
            rundir.check_out(cfg.out, new_run=not resuming)
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
                         eval_test_clients=self.eval_test_clients,
                         final_eval=self.final_eval,
                         personalize_steps=self.personalize_steps,
                         personalize_lr=self.personalize_lr)

    def callbacks(self, resume_round: int | None = None) -> list[Callback]:
        """The callbacks this run's settings call for, in order: the NaN guard, the privacy
        ledger, evaluation, then (process 0, with `out_dir`) the run directory, TensorBoard
        and checkpoints, the trackers of `track` (process 0), and the time limit."""
        names = ("train/delta_norm",) + (() if self.skip_nonfinite_clients else ("train/loss",))
        out: list[Callback] = [NonFiniteGuard(names, out_dir=self.out_dir)]
        if self.out_dir is not None and distributed.is_primary():  # first: fail before work
            out.append(RunDirOwner(self.out_dir, new_run=resume_round is None))
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
        if self.track and distributed.is_primary():  # MLflow, W&B: imported when they start
            params = {"task": self.task.name, "rounds": self.rounds, "seed": self.seed,
                      "clients_per_round": self.clients_per_round, **self.config}
            out += tracking.callbacks(self.track, self.out_dir, params, resume_round)
        if self.time_limit is not None:
            out.append(TimeLimit(self.time_limit))
        return out

    def store_spec(self, resume: bool = False) -> "client_store.StoreSpec":
        """Where this run keeps per-client state (`fedjax_api.state_store.choose`); prints
        one line when it is not the device. A resumed run keeps its checkpoint's store."""
        backend, dtype = self.client_store, self.client_store_dtype
        if resume and self.out_dir is not None:
            backend, dtype = state_store.saved_backend(self.out_dir) or ("device", "f32")
        shape = jax.eval_shape(self.algorithm.init,
                               jax.eval_shape(self.task.model.init, jax.random.key(0)))
        spec, note = state_store.choose(backend, dtype, shape, self.task.train.num_clients,
                                        self.out_dir)
        if note is not None and distributed.is_primary():
            print(note, file=sys.stderr)
        return spec

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
        server = Server.create(self.algorithm, self.task.model, seed=self.seed, plan=self.plan,
                               store=self.store_spec(resume))
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
                    sample=cohort_sampler(train, self.clients_per_round, self.sampling,
                                          self.plan, clock.sample if clock else None),
                    callbacks=[*([simtime.SimulatedTime(clock)] if clock else []),
                               *self.callbacks(server.round if resume else None),
                               *([OnRecord(on_record)] if on_record else []), *callbacks],
                    out_dir=self.out_dir, interrupt_event=self.interrupt_event,
                    prefetch_depth=self.prefetch_depth)
        loop.run()
        return RunResult(server=loop.server, history=history, final=final_metrics(history),
                         host=loop.host, stopped=loop.stopped)
