"""`fedjax sweep`: a tiny sweep prints its table and writes its directory; mistakes are one line."""

import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.fedjax_api.tiny_task import NAME

runner = CliRunner()


def table_rows(output: str) -> list[list[str]]:
    """The body rows of the rich table (cells split on │)."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in output.splitlines()
            if line.count("│") >= 5]


def test_a_tiny_sweep_prints_its_members_best_first(tmp_path):
    out = tmp_path / "sw"
    res = runner.invoke(app, ["sweep", NAME, "--client-lr", "0.05,0.5", "--seeds", "0,1",
                              "--rounds", "2", "--clients-per-round", "2", "--out", str(out)],
                        terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "4 members (client_lr, seed varied), 2 rounds x 2 clients" in res.output
    assert "4 members after round 2, best test/accuracy first" in res.output
    rows = table_rows(res.output)
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    assert sorted((r[1], r[3]) for r in rows) == [("0.05", "0"), ("0.05", "1"), ("0.5", "0"),
                                                  ("0.5", "1")]
    accuracies = [float(r[4]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["status"] == "complete" and len(summary["members"]) == 4
    best = min(summary["members"], key=lambda m: m["rank"])
    assert f"{best['final']['test/accuracy']:.4f}" == rows[0][4]
    assert (out / best["dir"] / "metrics.jsonl").exists()


def test_an_option_list_is_swept_and_ranked_by_loss(tmp_path):
    res = runner.invoke(app, ["sweep", NAME, "--algorithm", "fedavgm", "--option",
                              "momentum=0.0,0.5", "--rounds", "1", "--metric", "test/loss",
                              "--out", str(tmp_path / "sw")], terminal_width=200)
    assert res.exit_code == 0, res.output
    rows = table_rows(res.output)
    assert sorted(r[3] for r in rows) == ["0", "0.5"]  # the momentum column
    losses = [float(r[5]) for r in rows]
    assert losses == sorted(losses)


@pytest.mark.parametrize("args, message", [
    (["--client-lr", "0.01,abc"], "--client-lr expects comma-separated numbers"),
    (["--seeds", "0,1.5"], "--seeds expects comma-separated integers"),
    (["--client-lr", "0.1,-1"], "member client_lr=-1 server_lr=1 seed=0: client-lr must be"),
    (["--algorithm", "fedmagic"], "unknown algorithm 'fedmagic'"),
    (["--algorithm", "qffl", "--client-lr", "0.1,0.2"],
     "algorithm 'qffl': cannot sweep 'client_lr'"),
    (["--metric", "accuracy"], "--metric names a final test or train metric"),
])
def test_bad_input_one_line_exit_2(args, message, tmp_path):
    res = runner.invoke(app, ["sweep", NAME, "--rounds", "1", "--out", str(tmp_path / "x")]
                        + args, terminal_width=400)
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "x").exists()
