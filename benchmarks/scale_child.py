"""The child process of `benchmarks/scale.py`: the real `fedjax` command line, measured.

Two modes, each writing one JSON object to `STATS` when the process ends:

    python -m benchmarks.scale_child STATS open DIR [TASK]
        opens the task's files in DIR as `fedjax run` does (the task's loader: both splits'
        id/size index, the word counts), and records the seconds and the bytes read
        (`rchar` of /proc/self/io: every read and pread, whether or not from the page cache).

    python -m benchmarks.scale_child STATS run ARGS...
        runs `fedjax run ARGS...` in this process (`cli.entry.main`, the console script), and
        records the process's bytes read and peak RSS (`VmHWM`), the seconds and bytes of
        `Experiment.from_config` (the task's files opened, the model built), and the round
        loop's host work (`RunResult.host`: seconds spent sampling and packing cohorts).

Both modes add the task `stackoverflow-small` to the registry before the command line
starts (it exists only in these processes): the `stackoverflow` task's files and
preprocessing with a small model, FedJAX's LSTM architecture at embedding 8 and hidden
size 16 (vocabulary 10,004 ids as the task's; 171,804 parameters against 4,050,748), for
the 1M-client population.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from typing import Any

SMALL_TASK = "stackoverflow-small"
"""The small-model Stack Overflow task these processes register."""
STATS: dict[str, Any] = {}


def proc_io() -> dict[str, int]:
    """This process's `/proc/self/io` counters (`rchar`, `read_bytes`, ...); {} off Linux."""
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        return {}


def vm_hwm_bytes() -> int | None:
    """Peak resident set size of this process (`VmHWM`), bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def register_small_task() -> None:
    """Registers `stackoverflow-small`: the stackoverflow task with a small LSTM."""
    from fedjax_api.tasks import registry
    from fedjax_core.models.stackoverflow_lstm import stackoverflow_lstm

    base = registry.entry("stackoverflow")

    def load(data_path: str | None) -> registry.Loaded:
        loaded = base.load(data_path)
        model = stackoverflow_lstm(vocab_size=10000, embed_size=8, hidden_size=16,
                                   expected_length=13.3)
        return loaded._replace(model=model)

    registry.register(registry.TaskEntry(
        name=SMALL_TASK, description="Stack Overflow files with a small LSTM (embedding 8, "
        "hidden 16): benchmarks/scale.py only", source=base.source, defaults=base.defaults,
        load=load))


def _dump(path: str) -> None:
    STATS["rchar"] = proc_io().get("rchar")
    STATS["read_bytes"] = proc_io().get("read_bytes")
    STATS["vm_hwm_bytes"] = vm_hwm_bytes()
    with open(path, "w") as f:
        json.dump(STATS, f)


def open_only(data_dir: str, task: str) -> None:
    """Times the task's loader on `data_dir` (what `fedjax run` does before training)."""
    from fedjax_api.tasks import registry

    before = proc_io().get("rchar", 0)
    t = time.perf_counter()
    loaded = registry.entry(task).load(data_dir)
    STATS["open_s"] = time.perf_counter() - t
    STATS["open_rchar"] = proc_io().get("rchar", 0) - before
    STATS["train_clients"] = len(loaded.train.client_ids)
    STATS["test_clients"] = len(loaded.test.client_ids)
    STATS["train_examples"] = int(loaded.train.client_sizes.sum())


def instrument() -> None:
    """Wraps `Experiment.from_config` (seconds, bytes read) and `Experiment.run` (host work)."""
    from fedjax_api.experiment import Experiment

    from_config, run = Experiment.from_config.__func__, Experiment.run

    def timed_from_config(cls, *args, **kwargs):
        before = proc_io().get("rchar", 0)
        t = time.perf_counter()
        try:
            return from_config(cls, *args, **kwargs)
        finally:
            STATS["from_config_s"] = time.perf_counter() - t
            STATS["from_config_rchar"] = proc_io().get("rchar", 0) - before

    def measured_run(self, *args, **kwargs):
        result = run(self, *args, **kwargs)
        STATS["host"] = dict(result.host)
        return result

    Experiment.from_config = classmethod(timed_from_config)  # type: ignore[method-assign]
    Experiment.run = measured_run  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in ("open", "run"):
        raise SystemExit("usage: python -m benchmarks.scale_child STATS open DIR [TASK] | "
                         "STATS run ARGS...")
    stats_path, mode, rest = argv[0], argv[1], argv[2:]
    STATS["mode"] = mode
    atexit.register(_dump, stats_path)
    register_small_task()
    if mode == "open":
        open_only(rest[0], rest[1] if len(rest) > 1 else "stackoverflow")
        return
    instrument()
    from cli.entry import main as fedjax_main

    sys.argv = ["fedjax", "run", *rest]
    os.environ.setdefault("COLUMNS", "120")
    fedjax_main()


if __name__ == "__main__":
    main(sys.argv[1:])
