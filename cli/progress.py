"""The progress bar of `fedjax run`, `fedjax resume` and `fedjax sweep`: a loop callback.

A long evaluation (at least `EVAL_BAR_MIN_EXAMPLES` examples, still running after
`EVAL_BAR_AFTER_S` seconds) gets a second bar of its own: examples done, examples per
second and the time left; it goes away when the pass ends.
"""

import math
import time
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from cli.common import console
from fedjax_api.callbacks import Callback
from fedjax_api.loop import Loop

EVAL_BAR_MIN_EXAMPLES = 10_000
"""An evaluation pass of fewer examples never shows its bar."""

EVAL_BAR_AFTER_S = 2.0
"""An evaluation pass shows its bar once it has run this long."""


def _clock(seconds: float) -> str:
    """`83.2` -> `1:23`, `3725` -> `1:02:05`."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class ProgressBar(Callback):
    """Round, loss (a sweep's best), rounds per second and elapsed time; "compiling..."
    during the first round, "evaluating..." during the final evaluation; a line per
    intermediate evaluation with the test accuracy (a sweep's best, with its member); for
    a long evaluation pass, a second bar of examples with the time left.

    Args:
      rounds: the run's last round.
      labels: a sweep's member labels; None for one run.
    """

    def __init__(self, rounds: int, labels: list[str] | None = None):
        self.rounds, self.labels = rounds, labels
        self.members = len(labels) if labels else 1
        self.loss_word = "best loss" if labels else "loss"
        self.progress = Progress(
            TextColumn("{task.description}"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.fields[loss]}"),
            TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"), console=console, transient=False)
        self.bar = self.progress.add_task("round", total=rounds, loss=f"{self.loss_word} -",
                                          speed="", note="compiling...")
        self.eval_bar: TaskID | None = None
        self.eval_start: float | None = None  # the pass's start
        self.eval_first: tuple[float, int] | None = None  # its first progress report
        self.losses: dict[int, list[float]] = {}
        self.evals: dict[int, list[tuple[float | None, int]]] = {}
        self.first: tuple[float, int] | None = None

    def on_start(self, loop: Loop) -> None:
        self.progress.start()

    def on_record(self, loop: Loop, record: dict[str, Any]) -> None:
        r = record["round"]
        if record["kind"] == "train":
            self.losses.setdefault(r, []).append(record.get("train/loss", math.nan))
            if len(self.losses[r]) < self.members:
                return
            finite = [v for v in self.losses.pop(r) if math.isfinite(v)]
            if self.first is None:
                self.first, speed = (time.perf_counter(), r), ""
            else:
                rate = (r - self.first[1]) / (time.perf_counter() - self.first[0])
                speed = f"{rate:.2f} rounds/s"
            self.progress.update(self.bar, completed=r, speed=speed,
                                 loss=f"{self.loss_word} "
                                      + (f"{min(finite):.4f}" if finite else "nan"),
                                 note="evaluating..." if r == self.rounds else "")
        elif r < self.rounds and not self.labels:  # (the final evaluation is tabled)
            if record.get("test/accuracy") is not None:
                self.progress.console.print(f"round {r}: test accuracy "
                                            f"{record['test/accuracy']:.4f}")
        elif r < self.rounds:
            self.evals.setdefault(r, []).append((record.get("test/accuracy"), record["member"]))
            if len(self.evals[r]) < self.members:
                return
            scored = [(a, m) for a, m in self.evals.pop(r) if a is not None and math.isfinite(a)]
            if scored and self.labels:
                acc, best = max(scored)
                self.progress.console.print(f"round {r}: best test accuracy {acc:.4f} "
                                            f"({self.labels[best]})", highlight=False)

    def on_eval_progress(self, loop: Loop, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == 0 or self.eval_start is None:  # a new pass
            self.eval_start, self.eval_first = now, None
        if done >= total:
            if self.eval_bar is not None:
                self.progress.remove_task(self.eval_bar)
            self.eval_bar = self.eval_start = self.eval_first = None
            return
        if done > 0 and self.eval_first is None:  # rate from here: compilation excluded
            self.eval_first = (now, done)
        if self.eval_bar is None:
            if total < EVAL_BAR_MIN_EXAMPLES or now - self.eval_start < EVAL_BAR_AFTER_S:
                return
            self.eval_bar = self.progress.add_task("eval examples", total=total, loss="",
                                                   speed="", note="")
        speed = note = ""
        if self.eval_first is not None and now > self.eval_first[0] and done > self.eval_first[1]:
            rate = (done - self.eval_first[1]) / (now - self.eval_first[0])
            speed, note = f"{rate:,.0f} examples/s", f"ETA {_clock((total - done) / rate)}"
        self.progress.update(self.eval_bar, completed=done, speed=speed, note=note)

    def on_end(self, loop: Loop) -> None:
        self.progress.update(self.bar, note="")

    def on_close(self, loop: Loop) -> None:
        self.progress.stop()
