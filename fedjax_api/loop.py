"""The training loop: rounds, and callbacks that do everything else.

`Loop.run` samples each round's cohort (ahead, in a background thread: `Prefetcher`), steps
the trainer, and hands the round's metrics and records to its callbacks, which evaluate,
log, checkpoint, account privacy, guard against NaN, show progress and stop the run
(`fedjax_api.callbacks`). `Experiment.run` drives one `Server` with it, `Sweep.run` a
vmapped server of K members; a user's own callbacks join either.

Example:
  >>> class PrintLoss(Callback):
  ...     def on_record(self, loop, record):
  ...         if record["kind"] == "train":
  ...             print(record["round"], record["train/loss"])
  >>> Experiment.from_config(cfg).run(callbacks=[PrintLoss()])
"""

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs

from fedjax_api import distributed
from fedjax_api.prefetch import Prefetcher, to_device
from fedjax_api.server import Server
from fedjax_core.data import Cohort
from fedjax_core.parallel import Plan


class Interrupted(Exception):
    """The run stopped after round `round` at the user's request (Ctrl-C), checkpointed."""

    reason = "interrupted"

    def __init__(self, round_num: int, out_dir: Path | None):
        self.round = round_num
        self.out_dir = out_dir
        resume = f"; resume with: fedjax resume {out_dir}" if out_dir is not None else ""
        super().__init__(f"{self.reason} after round {round_num}{resume}")


class Terminated(Interrupted):
    """The process got SIGTERM (a cluster scheduler's pre-emption) and stopped after round
    `round`, checkpointed; the CLI exits 143 (128 + SIGTERM)."""

    reason = "terminated (SIGTERM)"


class TimeLimitReached(Interrupted):
    """The run reached its time limit (`time_limit`) and stopped after round `round`,
    checkpointed."""

    reason = "time limit reached"


class Trainer(Protocol):
    """What a `Loop` trains: one server, or several (the members of a sweep) stepped as one."""

    @property
    def round(self) -> int: ...

    def step(self, cohort: Any) -> "Trainer":
        """The trainer after one more round on `cohort` (dispatched asynchronously)."""
        ...

    def read_metrics(self) -> list[dict[str, float]]:
        """The last round's metrics, one dict per member (waits for the round)."""
        ...

    def servers(self) -> list[Server]:
        """Each member as a `Server` (to evaluate or checkpoint)."""
        ...


@attrs.frozen
class OneServer:
    """A `Server` as the one member of a `Trainer`."""

    server: Server

    @property
    def round(self) -> int:
        return self.server.round

    def step(self, cohort: Cohort) -> "OneServer":
        return OneServer(self.server.step(cohort))

    def read_metrics(self) -> list[dict[str, float]]:
        return [{k: float(v) for k, v in self.server.metrics.items()}]

    def servers(self) -> list[Server]:
        return [self.server]


class Callback:
    """Something that happens every round, or every N: override the hooks you need.

    Each hook gets the `Loop` (`loop.round`, `loop.rounds`, `loop.server`,
    `loop.history`, `loop.stop(reason)`). In round r (`loop.round` is r once it has
    trained), in this order:

    - `on_metrics(loop, metrics)`: the round's metrics, one dict per member, before they
      are recorded: add metrics, or raise to stop the run;
    - `on_record(loop, record)`: every record, as it is made: the round's "train" record
      (for a sweep, one per member, with `"member": k`), and the evaluations' "eval"
      records;
    - `on_round_end(loop)`: after every round but the last (periodic work);
    - `on_eval_progress(loop, done, total)`: during an evaluation's test pass, examples
      done of the pass's total (a progress bar).

    `on_start` runs before the first round (records made then, like a round-0 evaluation,
    reach `on_record` once every callback has started), `on_interrupt` before the loop
    raises `Interrupted`, `on_end` after the last round (or the round `loop.stop` was asked
    in; the final evaluation's records come first), `on_close` always, last.

    Example:
      >>> class StopAtLoss(Callback):
      ...     def on_record(self, loop, record):
      ...         if record["kind"] == "train" and record["train/loss"] < 0.1:
      ...             loop.stop("loss below 0.1")
    """

    def on_start(self, loop: "Loop") -> None:
        """Before the first round."""

    def on_metrics(self, loop: "Loop", metrics: list[dict[str, float]]) -> None:
        """Round `loop.round` trained: its metrics per member, before they are recorded."""

    def on_record(self, loop: "Loop", record: dict[str, Any]) -> None:
        """A record was made (and appended to its member's history)."""

    def on_round_end(self, loop: "Loop") -> None:
        """After every round but the last, once its records are made."""

    def on_eval_progress(self, loop: "Loop", done: int, total: int) -> None:
        """An evaluation's test pass has evaluated `done` of its `total` examples (called
        after each group of batches, and once with `done == total`)."""

    def on_interrupt(self, loop: "Loop") -> None:
        """The run is interrupted after `loop.round` (Ctrl-C, `interrupt`, a time limit)."""

    def on_end(self, loop: "Loop") -> None:
        """After the last round (`loop.rounds`, or earlier when `loop.stop` was asked)."""

    def on_close(self, loop: "Loop") -> None:
        """Last, whether the run ended, stopped or failed."""


