"""The callbacks a run is made of: evaluation, the run directory, TensorBoard, checkpoints,
the privacy ledger, the NaN guard and the time limit (the progress bar is the CLI's).

`Experiment.run` assembles them from its settings (`Experiment.callbacks`); `Sweep.run`
uses the same ones for its members. Write your own by subclassing `Callback`.

Example (an early stop, docs/facade.md):
  >>> class EarlyStopping(Callback):
  ...     def __init__(self, patience):
  ...         self.patience, self.best, self.waited = patience, -1.0, 0
  ...     def on_record(self, loop, record):
  ...         if record["kind"] == "eval" and "test/accuracy" in record:
  ...             ...
"""

import json
import math
import time
from pathlib import Path
from typing import Any

import attrs
import optax

from fedjax_api import checkpoint, configfile, rundir, tasks
from fedjax_api.dataset import FederatedDataset
from fedjax_api.errors import ConfigError
from fedjax_api.loop import Callback, Loop, TimeLimitReached
from fedjax_api.server import Server
from fedjax_api.versions import versions
from fedjax_core import atomic, parallel, personalization
from fedjax_core import evaluate as core_evaluate
from fedjax_core.algorithms.base import EvalClients
from fedjax_core.data import AlignedFederatedData, FederatedData
from fedjax_core.parallel import Plan

__all__ = ["Callback", "Checkpoint", "Evaluation", "Evaluator", "NonFiniteError",
           "NonFiniteGuard", "PrivacyLedger", "RunDirOwner", "RunLog", "TensorBoard", "TimeLimit"]


FINAL_EVAL_CHOICES = ("full", "sampled")
"""`--final-eval`: the last evaluation on the whole test set, or on the periodic sample."""

TEST_SAMPLE_STREAM = 0x7E57
"""The random stream of the test-client sample (`FederatedDataset.subset`), apart from the
training-client sample's."""


class NonFiniteError(ConfigError):
    """Training produced NaN or infinity; the message names the round and the last good
    checkpoint."""


