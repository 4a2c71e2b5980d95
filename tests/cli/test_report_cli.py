"""`fedjax plot | report`: the commands print what fedjax_api.report computes; one-line errors."""

import json

import pytest
import typer
from typer.testing import CliRunner

from cli import report
from cli.main import app as main_app
from tests.fedjax_api.test_report import CONFIG, PNG, RECORDS, make_run, seeded_runs, two_runs
from tests.fedjax_api.tiny_task import NAME

runner = CliRunner()


def flat(res) -> str:
    """The output with line wrapping undone (rich wraps at the terminal width)."""
    return " ".join(res.output.split())


def test_report_prints_the_summary(tmp_path):
    run = make_run(tmp_path / "run", CONFIG, RECORDS)
    res = runner.invoke(report.app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    text = flat(res)
    assert f"run {run}: task emnist, algorithm fedavg, 4 of 5 rounds done" in text
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in res.output.splitlines() if line.count("│") == 6}
    assert rows == {  # the header row, drawn with ┃, is not among them
        "test/accuracy": ["0.5", "4", "0.6", "2"],
        "test/loss": ["nan", "4", "1.25", "2"],
        "test/num_examples": ["80", "4", "-", "-"],
        "train/accuracy": ["0.7", "4", "0.7", "4"],
        "train/loss": ["0.75", "4", "0.75", "4"],
    }
    assert "last train/loss: 1 (round 4)" in text
    assert "wall time: 8.5 s (rounds 7 s, evaluation 1.5 s)" in text
    assert "rounds/s: 0.470588 (1 after the first round)" in text
    assert ("compile time: about 3 s (the first round's time minus the median of the others)"
            in text)
    assert "privacy spent: epsilon = 1 at delta = 1e-06 (round 4)" in text


def test_report_of_a_fresh_run(tmp_path):
    run = make_run(tmp_path / "run", {"task": "t", "algorithm": "a"}, [])
    res = runner.invoke(report.app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert "0 rounds done" in flat(res) and "no evaluation records yet" in flat(res)
    assert "privacy" not in flat(res) and "compile" not in flat(res)


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "error: no run directory '{p}'"),
    (lambda p: p.mkdir(), "error: no metrics.jsonl in '{p}': not a fedjax run directory "
     "(give the --out of a `fedjax run`)"),
    (lambda p: make_run(p, CONFIG, []) and (p / "config.json").write_text("{"),
     "error: '{p}/config.json' is not valid JSON (Expecting property name enclosed in double "
     "quotes); restore it from the run or delete it"),
])
def test_report_errors_are_one_line(tmp_path, setup, message):
    path = tmp_path / "r"
    setup(path)
    res = runner.invoke(report.app, ["report", str(path)])
    assert res.exit_code == 2
    assert flat(res) == message.format(p=path)
    assert "Traceback" not in res.output


