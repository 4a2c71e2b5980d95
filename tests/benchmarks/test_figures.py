"""The home page's figures redraw from the committed results JSON (`make figures`)."""

import json

import pytest

from benchmarks import femnist_accuracy, figures

pytest.importorskip("matplotlib")


def test_speed_rows_keep_the_rows_that_ran():
    summary = {"scenarios_run": ["a", "b", "c"], "rows": {
        "a": {"ours_s": 1.0, "baseline_s": 2.0, "fedjax_s": 1.5, "baseline_extrapolated": False},
        "b": {"ours_s": None, "error": "timed out"},
        "c": {"ours_s": 0.5, "baseline_s": 3.5, "baseline_extrapolated": True}}}
    assert figures.speed_rows(summary) == [
        {"scenario": "a", "ours_s": 1.0, "baseline_s": 2.0, "fedjax_s": 1.5, "extrapolated": False},
        {"scenario": "c", "ours_s": 0.5, "baseline_s": 3.5, "fedjax_s": None, "extrapolated": True}]


def test_both_figures_redraw_from_the_committed_json(tmp_path):
    summary = json.loads(figures.SUMMARY.read_text())
    figures.plot_speed(summary, tmp_path / "speed.png")
    results = json.loads(femnist_accuracy.RESULTS.read_text())
    assert {r["framework"] for r in results["runs"]} == {"fedjax-sim", "fedjax-0.0.17"}
    assert sorted({r["seed"] for r in results["runs"]}) == results["hyperparameters"]["seeds"]
    femnist_accuracy.plot(results, tmp_path / "accuracy.png")
    for name in ("speed.png", "accuracy.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