@attrs.frozen(kw_only=True)
class Evaluator:
    """How a run evaluates its server: `evaluator(server, round_num, train_too)` is an
    "eval" record.

    The record has the global test metrics (`test/...`) and the per-client test accuracy
    distribution (`test/accuracy_clients_{mean,p10,worst}`); with `personalize_steps`, the
    same after fine-tuning each test client on its own training examples
    (`test/personalized_accuracy_clients_*`); with `train_too`, the metrics of a fixed
    sample of `eval_train_clients` training clients (`train/...`); and `eval_time_s`.

    With `eval_test_clients` N below the number of test clients, the test metrics are
    those of a fixed sample of N test clients (`test_sample`: drawn from `seed` alone, so
    the same at every evaluation and after a resume), and the record says so with
    `"test_clients": N` and `"test_clients_total"`, the test clients there are (its
    `test/num_examples` is the sample's); the final evaluation
    (`final=True`) uses the whole test set unless `final_eval` is "sampled". Records of the
    whole test set have no `test_clients` field, as before these options.

    Attributes:
      task: the task (test set, training clients, model, batch sizes).
      seed: seeds the training- and test-client samples and the fine-tuning.
      eval_train_clients: size of the training-client sample.
      eval_test_clients: size of the test-client sample; None or 0: the whole test set.
      final_eval: "full" (the final evaluation on the whole test set) or "sampled".
      personalize_steps: fine-tuning SGD steps per test client (0: none).
      personalize_lr: the fine-tuning learning rate.
      plan: how clients are executed (chunk size; with a mesh of several devices of this
        process, test evaluation splits its batches over them).
    """

    task: tasks.Task
    seed: int = 0
    eval_train_clients: int = 100
    eval_test_clients: int | None = None
    final_eval: str = attrs.field(default="full",
                                  validator=attrs.validators.in_(FINAL_EVAL_CHOICES))
    personalize_steps: int = 0
    personalize_lr: float = 0.1
    plan: Plan = Plan()

    @property
    def samples_test(self) -> bool:
        """Whether the periodic evaluations use a sample of the test clients (fewer than all)."""
        n = self.eval_test_clients
        return bool(n) and n is not None and n < self.task.test.num_clients

    def test_sample(self, final: bool = False) -> FederatedDataset:
        """The test clients an evaluation reads: a fixed sample of `eval_test_clients`
        (in population order, drawn from `seed`: `FederatedDataset.subset`), or the whole
        test set (no sample, or the final evaluation with `final_eval="full"`)."""
        if not self.samples_test or (final and self.final_eval == "full"):
            return self.task.test
        assert self.eval_test_clients is not None
        return self.task.test.subset(self.eval_test_clients, seed=self.seed,
                                     stream=TEST_SAMPLE_STREAM)

    def describe(self) -> str | None:
        """What the test metrics are computed on, in words (None: the whole test set at
        every evaluation, as without these options).

        Example:
          >>> Evaluator(task=so, eval_test_clients=50).describe()
          'test metrics on a fixed sample of 50 of 204088 test clients (seed 0); the final
          evaluation on all 204088'
        """
        total = self.task.test.num_clients
        if not self.eval_test_clients:
            return None
        if not self.samples_test:
            return (f"--eval-test-clients {self.eval_test_clients} is at least the {total} "
                    "test clients: every evaluation uses all of them")
        final = (f"the final evaluation on all {total}" if self.final_eval == "full" else
                 "the final evaluation on the same sample")
        return (f"test metrics on a fixed sample of {self.eval_test_clients} of {total} test "
                f"clients (seed {self.seed}); {final}")

    def __call__(self, server: Server, round_num: int, train_too: bool, *,
                 final: bool = False,
                 progress: core_evaluate.Progress | None = None) -> dict[str, Any]:
        """The "eval" record of `server` after round `round_num`.

        Args:
          server: the server to evaluate.
          round_num: the round it has trained.
          train_too: also evaluate the training-client sample.
          final: the run's last evaluation (the whole test set unless `final_eval` is
            "sampled").
          progress: `progress(done, total)` in examples of the test pass (the global
            model's; algorithms with their own models evaluate without it).
        """
        start = time.perf_counter()
        server = attrs.evolve(server, state=parallel.local_copy(server.state))  # one device
        bs = self.task.defaults.eval_batch_size
        record: dict[str, Any] = {"round": round_num, "kind": "eval"}
        sample = self.test_sample(final)
        test = sample.data
        if sample is not self.task.test:
            record["test_clients"] = sample.num_clients
            record["test_clients_total"] = self.task.test.num_clients
        if server.algorithm.evaluate is not None:  # its own models (clusters, personal ones)
            train = self._train_of_test(test)
            clients = EvalClients(rows=server.eval_rows(train.positions), train=train)
            record.update({f"test/{k}": v for k, v in
                           server.evaluate(test, bs, clients=clients).items()})
        else:
            per_client = core_evaluate.metric_totals(self.task.model, server.params, test, bs,
                                                     plan=self.plan, progress=progress)
            record.update({f"test/{k}": v for k, v in
                           core_evaluate.global_metrics(per_client, test).items()})
            if "accuracy" in per_client:
                record.update(_prefixed(personalization.client_distribution(
                    core_evaluate.ratios(per_client)["accuracy"], "accuracy_")))
        if self.personalize_steps:
            tuned = personalization.finetune_evaluate(
                self.task.model, server.params, optax.sgd(self.personalize_lr),
                self.personalize_steps, self._train_of_test(test), test,
                self.task.train.batch_size, bs, seed=self.seed, round_num=round_num,
                plan=self.plan._replace(mesh=None))
            if "accuracy" in tuned:
                record.update(_prefixed(personalization.client_distribution(
                    tuned["accuracy"], "personalized_accuracy_")))
        if train_too and self.eval_train_clients:
            sample = self.task.train_eval.subset(self.eval_train_clients, seed=self.seed)
            record.update({f"train/{k}": v for k, v in server.evaluate(sample, bs).items()})
        record["eval_time_s"] = time.perf_counter() - start
        return record

    def _train_of_test(self, test: FederatedData) -> AlignedFederatedData:
        """Each client of `test`'s training examples (as evaluation reads them), aligned."""
        return AlignedFederatedData(self.task.train_eval.data, test.client_ids)


def _prefixed(metrics: dict[str, float]) -> dict[str, float]:
    return {f"test/{k}": v for k, v in metrics.items()}


