"""The one training loop: hook order, a user's callbacks, early stop, the time limit, and
the sweep's members through the same loop."""

import json

import jax
import numpy as np
import optax
import pytest
from typer.testing import CliRunner

from cli.main import app
from fedjax_api import Callback, Experiment, checkpoint, config, tasks
from fedjax_api.experiment import TimeLimitReached
from fedjax_api.loop import Loop
from fedjax_api.resume import resume_config
from fedjax_api.sweep import Sweep
from fedjax_core.algorithms.fedavg import fedavg
from tests.fedjax_api.tiny_task import NAME


class Recorder(Callback):
    """Writes down every hook call: (hook, round[, kind or member count])."""

    def __init__(self):
        self.calls = []

    def on_start(self, loop):
        self.calls.append(("start", loop.round))

    def on_metrics(self, loop, metrics):
        self.calls.append(("metrics", loop.round, len(metrics)))

    def on_record(self, loop, record):
        self.calls.append(("record", record["round"], record["kind"], record.get("member")))

    def on_round_end(self, loop):
        self.calls.append(("round_end", loop.round))

    def on_end(self, loop):
        self.calls.append(("end", loop.round))

    def on_close(self, loop):
        self.calls.append(("close", loop.round))


def strip_times(history):
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in history]


def test_hooks_run_in_order_around_each_round():
    exp = Experiment(task=tasks.get(NAME), algorithm=fedavg(optax.sgd(0.5)), rounds=3,
                     clients_per_round=2, eval_every=2)
    rec = Recorder()
    result = exp.run(callbacks=[rec])
    assert rec.calls == [
        ("start", 0), ("record", 0, "eval", None),
        ("metrics", 1, 1), ("record", 1, "train", None), ("round_end", 1),
        ("metrics", 2, 1), ("record", 2, "train", None), ("record", 2, "eval", None),
        ("round_end", 2),
        ("metrics", 3, 1), ("record", 3, "train", None), ("record", 3, "eval", None),
        ("end", 3), ("close", 3)]
    assert [(r["round"], r["kind"]) for r in result.history] == [
        (c[1], c[2]) for c in rec.calls if c[0] == "record"]
    assert result.stopped is None


class StopAt(Callback):
    def __init__(self, round_num):
        self.round_num = round_num

    def on_record(self, loop, record):
        if record["kind"] == "train" and record["round"] == self.round_num:
            loop.stop(f"stop at {self.round_num}")


def test_a_callback_stops_the_run_early_and_resume_continues_it(tmp_path):
    cfg = config.resolve(NAME, rounds=5, checkpoint_every=0, out=str(tmp_path / "cut"))
    result = Experiment.from_config(cfg).run(callbacks=[StopAt(2)])
    assert result.stopped == "stop at 2" and result.server.round == 2
    assert [(r["round"], r["kind"]) for r in result.history] == [
        (1, "train"), (2, "train"), (2, "eval")]
    assert "accuracy" in result.final["train"] and "accuracy" in result.final["test"]
    assert [r for r, _ in checkpoint.list_checkpoints(tmp_path / "cut")] == [2]

    resumed = Experiment.from_config(resume_config(tmp_path / "cut"), resuming=True).run(
        resume=True)
    straight = Experiment.from_config(config.resolve(NAME, rounds=5)).run()
    jax.tree.map(np.testing.assert_array_equal, resumed.server.state, straight.server.state)
    rounds = [(r["round"], r["kind"]) for r in resumed.history]
    assert rounds == [(1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train"),
                      (5, "train"), (5, "eval")]
    assert strip_times(resumed.history[-1:]) == strip_times(straight.history[-1:])


def test_the_time_limit_checkpoints_stops_and_resumes_bit_identically(tmp_path):
    out = tmp_path / "run"
    cfg = config.resolve(NAME, rounds=4, time_limit=1e-9, checkpoint_every=0, out=str(out))
    with pytest.raises(TimeLimitReached,
                       match=f"time limit reached after round 1; resume with: fedjax resume {out}"):
        Experiment.from_config(cfg).run()
    assert [r for r, _ in checkpoint.list_checkpoints(out)] == [1]
    with pytest.raises(TimeLimitReached, match="after round 2"):  # the same limit again
        Experiment.from_config(resume_config(out), resuming=True).run(resume=True)
    longer = resume_config(out, {"time_limit": 3600.0}, ("time_limit",))
    resumed = Experiment.from_config(longer, resuming=True).run(resume=True)
    straight = Experiment.from_config(config.resolve(NAME, rounds=4)).run()
    jax.tree.map(np.testing.assert_array_equal, resumed.server.state, straight.server.state)
    assert strip_times(resumed.history) == strip_times(straight.history)


def test_the_command_line_exits_3_at_the_time_limit(tmp_path):
    res = CliRunner().invoke(app, ["run", NAME, "--rounds", "3", "--time-limit", "1e-9",
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 3, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    want = f"error: time limit reached after round 1; resume with: fedjax resume {tmp_path / 'r'}"
    assert errors == [want]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["time_limit"] == 1e-9


def test_a_sweep_runs_its_members_through_the_same_loop():
    cfg = config.resolve(NAME, rounds=2, clients_per_round=2, eval_every=1)
    rec = Recorder()
    result = Sweep.grid(cfg, seeds=[0, 1]).run(callbacks=[rec])
    assert rec.calls[:3] == [("start", 0), ("record", 0, "eval", 0), ("record", 0, "eval", 1)]
    assert ("metrics", 1, 2) in rec.calls and ("metrics", 2, 2) in rec.calls
    assert rec.calls[-4:] == [("record", 2, "eval", 0), ("record", 2, "eval", 1), ("end", 2),
                              ("close", 2)]
    for k in (0, 1):
        mine = [(c[1], c[2]) for c in rec.calls if c[0] == "record" and c[3] == k]
        assert mine == [(r["round"], r["kind"]) for r in result.members[k].history]


def test_loop_stop_and_interrupt_are_what_callbacks_call():
    task = tasks.get(NAME)
    exp = Experiment(task=task, algorithm=fedavg(optax.sgd(0.5)), rounds=6, clients_per_round=2)

    class Interrupt(Callback):
        def on_round_end(self, loop: Loop):
            if loop.round == 3:
                loop.interrupt()

    with pytest.raises(Exception, match="interrupted after round 3$"):  # no out_dir: no hint
        exp.run(callbacks=[Interrupt()])


class _Counting:
    """A `Trainer` that logs when each round is dispatched and when its metrics are read."""

    def __init__(self, log, round_num=0):
        self.log, self.round = log, round_num

    def step(self, cohort):
        self.log.append(("step", self.round + 1))
        return _Counting(self.log, self.round + 1)

    def read_metrics(self):
        self.log.append(("read", self.round))
        return [{"train/loss": float(self.round)}]

    def servers(self):
        return []


def test_the_next_round_is_dispatched_before_this_rounds_metrics_are_read():
    log = []

    class StopAfter2(Callback):
        def on_record(self, loop, record):
            log.append(("record", record["round"], loop.trainer.round))
            if record["round"] == 2:
                loop.stop("enough")

    loop = Loop(_Counting(log), rounds=5, sample=lambda r: r, callbacks=[StopAfter2()])
    trainer = loop.run()
    assert log == [("step", 1), ("step", 2), ("read", 1), ("record", 1, 1),
                   ("step", 3), ("read", 2), ("record", 2, 2)]
    assert trainer.round == 2 and loop.round == 2 and loop.stopped == "enough"
    assert [h["round"] for h in loop.history] == [1, 2]
