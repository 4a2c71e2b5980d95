"""`--eval-test-clients N` / `--final-eval`: periodic evaluations on a fixed sample of test
clients (the same at every evaluation and after a resume, equal to a full evaluation
restricted to those clients), the final one on all of them; config.json, the report and the
command line say so; bad values are one line and exit 2."""

import json

import attrs
import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from fedjax_api import Experiment, config, tasks
from fedjax_api.callbacks import Evaluator
from fedjax_api.errors import ConfigError
from fedjax_api.experiment import TimeLimitReached
from fedjax_api.report import eval_sample, load_run
from fedjax_api.resume import resume_config
from fedjax_api.server import Server
from fedjax_core import evaluate as core_evaluate
from fedjax_core.data import InMemoryFederatedData
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients

NAME = "tiny-eval-sample"
TEST_SIZES = (3, 4, 1, 6, 2, 5, 3, 2, 7, 1, 4, 2)  # 12 test clients, 40 examples


def _load(data_path):
    return tasks.Loaded(tiny_softmax_model(), unequal_clients(sizes=(5, 2, 9, 1, 4, 7), seed=0),
                        unequal_clients(sizes=TEST_SIZES, seed=1))


@pytest.fixture(autouse=True, scope="module")
def _task():
    tasks.register(tasks.TaskEntry(
        name=NAME, description="tiny task with 12 test clients", source="tests",
        defaults=tasks.TaskDefaults(algorithm="fedavg", rounds=3, clients_per_round=3,
                                    batch_size=2, epochs=1, client_lr=0.5,
                                    server_lr={"fedavg": 1.0}, eval_batch_size=4,
                                    eval_train_clients=4, eval_every=1,
                                    eval_test_clients=5),
        load=_load))
    yield
    del tasks.TASKS[NAME]


def strip_times(history):
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in history]


@pytest.fixture(scope="module")
def default_run(_task):
    """The task's defaults (3 rounds, no run directory): run once; the next test checks it,
    and the resume test compares its resumed run with it (the uninterrupted run)."""
    exp = Experiment.from_config(config.resolve(NAME, checkpoint_every=0))
    return exp, exp.run()


def test_the_task_default_samples_every_periodic_evaluation_and_the_final_one_is_full(
        default_run):
    exp, result = default_run
    assert exp.eval_test_clients == 5 and exp.final_eval == "full"
    evals = [r for r in result.history if r["kind"] == "eval"]
    assert [r["round"] for r in evals] == [0, 1, 2, 3]
    sample = exp.evaluator().test_sample()
    ids = sample.data.client_ids
    assert len(ids) == 5 and len(set(ids)) == 5
    n_sample = int(np.sum(sample.data.client_sizes))
    for r in evals[:-1]:
        assert (r["test_clients"], r["test_clients_total"]) == (5, 12)
        assert r["test/num_examples"] == n_sample
    assert "test_clients" not in evals[-1] and "test_clients_total" not in evals[-1]
    assert evals[-1]["test/num_examples"] == sum(TEST_SIZES)  # the final one: every client
    # A sampled evaluation is the full evaluation restricted to the sample's clients.
    sub = InMemoryFederatedData({cid: exp.task.test.data.get_client(
        exp.task.test.data.client_ids.index(cid)) for cid in ids})
    by_hand = core_evaluate.evaluate(exp.task.model, result.server.params, sub, 4)
    record = exp.evaluator()(result.server, 3, train_too=False)
    assert record["test_clients"] == 5
    for name in ("accuracy", "loss", "num_examples"):
        assert record[f"test/{name}"] == pytest.approx(by_hand[name], rel=1e-6)
    full = core_evaluate.evaluate(exp.task.model, result.server.params, exp.task.test.data, 4)
    assert result.final["test"]["loss"] == pytest.approx(full["loss"], rel=1e-6)


def test_the_sample_is_drawn_from_the_seed_alone_and_sampled_once():
    task = tasks.get(NAME)
    exp = Experiment.from_config(config.resolve(NAME, seed=3))
    first = exp.evaluator().test_sample().data.client_ids
    assert exp.evaluator().test_sample().data.client_ids == first  # a new evaluator: same
    assert list(first) == sorted(first, key=list(task.test.data.client_ids).index)
    other = Experiment.from_config(config.resolve(NAME, seed=4)).evaluator().test_sample()
    assert other.data.client_ids != first  # another seed, another sample
    train = exp.evaluator()  # apart from the training-client sample's stream
    assert train.task.train_eval.subset(5, seed=3).data.client_ids != first or \
        len(task.train.data.client_ids) != len(task.test.data.client_ids)
    assert exp.evaluator().test_sample(final=True) is exp.task.test
    sampled_final = Experiment.from_config(config.resolve(NAME, seed=3, final_eval="sampled"))
    assert sampled_final.evaluator().test_sample(final=True).data.client_ids == first


