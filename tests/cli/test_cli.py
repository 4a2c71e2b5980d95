import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.fedjax_api.tiny_task import NAME

runner = CliRunner()


def test_run_success_writes_run_dir_and_table(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", NAME, "--rounds", "3", "--clients-per-round", "2",
                              "--client-lr", "0.3", "--seed", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "metrics after round 3" in res.output and "accuracy" in res.output
    assert "baseline (most frequent class) accuracy: 0.2500" in res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["client_lr"] == 0.3 and cfg["clients_per_round"] == 2 and cfg["seed"] == 1
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["kind"] for x in lines] == ["train"] * 3 + ["eval"]


def test_listings():
    res = runner.invoke(app, ["tasks"])
    assert res.exit_code == 0 and "shakespeare-plays" in res.output
    res = runner.invoke(app, ["algorithms"])
    assert res.exit_code == 0
    from fedjax_core.aggregate.registry import AGGREGATORS
    from fedjax_core.algorithms.registry import ALGORITHMS
    for entry in list(ALGORITHMS.values()) + list(AGGREGATORS.values()):
        line = next(ln for ln in res.output.splitlines() if ln.split()[:1] == [entry.name])
        assert line.split() == [entry.name] + entry.description.split(), entry.name
    assert "proximal_weight=0.01" in res.output and "beta=0.1" in res.output


@pytest.mark.parametrize("args, message", [
    (["run", "no-such-task"], "unknown task 'no-such-task'; choose one of:"),
    (["run", NAME, "--algorithm", "fedmagic"], "unknown algorithm 'fedmagic'; did you mean 'fedavg'? choose one of:"),
    (["run", NAME, "--rounds", "0"], "rounds must be at least 1, got 0"),
    (["run", NAME, "--clients-per-round", "99"], "clients per round must be between 1 and the 6"),
    (["run", NAME, "--client-lr", "-1"], "client-lr must be a non-negative number, got -1.0"),
    (["run", NAME, "--server-lr", "-0.5"], "server-lr must be a non-negative number, got -0.5"),
])
def test_bad_input_one_line_exit_2(args, message, tmp_path):
    res = runner.invoke(app, args + ["--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "x").exists()


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = runner.invoke(app, ["run", NAME, "--out", str(blocker / "run")])
    assert res.exit_code == 2 and "cannot write to output directory" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("argv, message", [
    (["run", NAME, "--rounds", "abc"], "Invalid value for '--rounds'"),
    (["run", NAME, "--no-such-option"], "No such option: --no-such-option"),
    (["run", "nope"], "unknown task 'nope'"),
])
def test_console_entry_point_one_line(argv, message, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.setattr("sys.argv", ["fedjax", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1


def test_refuses_to_mix_two_runs_in_one_dir(tmp_path):
    args = ["run", NAME, "--rounds", "1", "--out", str(tmp_path / "r")]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "already holds a run" in res.output


@pytest.mark.parametrize("args, metric", [
    (["--algorithm", "scaffold"], "train/control_norm"),
    (["--algorithm", "fedprox", "--option", "proximal_weight=0.5"], "train/delta_norm"),
    (["--algorithm", "ditto", "--option", "lam=0.5"], "train/personal_loss"),
    (["--algorithm", "hypcluster", "--option", "num_clusters=2"], "hypcluster/cluster_0_clients"),
    (["--algorithm", "hypcluster", "--option", "kmeans_init=fedjax"],
     "hypcluster/cluster_1_clients"),
    (["--algorithm", "apfl", "--option", "fedjax_compat=true"], "apfl/mean_alpha"),
    (["--algorithm", "agnostic_fedavg"], "agnostic/domain_weight_1"),
    (["--aggregator", "trimmed_mean", "--aggregator-option", "beta=0.25"], "aggregate/num_trimmed"),
    (["--aggregator", "top_k", "--aggregator-option", "fraction=0.5"], "aggregate/bits_per_round"),
    (["--algorithm", "fedprox", "--aggregator", "attack", "--aggregator-option", "inner=krum",
      "--aggregator-option", "fraction=0.2"], "aggregate/num_attackers"),
])
def test_run_any_algorithm_and_aggregator(args, metric, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", NAME, "--rounds", "2", "--clients-per-round", "4",
                              "--out", str(out)] + args)
    assert res.exit_code == 0, res.output
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metric in records[0]
    assert records[-1]["kind"] == "eval" and 0.0 <= records[-1]["test/accuracy"] <= 1.0
    saved = json.loads((out / "config.json").read_text())
    assert saved["aggregator"] == (args[args.index("--aggregator") + 1]
                                   if "--aggregator" in args else "mean")


@pytest.mark.parametrize("args, message", [
    (["--algorithm", "fedprox", "--option", "mu=0.1"],
     "algorithm 'fedprox' has no option 'mu'; its options are: proximal_weight"),
    (["--option", "lr"], "--option expects NAME=VALUE, got 'lr'"),
    (["--aggregator", "median"], "unknown aggregator 'median';"),
    (["--aggregator", "krum", "--aggregator-option", "f=1"],
     "aggregator 'krum' has no option 'f'; its options are: num_byzantine, multi"),
    (["--algorithm", "scaffold", "--option", "num_clients=5"],
     "num_clients of algorithm 'scaffold' come from the task and config"),
])
def test_bad_algorithm_options_one_line(args, message, tmp_path):
    res = runner.invoke(app, ["run", NAME, "--out", str(tmp_path / "x")] + args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()


def test_private_run_calibrates_and_logs_epsilon(tmp_path):
    out = tmp_path / "dp"
    res = runner.invoke(app, ["run", NAME, "--rounds", "3", "--clients-per-round", "3",
                              "--sampling", "poisson", "--dp-epsilon", "5", "--dp-delta", "1e-3",
                              "--clip", "0.5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "DP-FedAvg: clip 0.5, noise multiplier" in " ".join(res.output.split())
    assert "calibrated for epsilon 5 after 3 rounds, Poisson sampling q = 0.5" in \
        " ".join(res.output.split())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    eps = [r["privacy/epsilon"] for r in records if r["kind"] == "train"]
    assert len(eps) == 3 and abs(eps[-1] - 5.0) < 0.05
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sampling"] == "poisson" and cfg["resolved"]["noise_multiplier"] > 0


def test_private_run_errors_are_one_line(tmp_path):
    res = runner.invoke(app, ["run", NAME, "--dp-epsilon", "2", "--clip", "1",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "needs --dp-delta" in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "x").exists()