class Evaluation(Callback):
    """Evaluates every member at round 0 and every `every` rounds (0: neither) on the test
    set (or its fixed sample: `Evaluator.eval_test_clients`), and after the last round
    (the final evaluation: the whole test set unless `final_eval="sampled"`) also a sample
    of training clients. Each test pass reports its progress to every callback's
    `on_eval_progress`.

    Args:
      evaluators: one `Evaluator` per member of the loop.
      every: the evaluation period in rounds.
    """

    def __init__(self, evaluators: list[Evaluator], every: int):
        self.evaluators, self.every = evaluators, every

    def evaluate(self, loop: Loop, train_too: bool, final: bool = False) -> None:
        """Makes an "eval" record of each member at `loop.round` (`final`: the last one)."""
        def progress(done: int, total: int) -> None:
            for callback in loop.callbacks:
                callback.on_eval_progress(loop, done, total)

        for k, (server, evaluator) in enumerate(zip(loop.trainer.servers(), self.evaluators)):
            loop.emit(evaluator(server, loop.round, train_too, final=final,
                                progress=progress), k)

    def on_start(self, loop: Loop) -> None:
        if self.every and loop.round == 0:
            self.evaluate(loop, train_too=False)

    def on_round_end(self, loop: Loop) -> None:
        if self.every and loop.round % self.every == 0:
            self.evaluate(loop, train_too=False)

    def on_end(self, loop: Loop) -> None:
        self.evaluate(loop, train_too=True, final=True)


class _MemberFiles(Callback):
    """Writes one member's records to files (`open`, `write`, `close`), from `on_start`, or
    when `lazy` once the first round has trained (so that a run refused while compiling
    writes nothing); records made before are written then."""

    def __init__(self, member: int | None, lazy: bool):
        self.member, self.lazy = member, lazy
        self.opened = False
        self.pending: list[dict[str, Any]] = []
        self.log: rundir.MetricsLog | rundir.TensorBoardLog | None = None

    def open(self) -> None: ...

    def write(self, record: dict[str, Any]) -> None:
        assert self.log is not None
        self.log.write(record)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

    def on_start(self, loop: Loop) -> None:
        if not self.lazy:
            self.open()
            self.opened = True

    def on_record(self, loop: Loop, record: dict[str, Any]) -> None:
        if self.member is not None:
            if record.get("member") != self.member:
                return
            record = {k: v for k, v in record.items() if k != "member"}
        self.pending.append(record)
        if not self.opened and record["kind"] == "train":
            self.open()
            self.opened = True
        if self.opened:
            for pending in self.pending:
                self.write(pending)
            self.pending = []

    def on_close(self, loop: Loop) -> None:
        if self.opened:
            self.close()


class RunDirOwner(Callback):
    """Owns the run directory while the loop runs (`rundir.RunDirLock` on `out_dir/.lock`):
    from `on_start` (when `lazy`, from the first round's metrics, so that a sweep refused
    while compiling writes nothing) to `on_close`. Another process (or run) that owns it
    makes `on_start` raise `ConfigError` ("OUT is in use by process N"). A `new_run` then
    checks, under the lock, that `out_dir` holds no run (`rundir.check_out`: one that
    finished meanwhile) and none of the files `holds`.

    Args:
      out_dir: the run directory.
      new_run: a new run (not a resume).
      lazy: take the lock once the first round has trained.
      holds: names of files whose presence means `out_dir` holds a run (a sweep's
        sweep.json).
    """

    def __init__(self, out_dir: Path, *, new_run: bool = True, lazy: bool = False,
                 holds: tuple[str, ...] = ()):
        self.lock = rundir.RunDirLock(Path(out_dir))
        self.new_run, self.lazy, self.holds = new_run, lazy, holds
        self.held = False

    def take(self) -> None:
        """Takes the lock and checks the directory (releasing the lock if refused)."""
        self.lock.acquire()
        try:
            rundir.check_out(self.lock.run_dir, new_run=self.new_run, owned=True,
                             holds=self.holds)
        except BaseException:
            self.lock.release()
            raise
        self.held = True

    def on_start(self, loop: Loop) -> None:
        if not self.lazy:
            self.take()

    def on_metrics(self, loop: Loop, metrics: list[dict[str, float]]) -> None:
        if not self.held:
            self.take()

    def on_close(self, loop: Loop) -> None:
        self.lock.release()
        self.held = False