def test_the_sample_is_the_same_after_a_resume(tmp_path, default_run):
    out = tmp_path / "run"
    cfg = config.resolve(NAME, rounds=3, time_limit=1e-9, checkpoint_every=0, out=str(out))
    with pytest.raises(TimeLimitReached):
        Experiment.from_config(cfg).run()
    longer = resume_config(out, {"time_limit": 3600.0}, ("time_limit",))
    resumed = Experiment.from_config(longer, resuming=True).run(resume=True)
    straight = default_run[1]  # the same 3 rounds uninterrupted (no run directory either way)
    assert strip_times(resumed.history) == strip_times(straight.history)
    assert [r.get("test_clients") for r in resumed.history if r["kind"] == "eval"] == [
        5, 5, 5, None]


def test_zero_none_and_too_many_evaluate_the_whole_test_set_as_before():
    exp = Experiment.from_config(config.resolve(NAME))
    server = Server.create(exp.algorithm, exp.task.model, seed=0)
    plain = Evaluator(task=exp.task, eval_train_clients=4)(server, 1, train_too=True)
    assert "test_clients" not in plain
    assert plain["test/num_examples"] == sum(TEST_SIZES)
    for n in (0, 12, 1000):
        record = attrs.evolve(exp.evaluator(), eval_test_clients=n)(server, 1, train_too=True)
        assert strip_times([record]) == strip_times([plain])


def test_final_eval_sampled_keeps_the_sample_to_the_end():
    result = Experiment.from_config(config.resolve(NAME, rounds=2,
                                                   final_eval="sampled")).run()
    evals = [r for r in result.history if r["kind"] == "eval"]
    assert [r["test_clients"] for r in evals] == [5, 5, 5]
    assert "accuracy" in result.final["train"]


def test_config_json_the_report_and_the_command_line_state_the_sample(tmp_path):
    out = tmp_path / "r"
    res = CliRunner().invoke(app, ["run", NAME, "--rounds", "2", "--eval-test-clients", "4",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # the console wraps long lines
    assert ("test metrics on a fixed sample of 4 of 12 test clients (seed 0); the final "
            "evaluation on all 12") in text
    assert "test (12 clients)" in text
    saved = json.loads((out / "config.json").read_text())
    assert (saved["eval_test_clients"], saved["final_eval"]) == (4, "full")
    s = eval_sample(load_run(out)[1])
    assert (s["clients"], s["total"], s["sampled_rounds"], s["full_rounds"]) == (4, 12, [0, 1],
                                                                               [2])
    rep = CliRunner().invoke(app, ["report", str(out), "--target", "0.1"])
    assert rep.exit_code == 0, rep.output
    assert ("test metrics at rounds 0 and 1 on a fixed sample of 4 of 12 test clients; at "
            "round 2 on all 12") in " ".join(rep.output.split())


@pytest.mark.parametrize("args, message", [
    (["--eval-test-clients", "-1"], "error: eval-test-clients must be at least 0, got -1"),
    (["--final-eval", "some"], "error: unknown final-eval 'some'"),
])
def test_bad_values_are_one_line_and_exit_2(tmp_path, args, message):
    res = CliRunner().invoke(app, ["run", NAME, "--rounds", "1", *args,
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), res.output
    assert "Traceback" not in res.output


def test_more_than_the_test_clients_is_all_of_them_with_a_note():
    exp = Experiment.from_config(config.resolve(NAME, eval_test_clients=50))
    assert exp.evaluator().describe() == ("--eval-test-clients 50 is at least the 12 test "
                                          "clients: every evaluation uses all of them")
    assert exp.evaluator().test_sample() is exp.task.test
    assert Experiment.from_config(config.resolve(NAME, eval_test_clients=0)).evaluator(
        ).describe() is None
    with pytest.raises(ConfigError, match="eval-test-clients must be at least 0"):
        attrs.evolve(exp, eval_test_clients=-2)