class OnRecord(Callback):
    """A function called with every record: `OnRecord(print)`."""

    def __init__(self, fn: Callable[[dict[str, Any]], Any]):
        self.fn = fn

    def on_record(self, loop: "Loop", record: dict[str, Any]) -> None:
        self.fn(record)


class Loop:
    """The round loop of one run (or of a sweep's members, trained as one).

    Args:
      trainer: what is trained (`OneServer(server)`, or a sweep's vmapped server); it
        starts at its `round` (a resumed run's).
      rounds: train up to this round.
      sample: `sample(r)`: round r's cohort; called ahead of time in a background thread,
        so it must depend on r only.
      callbacks: the callbacks, in the order their hooks run.
      members: None for one run; K for a sweep (records then carry `"member": k`).
      histories: each member's records so far (a resumed run's), appended to.
      out_dir: the run directory (named by `Interrupted`), or None.
      interrupt_event: set (by Ctrl-C, or `interrupt`) to stop after the current round.
      prefetch_depth: how many cohorts the background thread prepares ahead.

    Attributes:
      trainer, round, rounds, histories, out_dir: as above, `round` the last trained.
      stopped: the reason a callback gave `stop`, or None.
      host: after `run`: `{"host_s", "wait_s", "hidden_fraction"}` of the sampling thread.
    """

    def __init__(self, trainer: Trainer, *, rounds: int, sample: Callable[[int], Any],
                 callbacks: Sequence[Callback] = (), members: int | None = None,
                 histories: list[list[dict]] | None = None, out_dir: Path | None = None,
                 interrupt_event: threading.Event | None = None, prefetch_depth: int = 2):
        self.trainer = trainer
        self.round = trainer.round
        self.rounds = rounds
        self.sample = sample
        self.callbacks = list(callbacks)
        self.members = members
        self.histories = histories or [[] for _ in range(members or 1)]
        self.out_dir = out_dir
        self.interrupt_event = interrupt_event or threading.Event()
        self.prefetch_depth = prefetch_depth
        self.stopped: str | None = None
        self.host: dict[str, float] = {}
        self._error: type[Interrupted] | None = None
        self._held: list[dict[str, Any]] | None = None  # records made while starting

    @property
    def server(self) -> Server:
        """The (first member's) server after the last round trained."""
        return self.trainer.servers()[0]

    @property
    def history(self) -> list[dict]:
        """The (first member's) records so far."""
        return self.histories[0]

    def emit(self, record: dict[str, Any], member: int = 0) -> None:
        """Appends `record` to `member`'s history and hands it to every `on_record`."""
        self.histories[member].append(record)
        if self.members is not None:
            record = {**record, "member": member}
        if self._held is not None:
            self._held.append(record)
        else:
            self._each("on_record", record)

    def stop(self, reason: str) -> None:
        """Ends the run after this round, as if it were the last (final evaluation and
        checkpoint included); `stopped` keeps the reason."""
        self.stopped = reason

    def interrupt(self, error: type[Interrupted] = Interrupted) -> None:
        """Stops after this round with a checkpoint and raises `error` (what Ctrl-C does)."""
        self._error = error
        self.interrupt_event.set()

    def run(self) -> Trainer:
        """Trains rounds `trainer.round + 1 .. rounds` and returns the trainer after them."""
        start_round = self.round
        wall_before = max([r.get("wall_time_s", 0.0) for r in self.histories[0]], default=0.0)
        run_start = time.perf_counter()
        cohorts = None
        try:
            with _stop_on_sigint(self.interrupt_event, self._terminated):
                self._held = []
                self._each("on_start")  # every callback starts before a record reaches one
                held, self._held = self._held, None
                for record in held:
                    self._each("on_record", record)
                cohorts = Prefetcher(self.sample, start_round, self.rounds,
                                     depth=self.prefetch_depth)
                # Round r + 1 is dispatched before round r's metrics are read (which waits
                # for it) and before its callbacks run, so the device never idles on the
                # host. The callbacks see round r's trainer (`self.trainer`); when they stop
                # the run, the round dispatched ahead is dropped unread.
                done = None  # (trainer, start time) of the round trained but not yet read
                for r in range(start_round, self.rounds):
                    t0 = time.perf_counter()
                    ahead = (done[0] if done else self.trainer).step(cohorts.get(r))
                    if done is not None and not self._finish(*done, wall_before, run_start):
                        done = None
                        break
                    done = (ahead, t0)
                if done is not None:
                    self._finish(*done, wall_before, run_start)
                self._each("on_end")
        finally:
            if cohorts is not None:
                cohorts.close()
                self.host = {"host_s": cohorts.host_s, "wait_s": cohorts.wait_s,
                             "hidden_fraction": cohorts.hidden_fraction}
            self._each("on_close")
        return self.trainer

    def _finish(self, trainer: Trainer, t0: float, wall_before: float,
                run_start: float) -> bool:
        """Reads the metrics of the round `trainer` trained and runs the callbacks of that
        round; False when the run ends after it (the last round, or stopped)."""
        self.trainer, self.round = trainer, trainer.round
        metrics = trainer.read_metrics()
        self._each("on_metrics", metrics)
        now = time.perf_counter()
        for k, values in enumerate(metrics):
            self.emit({"round": self.round, "kind": "train", **values, "round_time_s": now - t0,
                       "wall_time_s": wall_before + now - run_start}, k)
        if self.round == self.rounds or self.stopped:
            return False
        self._each("on_round_end")
        if self.stopped:
            return False
        if self.interrupt_event.is_set():
            self._each("on_interrupt")
            raise (self._error or Interrupted)(self.round, self.out_dir)
        return True

    def _terminated(self) -> None:
        """SIGTERM: stop as Ctrl-C does, raising `Terminated`."""
        self._error = self._error or Terminated

    def _each(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def final_metrics(history: list[dict]) -> dict[str, dict[str, float]]:
    """`{"test": {...}, "train": {...}}` of a run's last record (its final evaluation)."""
    last = history[-1] if history else {}
    return {split: {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith(split + "/")}
            for split in ("test", "train")}


def cohort_sampler(train: Any, clients_per_round: int, sampling: str,
                   plan: Plan, source: Callable[[int], Cohort] | None = None
                   ) -> Callable[[int], Cohort]:
    """`sample(r)`: round r's cohort of `train` (a `FederatedDataset`), `clients_per_round`
    clients uniformly without replacement, or each with probability clients_per_round / N
    ("poisson"); with a mesh across processes, this process packs its devices' share.
    `source(r)`, when given (the simulated clock's `sample`), packs the cohorts instead; they
    are moved to the devices the same way."""
    rate = clients_per_round / train.num_clients
    if getattr(train, "device_resident", False):
        train.place_examples(plan)  # once, on the mesh: rounds do not copy them again

    def sample(round_num: int) -> Cohort:
        if source is not None:
            return to_device(source(round_num), plan)
        if distributed.spans_processes(plan):
            if sampling == "poisson":
                idx, size = train.poisson_indices(rate, round_num)
            else:
                idx, size = train.sample_indices(clients_per_round, round_num), None
            return distributed.sample_cohort(train, idx, round_num, plan, pad_to=size)
        if sampling == "poisson":
            return to_device(train.sample_poisson(rate, round_num), plan)
        return to_device(train.sample(clients_per_round, round_num), plan)

    return sample


@contextlib.contextmanager
def _stop_on_sigint(stop: threading.Event,
                    on_term: Callable[[], None] | None = None) -> Iterator[None]:
    """The first Ctrl-C (or SIGTERM, which also calls `on_term`) sets `stop` (the loop
    finishes the round and checkpoints); a second one interrupts at once
    (`KeyboardInterrupt`). Only in the main thread (signal handlers live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            for s, h in previous.items():
                signal.signal(s, h)
            before = previous[signum]
            if callable(before):  # e.g. Python's: raises KeyboardInterrupt
                before(signum, frame)
            raise KeyboardInterrupt
        if signum == signal.SIGTERM and on_term is not None:
            on_term()
        stop.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