class RunLog(_MemberFiles):
    """The run directory (`fedjax_api.rundir`): config.json (the config, `versions()` and
    the "status": "starting" until the first round's record is logged, then "started")
    and config.toml at the start of a new run, and every record in metrics.jsonl, train.csv
    and eval.csv.

    A resumed run's config.json and config.toml take the options it changed (`fedjax
    resume --rounds 5 --allow-changes rounds`), so `fedjax report` and the next resume see
    the run as it now is; its metrics.jsonl gets back the records of the checkpointed
    rounds that a torn last line lost (from the checkpoint's history).

    Args:
      out_dir: the run directory.
      config: the run's config (`ExperimentConfig.to_dict()`, maybe with "resolved").
      resume_round: when resuming from this round: keep the records up to it and append.
      member: the sweep member whose records these are, or None (the run's).
      lazy: open once the first round has trained, replacing a stale metrics.jsonl.
      root: the folder `out_dir` is made in (a sweep's): no folder between them may be a
        link.
    """

    def __init__(self, out_dir: Path, config: dict[str, Any], *,
                 resume_round: int | None = None, member: int | None = None,
                 lazy: bool = False, root: Path | None = None):
        super().__init__(member, lazy)
        self.out_dir, self.config, self.resume_round = Path(out_dir), config, resume_round
        self.root = root
        self.log: rundir.MetricsLog | None = None
        self.restore: list[dict[str, Any]] | None = None
        self.starting: dict[str, Any] | None = None  # config.json until round 1 is logged

    def on_start(self, loop: Loop) -> None:
        if self.resume_round is not None:
            self.restore = list(loop.history)  # the checkpoint's records
        super().on_start(loop)

    def open(self) -> None:
        if self.root is not None:
            with rundir.refuse_links():
                atomic.make_dir(self.out_dir, root=self.root)
        if self.resume_round is None:
            rundir.check_writable_dir(self.out_dir)
            self.starting = {**self.config, "versions": versions()}
            rundir.write_json_atomic(self.out_dir / rundir.CONFIG_FILE,
                                     {**self.starting, "status": rundir.STATUS_STARTING})
            if self.config:  # the same config as TOML, to re-run with `fedjax run --config`
                atomic.write_text(self.out_dir / "config.toml",
                                         configfile.dump(self.config))
            if self.lazy:
                (self.out_dir / rundir.METRICS_FILE).unlink(missing_ok=True)
        else:
            self._update_config()
        self.log = rundir.MetricsLog(self.out_dir, truncate_after_round=self.resume_round,
                                     restore=self.restore)

    def write(self, record: dict[str, Any]) -> None:
        super().write(record)
        if self.starting is not None and record.get("kind") == "train":
            rundir.write_json_atomic(self.out_dir / rundir.CONFIG_FILE,
                                     {**self.starting, "status": rundir.STATUS_STARTED})
            self.starting = None

    def _update_config(self) -> None:
        """Writes the options this resumed run changed into config.json and config.toml."""
        path = self.out_dir / rundir.CONFIG_FILE
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # resume_config read it; a file gone since is not rewritten here
        if not isinstance(saved, dict):
            return
        kept = ()
        if saved.get("dp_epsilon") is not None and self.config.get("dp_epsilon") is None:
            # A private run resumes with the noise it was calibrated with (resume_config);
            # config.json keeps the epsilon target.
            kept = ("dp_epsilon", "noise_multiplier", "resolved")
        changed = {k: v for k, v in self.config.items()
                   if k in saved and saved[k] != v and k not in kept and k != "out"}
        if not changed:
            return
        saved.update(changed)
        rundir.write_json_atomic(path, saved)
        atomic.write_text(self.out_dir / "config.toml", configfile.dump(
            {k: v for k, v in saved.items() if k not in ("versions", "status")}))