def test_plot_writes_the_png_and_says_so(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = two_runs(tmp_path)
    out = tmp_path / "curve.png"
    res = runner.invoke(report.app, ["plot", str(a), str(b), "--metric", "test/accuracy",
                                     "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert flat(res) == f"wrote {out}: test/accuracy (eval records) of 2 runs"
    assert out.read_bytes()[:8] == PNG
    res = runner.invoke(report.app, ["plot", str(a), "--metric", "train/loss", "--kind",
                                     "train", "-o", str(tmp_path / "loss.pdf")])
    assert res.exit_code == 0, res.output
    assert flat(res).endswith("train/loss (train records) of 1 run")
    assert (tmp_path / "loss.pdf").read_bytes()[:5] == b"%PDF-"


@pytest.mark.parametrize("args, message", [
    (["--metric", "test/acc"], "error: unknown metric 'test/acc'; did you mean "
     "'test/accuracy'? choose one of: "),
    (["--kind", "both"], "error: unknown kind 'both'; choose one of: eval, train"),
    (["--metric", "round_time_s", "--kind", "eval"], "error: metric 'round_time_s' is not in "
     "the eval records of these runs but in their train records: use --kind train"),
])
def test_plot_errors_are_one_line(tmp_path, args, message):
    pytest.importorskip("matplotlib")
    a, _ = two_runs(tmp_path)
    res = runner.invoke(report.app, ["plot", str(a), *args, "-o", str(tmp_path / "c.png")])
    assert res.exit_code == 2
    assert flat(res).startswith(message) and len(res.output.strip().splitlines()) == 1
    assert "Traceback" not in res.output and not (tmp_path / "c.png").exists()


def test_register_adds_both_commands_to_an_app(tmp_path):
    main = typer.Typer()

    @main.command()
    def other() -> None:
        pass

    report.register(main)
    run = make_run(tmp_path / "run", CONFIG, RECORDS)
    res = runner.invoke(main, ["report", str(run)])
    assert res.exit_code == 0 and "4 of 5 rounds done" in flat(res)
    assert json.loads((run / "config.json").read_text())["task"] == "emnist"


def test_plot_says_it_drew_seeds_as_one_curve(tmp_path):
    pytest.importorskip("matplotlib")
    dirs = seeded_runs(tmp_path)
    out = tmp_path / "seeds.png"
    res = runner.invoke(report.app, ["plot", *map(str, dirs), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert flat(res) == (f"wrote {out}: test/accuracy (eval records) of 5 runs as 2 curves "
                         "(mean and min-max over seeds)")


def test_plot_of_real_runs_evaluated_only_at_the_end(tmp_path):
    """Two seeds of a tiny run evaluated once, at the end: one curve, the training loss
    below."""
    pytest.importorskip("matplotlib")
    from fedjax_api import report as api

    dirs = [tmp_path / f"seed{seed}" for seed in (0, 1)]
    for seed, run_dir in enumerate(dirs):
        res = runner.invoke(main_app, ["run", NAME, "--rounds", "3", "--clients-per-round",
                                       "2", "--eval-every", "0", "--seed", str(seed),
                                       "--out", str(run_dir)])
        assert res.exit_code == 0, res.output
    out = tmp_path / "end.png"
    res = runner.invoke(main_app, ["plot", *map(str, dirs), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert flat(res) == (f"wrote {out}: test/accuracy (eval records) of 2 runs as 1 curve "
                         "(mean and min-max over seeds), with their per-round train/loss "
                         "below")
    assert out.read_bytes()[:8] == PNG
    result = api.plot_runs(dirs, "test/accuracy", tmp_path / "again.png")
    assert result.labels == (f"{NAME} fedavg (2 seeds)",)
    ax, loss_ax = result.figure.axes
    assert list(ax.get_lines()[0].get_xdata()) == [3]
    losses = [[r["train/loss"] for r in map(json.loads, (d / "metrics.jsonl").open())
               if r["kind"] == "train"] for d in dirs]
    assert list(loss_ax.get_lines()[0].get_ydata()) == pytest.approx(
        [(a + b) / 2 for a, b in zip(*losses)])


TIMED = [{**r, "time/simulated_s": 900.0 * r["round"]} if r["kind"] == "train" else r
         for r in RECORDS]


def test_report_target_prints_the_simulated_time_to_each_accuracy(tmp_path):
    run = make_run(tmp_path / "run", CONFIG, TIMED)
    res = runner.invoke(report.app, ["report", str(run), "--target", "0.1,0.6,0.9"])
    assert res.exit_code == 0, res.output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in res.output.splitlines()
            if line.count("│") == 4]
    assert rows == [["0.1", "0", "0 s (0 h)"], ["0.6", "2", "1800 s (0.5 h)"],
                    ["0.9", "not reached", "-"]]
    bad = runner.invoke(report.app, ["report", str(run), "--target", "0.6,high"])
    assert bad.exit_code == 2 and "--target expects numbers separated by commas" in bad.output


def test_plot_against_simulated_hours(tmp_path):
    run = make_run(tmp_path / "run", CONFIG, TIMED)
    res = runner.invoke(report.app, ["plot", str(run), "--x", "simulated_time",
                                     "-o", str(tmp_path / "c.png")])
    assert res.exit_code == 0, res.output
    from fedjax_api.report import plot_runs
    result = plot_runs([run], "test/accuracy", tmp_path / "d.png", x="simulated_time")
    line = result.figure.axes[0].lines[0]
    assert list(line.get_xdata()) == [0.0, 0.5, 1.0]  # rounds 0, 2, 4: 0, 1800, 3600 s
    assert result.figure.axes[0].get_xlabel() == "simulated hours"
    plain = make_run(tmp_path / "plain", CONFIG, RECORDS)
    bad = runner.invoke(report.app, ["plot", str(plain), "--x", "simulated_time",
                                     "-o", str(tmp_path / "e.png")])
    assert bad.exit_code == 2 and "has no simulated time" in flat(bad)
