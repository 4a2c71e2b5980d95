"""The progress bar of `fedjax run`, `fedjax resume` and `fedjax sweep`: a loop callback."""

import math
import time
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from cli.common import console
from fedjax_api.callbacks import Callback
from fedjax_api.loop import Loop


class ProgressBar(Callback):
    """Round, loss (a sweep's best), rounds per second and elapsed time; "compiling..."
    during the first round, "evaluating..." during the final evaluation; a line per
    intermediate evaluation with the test accuracy (a sweep's best, with its member).

    Args:
      rounds: the run's last round.
      labels: a sweep's member labels; None for one run.
    """

    def __init__(self, rounds: int, labels: list[str] | None = None):
        self.rounds, self.labels = rounds, labels
        self.members = len(labels) if labels else 1
        self.progress = Progress(
            TextColumn("round"), MofNCompleteColumn(), BarColumn(),
            TextColumn(("best loss" if labels else "loss") + " {task.fields[loss]}"),
            TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"), console=console, transient=False)
        self.bar = self.progress.add_task("train", total=rounds, loss="-", speed="",
                                          note="compiling...")
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
                                 loss=f"{min(finite):.4f}" if finite else "nan",
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

    def on_end(self, loop: Loop) -> None:
        self.progress.update(self.bar, note="")

    def on_close(self, loop: Loop) -> None:
        self.progress.stop()