class TensorBoard(_MemberFiles):
    """TensorBoard event files of every metric under `out_dir/tb/` (`rundir.TensorBoardLog`;
    the `tensorboard` extra). Arguments as `RunLog`'s."""

    def __init__(self, out_dir: Path, *, resume_round: int | None = None,
                 member: int | None = None, lazy: bool = False):
        super().__init__(member, lazy)
        self.out_dir, self.resume_round = Path(out_dir), resume_round
        self.log: rundir.TensorBoardLog | None = None

    def open(self) -> None:
        self.log = rundir.TensorBoardLog(self.out_dir, self.resume_round)


class Checkpoint(Callback):
    """Checkpoints the server (`Server.save_checkpoint`) every `every` rounds (0: never
    but) after the last round and when interrupted, keeping the newest `keep`; the manifest
    holds `config`, `versions()`, the metric history and the sampler's position."""

    def __init__(self, out_dir: Path, *, every: int, keep: int, config: dict[str, Any],
                 seed: int):
        self.out_dir, self.every, self.keep = Path(out_dir), every, keep
        self.config, self.seed = config, seed
        self.saved: int | None = None

    def save(self, loop: Loop) -> None:
        """Writes the checkpoint of `loop.round` (once per round)."""
        if self.saved == loop.round:
            return
        meta = {"config": self.config, "versions": versions(), "history": loop.history,
                "sampler": {"seed": self.seed, "next_round": loop.round}}
        loop.server.save_checkpoint(self.out_dir, meta, keep=self.keep)
        self.saved = loop.round

    def on_round_end(self, loop: Loop) -> None:
        if self.every and loop.round % self.every == 0:
            self.save(loop)

    def on_interrupt(self, loop: Loop) -> None:
        self.save(loop)

    def on_end(self, loop: Loop) -> None:
        self.save(loop)


class PrivacyLedger(Callback):
    """Adds `privacy/epsilon`, the epsilon spent so far, to the train records: every round
    with the RDP accountant; with PLD (a fraction of a second per query) at the evaluation
    rounds (`every`) and the last.

    Args:
      ledger: `fedjax_core.privacy.PrivacyLedger` of the run.
      every: the evaluation period (0: none).
    """

    def __init__(self, ledger: Any, every: int):
        self.ledger, self.every = ledger, every

    def on_metrics(self, loop: Loop, metrics: list[dict[str, float]]) -> None:
        r = loop.round
        if self.ledger.accountant == "rdp" or r == loop.rounds or (
                self.every and r % self.every == 0):
            for m in metrics:
                m["privacy/epsilon"] = self.ledger.epsilon_after(r)


class NonFiniteGuard(Callback):
    """Watches the metrics `names` of every round for NaN or infinity.

    With `stop`, raises `NonFiniteError` naming the round, the metric and the last good
    checkpoint in `out_dir`; otherwise (a sweep) records the member's first such round in
    `diverged` and lets it train on.
    """

    def __init__(self, names: tuple[str, ...] = ("train/delta_norm", "train/loss"), *,
                 stop: bool = True, out_dir: Path | None = None):
        self.names, self.stop, self.out_dir = names, stop, out_dir
        self.diverged: dict[int, int] = {}

    def on_metrics(self, loop: Loop, metrics: list[dict[str, float]]) -> None:
        for k, m in enumerate(metrics):
            bad = [(n, m[n]) for n in self.names if n in m and not math.isfinite(m[n])]
            if bad and not self.stop:
                self.diverged.setdefault(k, loop.round)
            elif bad:
                name, value = bad[0]
                where = "no checkpoint was written yet"
                found = checkpoint.list_checkpoints(self.out_dir) if self.out_dir else []
                if found:
                    where = f"the last good checkpoint is {found[-1][1]} (round {found[-1][0]})"
                raise NonFiniteError(
                    f"round {loop.round}: {name} is {value}; the run stopped and {where}. "
                    "Lower the learning rate or clip updates, or pass "
                    "--skip-nonfinite-clients to drop diverging clients")


class TimeLimit(Callback):
    """Interrupts the run (with a checkpoint; `TimeLimitReached`) after the round during
    which `seconds` have passed since it started (or resumed)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()

    def on_start(self, loop: Loop) -> None:
        self.start = time.perf_counter()

    def on_round_end(self, loop: Loop) -> None:
        if time.perf_counter() - self.start >= self.seconds:
            loop.interrupt(TimeLimitReached)
