"""`fedjax bench`: one tiny scenario end to end (both worker processes), and bad input."""

import json

import pytest
import typer
from typer.testing import CliRunner

from benchmarks import run
from cli import bench

runner = CliRunner()


@pytest.fixture()
def app():
    a = typer.Typer()
    bench.register(a)
    a.command("noop", hidden=True)(lambda: None)  # two commands: `bench` stays a subcommand
    return a


def test_bench_runs_a_tiny_scenario_and_writes_json(app, tmp_path):
    res = runner.invoke(app, ["bench", "emnist-logreg", "--rounds", "2", "--warmup", "1",
                              "--select-rounds", "1", "--num-clients", "30",
                              "--clients-per-round", "3", "--chunk-sizes", "1,3",
                              "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "emnist-logreg" in res.output and "speed-up" in res.output
    result = json.loads((tmp_path / "emnist-logreg.json").read_text())
    summary = json.loads((tmp_path / "summary.json").read_text())
    ours, base = result["ours"], result["baseline"]
    assert ours["rounds_timed"] == 2 and base["rounds_timed"] == 2
    assert set(ours["candidates"]) == {"chunk_size=1", "chunk_size=3"}
    assert ours["best_chunk_size"] in (1, 3)
    for side in (ours, base):
        assert side["median_s"] > 0 and side["compile_s"] > 0 and side["peak_rss_mb"] > 0
        assert [r["round"] for r in side["rounds"]][-2:] == [1, 2]
        assert all(r["clients"] == 3 for r in side["rounds"])
    assert 0.0 <= ours["median_padded_fraction"] < 1.0
    assert result["speedup_vs_baseline"] == pytest.approx(base["median_s"] / ours["median_s"])
    assert result["matmul_gflops"] > 0
    assert result["flops_fraction_of_matmul"] == pytest.approx(
        ours["flops_per_s"] / (result["matmul_gflops"] * 1e9))
    assert result["setup"]["flops_per_example"]["train"] == 2 * 784 * 62 * 2
    assert result["setup"]["clients_per_round"] == 3
    # Same cohorts, keys and maths: the baseline ends on the library's loss.
    a, b = result["loss_ours_vs_baseline"]
    assert a == pytest.approx(b, rel=1e-4)
    row = summary["rows"]["emnist-logreg"]
    assert row["ours_s"] == ours["median_s"] and row["baseline_s"] == base["median_s"]
    assert summary["machine"]["cpu_count"] >= 1 and summary["machine"]["jax"]
    assert summary["targets"]["emnist-logreg"]["met"] == (result["speedup_vs_baseline"] >= 20)
    table = run.markdown(summary).splitlines()
    assert table[-1].startswith("| `emnist-logreg` | ") and table[-1].endswith(" |")
    assert table[-1].count("|") == len(run.COLUMNS) + 1


def test_bench_rejects_an_unknown_scenario(app, tmp_path):
    res = runner.invoke(app, ["bench", "mnist", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "unknown scenario 'mnist'" in res.output
    assert not list(tmp_path.iterdir())


def test_bench_rejects_bad_chunk_sizes(app, tmp_path):
    res = runner.invoke(app, ["bench", "emnist-cnn", "--chunk-sizes", "1,x", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "--chunk-sizes expects comma-separated integers" in " ".join(res.output.split())
