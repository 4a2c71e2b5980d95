"""fedjax_api.report: summaries and plots of run directories written by hand."""

import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_api import report
from fedjax_api.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(path: Path, config: dict | None, records: list[dict], tail: str = "") -> Path:
    """A run directory with `config.json` and `metrics.jsonl` written by hand."""
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


CONFIG = {"task": "emnist", "algorithm": "fedavg", "rounds": 5, "client_lr": 0.1,
          "algorithm_options": {}, "dp_delta": 1e-6, "out": "runs/x",
          "versions": {"jax": "0.10.2"}}

RECORDS = [
    {"round": 0, "kind": "eval", "test/accuracy": 0.1, "test/loss": 2.5,
     "test/num_examples": 80.0, "eval_time_s": 0.5},
    {"round": 1, "kind": "train", "train/loss": 2.0, "round_time_s": 4.0,
     "privacy/epsilon": 0.25},
    {"round": 2, "kind": "train", "train/loss": 1.5, "round_time_s": 1.0,
     "privacy/epsilon": 0.5},
    {"round": 2, "kind": "eval", "test/accuracy": 0.6, "test/loss": 1.25,
     "test/num_examples": 80.0, "eval_time_s": 0.25},
    {"round": 3, "kind": "train", "train/loss": 1.25, "round_time_s": 1.5,
     "privacy/epsilon": 0.75},
    {"round": 4, "kind": "train", "train/loss": 1.0, "round_time_s": 0.5,
     "privacy/epsilon": 1.0},
    {"round": 4, "kind": "eval", "test/accuracy": 0.5, "test/loss": "nan",
     "test/num_examples": 80.0, "train/accuracy": 0.7, "train/loss": 0.75,
     "eval_time_s": 0.75},
]


def test_summarize_values(tmp_path):
    run = make_run(tmp_path / "run", CONFIG, RECORDS)
    s = report.summarize(run)
    assert s == {
        "run_dir": str(run),
        "task": "emnist", "algorithm": "fedavg", "rounds_planned": 5, "rounds_done": 4,
        "metrics": {
            "test/accuracy": {"final": 0.5, "final_round": 4, "best": 0.6, "best_round": 2},
            "test/loss": s["metrics"]["test/loss"],  # NaN: checked below
            "test/num_examples": {"final": 80.0, "final_round": 4, "best": None,
                                  "best_round": None},
            "train/accuracy": {"final": 0.7, "final_round": 4, "best": 0.7, "best_round": 4},
            "train/loss": {"final": 0.75, "final_round": 4, "best": 0.75, "best_round": 4},
        },
        "last_train_loss": 1.0, "last_train_loss_round": 4,
        "train_time_s": 7.0, "eval_time_s": 1.5, "wall_time_s": 8.5,
        "rounds_per_s": 4 / 8.5,
        "steady_rounds_per_s": 1.0,  # median of 1.0, 1.5, 0.5
        "compile_time_s": 3.0,  # 4.0 - 1.0
        "privacy": {"epsilon": 1.0, "delta": 1e-6, "round": 4},
    }
    loss = s["metrics"]["test/loss"]
    assert math.isnan(loss["final"]) and loss["final_round"] == 4
    assert (loss["best"], loss["best_round"]) == (1.25, 2)  # lowest, NaN skipped
    assert list(s["metrics"]) == ["test/accuracy", "test/loss", "test/num_examples",
                                  "train/accuracy", "train/loss"]


def test_summarize_a_run_without_records_or_privacy(tmp_path):
    cfg = {k: v for k, v in CONFIG.items() if k != "dp_delta"}
    s = report.summarize(make_run(tmp_path / "r", cfg, []))
    assert s["rounds_done"] == 0 and s["metrics"] == {} and s["privacy"] is None
    assert s["wall_time_s"] == 0 and s["rounds_per_s"] is None
    assert s["compile_time_s"] is None and s["last_train_loss"] is None
    one = [{"round": 1, "kind": "train", "train/loss": 1.0, "round_time_s": 2.0}]
    s = report.summarize(make_run(tmp_path / "one", cfg, one))
    assert s["compile_time_s"] is None and s["rounds_per_s"] == 0.5
    # Faster first round than the rest: the estimate is clamped at 0.
    fast = one + [{"round": 2, "kind": "train", "round_time_s": 3.0}]
    assert report.summarize(make_run(tmp_path / "fast", cfg, fast))["compile_time_s"] == 0.0


def test_summarize_ignores_a_torn_last_line(tmp_path):
    run = make_run(tmp_path / "r", CONFIG, RECORDS[:3], tail='{"round": 2, "kind": "ev')
    assert report.summarize(run)["rounds_done"] == 2


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, r"^no run directory '.*missing'$"),
    (lambda p: p.write_text("x"), r"^no run directory '.*missing' \(it is a file\)$"),
    (lambda p: p.mkdir(), r"^no metrics\.jsonl in '.*missing': not a fedjax run directory"),
    (lambda p: make_run(p, None, RECORDS), r"^no config\.json in '.*missing': not a fedjax run"),
    (lambda p: make_run(p, CONFIG, RECORDS) and (p / "config.json").write_text("{oops"),
     r"config\.json' is not valid JSON"),
    (lambda p: make_run(p, CONFIG, RECORDS) and (p / "config.json").write_text("[1]"),
     r"config\.json' does not hold a JSON object"),
    (lambda p: make_run(p, CONFIG, RECORDS[:2], tail="nope\n" + json.dumps(RECORDS[2])),
     r"metrics\.jsonl' line 3 is not a JSON record"),
])
def test_summarize_errors_are_one_line(tmp_path, setup, message):
    path = tmp_path / "missing"
    setup(path)
    with pytest.raises(ConfigError, match=message) as e:
        report.summarize(path)
    assert "\n" not in str(e.value)


# --- property: final and best agree with a plain reference ---------------------------------

CASES = {"n": 0}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.floats(-1e6, 1e6), st.just(math.nan)), min_size=1, max_size=10),
       st.lists(st.floats(0.01, 100), min_size=0, max_size=8))
def test_final_best_and_times_match_a_reference(values, times):
    CASES["n"] += 1
    records = [{"round": 3 * i, "kind": "eval", "test/accuracy": v, "test/loss": v}
               for i, v in enumerate(values)]
    records += [{"round": i + 1, "kind": "train", "round_time_s": t} for i, t in enumerate(times)]
    with tempfile.TemporaryDirectory() as d:
        s = report.summarize(make_run(Path(d), CONFIG, records))
    acc, loss = s["metrics"]["test/accuracy"], s["metrics"]["test/loss"]
    last = len(values) - 1
    assert acc["final_round"] == 3 * last
    assert acc["final"] == values[-1] or math.isnan(values[-1]) and math.isnan(acc["final"])
    finite = [(v, 3 * i) for i, v in enumerate(values) if not math.isnan(v)]
    if finite:
        hi, lo = max(v for v, _ in finite), min(v for v, _ in finite)
        assert (acc["best"], acc["best_round"]) == (hi, next(r for v, r in finite if v == hi))
        assert (loss["best"], loss["best_round"]) == (lo, next(r for v, r in finite if v == lo))
    else:
        assert acc["best"] is None and loss["best_round"] is None
    assert s["train_time_s"] == pytest.approx(sum(times))
    if len(times) >= 2:
        assert s["compile_time_s"] == max(0.0, times[0] - statistics.median(times[1:]))
    print_cases()


def print_cases():
    if CASES["n"] == 50:
        print(f"hypothesis cases run: {CASES['n']}")


# --- plots ---------------------------------------------------------------------------------

def two_runs(tmp_path):
    a = make_run(tmp_path / "a", CONFIG, RECORDS)
    b_config = {**CONFIG, "algorithm": "fedprox", "algorithm_options": {"proximal_weight": 0.1},
                "out": "runs/y"}
    b = make_run(tmp_path / "b", b_config, [
        {"round": 0, "kind": "eval", "test/accuracy": 0.2},
        {"round": 1, "kind": "train", "train/loss": 3.0},
        {"round": 5, "kind": "eval", "test/accuracy": 0.8},
        {"round": 7, "kind": "eval", "test/accuracy": "inf"},
    ])
    return a, b


def test_plot_draws_one_line_per_run_into_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = two_runs(tmp_path)
    out = tmp_path / "plots" / "curve.png"
    result = report.plot_runs([a, b], "test/accuracy", out)
    assert out.read_bytes()[:8] == PNG
    assert result.path == out and result.kind == "eval"
    assert result.labels == ("fedavg", "fedprox proximal_weight=0.1")
    (ax,) = result.figure.axes
    lines = ax.get_lines()
    assert len(lines) == 2
    assert list(lines[0].get_xdata()) == [0, 2, 4]
    assert list(lines[0].get_ydata()) == [0.1, 0.6, 0.5]
    assert list(lines[1].get_xdata()) == [0, 5, 7]
    ys = list(lines[1].get_ydata())
    assert ys[:2] == [0.2, 0.8] and math.isnan(ys[2])  # inf drawn as a gap
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(result.labels)
    assert ax.get_xlabel() == "round" and ax.get_ylabel() == "test/accuracy"
    assert ax.get_title() == "test/accuracy (eval records) on emnist"
    assert sorted(p.name for p in out.parent.iterdir()) == ["curve.png"]  # no temporary


def test_plot_picks_the_kind_that_holds_the_metric(tmp_path):
    pytest.importorskip("matplotlib")
    a, _ = two_runs(tmp_path)
    result = report.plot_runs([a], "train/loss", tmp_path / "loss.svg")
    assert result.kind == "train" and result.labels == ("emnist fedavg",)
    assert list(result.figure.axes[0].get_lines()[0].get_ydata()) == [2.0, 1.5, 1.25, 1.0]
    assert (tmp_path / "loss.svg").read_text().lstrip().startswith("<?xml")
    result = report.plot_runs([a], "train/loss", tmp_path / "l.png", kind="eval")
    assert list(result.figure.axes[0].get_lines()[0].get_ydata()) == [0.75]


@pytest.mark.parametrize("args, message", [
    ({"metric": "test/acuracy"}, "unknown metric 'test/acuracy'; did you mean "
     "'test/accuracy'? choose one of: eval_time_s, privacy/epsilon, round_time_s, "
     "test/accuracy, test/loss, test/num_examples, train/accuracy, train/loss"),
    ({"metric": "round_time_s", "kind": "eval"}, "metric 'round_time_s' is not in the eval "
     "records of these runs but in their train records: use --kind train"),
    ({"kind": "evl"}, "unknown kind 'evl'; did you mean 'eval'? choose one of: eval, train"),
    ({"metric": "test/num_examples"}, "metric 'test/num_examples' is in no eval record of "
     "'{b}'; plot the runs that have it"),
    ({"out": "curve.txt"}, "cannot tell the image format of '{tmp}/curve.txt': end the file "
     "name in .png, .pdf or .svg"),
])
def test_plot_errors_are_one_line(tmp_path, args, message):
    pytest.importorskip("matplotlib")
    a, b = two_runs(tmp_path)
    kwargs = {"metric": "test/accuracy", "out": str(tmp_path / "curve.png"), **args}
    if not kwargs["out"].startswith("/"):
        kwargs["out"] = str(tmp_path / kwargs["out"])
    with pytest.raises(ConfigError) as e:
        report.plot_runs([a, b], **kwargs)
    assert str(e.value) == message.format(b=b, tmp=tmp_path)
    assert not list(tmp_path.glob("*curve*"))


def test_plot_write_failure_leaves_nothing(tmp_path):
    pytest.importorskip("matplotlib")
    a, _ = two_runs(tmp_path)
    (tmp_path / "blocker").write_text("")
    with pytest.raises(ConfigError, match="cannot write '.*blocker/c.png' .*choose a writable -o"):
        report.plot_runs([a], "test/accuracy", tmp_path / "blocker" / "c.png")
    with pytest.raises(ConfigError, match="^give at least one run directory$"):
        report.plot_runs([], "test/accuracy", tmp_path / "c.png")


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    a, _ = two_runs(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ConfigError) as e:
        report.plot_runs([a], "test/accuracy", tmp_path / "c.png")
    assert str(e.value) == "plotting needs the plot extra: pip install 'fedjax-sim[plot]'"


def test_labels_from_the_configs_that_differ(tmp_path):
    base = {"task": "t", "algorithm": "fedavg", "client_lr": 0.1, "seed": 0,
            "algorithm_options": {}, "aggregator_options": {}, "out": "x"}
    dirs = [tmp_path / n for n in ("r1", "r2", "r3", "r4")]
    configs = [base,
               {**base, "client_lr": 0.05, "out": "y"},
               {**base, "algorithm": "fedadam", "algorithm_options": {"b2": 0.99}, "out": "z"},
               None]
    assert report.run_labels(dirs, configs) == [
        "fedavg client_lr=0.1", "fedavg client_lr=0.05", "fedadam client_lr=0.1 b2=0.99", "r4"]
    # Nothing but `out` differs: the directory names tell them apart.
    assert report.run_labels(dirs[:2], [base, {**base, "out": "y"}]) == ["r1", "r2"]
    # The same option name in two dicts keeps its dict's name.
    c1 = {**base, "algorithm_options": {"beta": 1}, "aggregator_options": {"beta": 2}}
    c2 = {**base, "algorithm_options": {"beta": 3}, "aggregator_options": {"beta": 4}}
    assert report.run_labels(dirs[:2], [c1, c2]) == [
        "algorithm_options.beta=1 aggregator_options.beta=2",
        "algorithm_options.beta=3 aggregator_options.beta=4"]
    # Two directories of one name under different parents: the full paths.
    same = [tmp_path / "p" / "run", tmp_path / "q" / "run"]
    assert report.run_labels(same, [base, base]) == [str(p) for p in same]


# --- plots a paper would use: seeds as a band, labels, the legend, the training loss -----

def seeded_runs(tmp_path):
    """Three seeds of client_lr 0.1 and two of 0.2, evaluated at rounds 0, 2 and 4; the
    runs of 0.2 also differ in their data folder's parent and their chunk size, neither of
    which may reach a label."""
    base = {**CONFIG, "client_lr": 0.1, "seed": 0, "chunk_size": 1,
            "data": "/very/long/path/to/leaf/train"}
    accuracies = {(0.1, 0): [0.1, 0.4, 0.6], (0.1, 1): [0.2, 0.5, 0.9],
                  (0.1, 2): [0.3, 0.3, 0.75], (0.2, 0): [0.1, 0.6, 0.7],
                  (0.2, 1): [0.3, 0.8, 0.8]}
    dirs = []
    for (lr, seed), accs in accuracies.items():
        config = {**base, "client_lr": lr, "seed": seed, "out": f"runs/{lr}-{seed}"}
        records = [{"round": r, "kind": "eval", "test/accuracy": a}
                   for r, a in zip((0, 2, 4), accs)]
        dirs.append(make_run(tmp_path / f"lr{lr}-s{seed}", config, records))
    return dirs


def band_by_round(collection) -> dict[float, tuple[float, float]]:
    """{round: (low, high)} of a fill_between band, read off its polygon's vertices."""
    (path,) = collection.get_paths()
    by_x = {}
    for x, y in path.vertices:
        by_x.setdefault(float(x), set()).add(round(float(y), 12))
    return {x: (min(ys), max(ys)) for x, ys in by_x.items()}


def test_plot_draws_seeds_as_their_mean_and_a_min_max_band(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.collections import PolyCollection

    dirs = seeded_runs(tmp_path)
    result = report.plot_runs(dirs, "test/accuracy", tmp_path / "seeds.png")
    assert result.labels == ("client_lr=0.1 (3 seeds)", "client_lr=0.2 (2 seeds)")
    assert result.runs == (tuple(dirs[:3]), tuple(dirs[3:]))
    assert not result.train_loss
    (ax,) = result.figure.axes
    lines = ax.get_lines()
    assert len(lines) == 2
    assert list(lines[0].get_xdata()) == [0, 2, 4]
    assert list(lines[0].get_ydata()) == pytest.approx([0.2, 0.4, 0.75])
    assert list(lines[1].get_ydata()) == pytest.approx([0.2, 0.7, 0.75])
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    assert band_by_round(bands[0]) == {0.0: (0.1, 0.3), 2.0: (0.3, 0.5), 4.0: (0.6, 0.9)}
    assert band_by_round(bands[1]) == {0.0: (0.1, 0.3), 2.0: (0.6, 0.8), 4.0: (0.7, 0.8)}
    assert [b.get_facecolor()[0][:3].tolist() for b in bands] == [
        list(line_rgb(line)) for line in lines]  # each band in its curve's colour
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == list(result.labels)
    assert legend.get_title().get_text() == "shaded: min to max over the runs"


def line_rgb(line):
    from matplotlib.colors import to_rgb
    return to_rgb(line.get_color())


def test_plot_of_one_run_draws_no_band(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.collections import PolyCollection

    a, b = two_runs(tmp_path)
    result = report.plot_runs([a, b], "test/accuracy", tmp_path / "c.png")
    (ax,) = result.figure.axes
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert ax.get_legend().get_title().get_text() == ""


def assert_legend_hides_nothing(figure):
    """The legend lies outside every axes and inside the saved figure."""
    figure.canvas.draw()
    (legend,) = [a.get_legend() for a in figure.axes if a.get_legend() is not None]
    box = legend.get_window_extent()
    for a in figure.axes:
        assert not box.overlaps(a.get_window_extent()), (box, a.get_window_extent())
    fig_box = figure.bbox
    assert (box.x0 >= fig_box.x0 and box.y0 >= fig_box.y0 and box.x1 <= fig_box.x1
            and box.y1 <= fig_box.y1), (box, fig_box)


def test_plot_legend_hides_no_curve(tmp_path):
    pytest.importorskip("matplotlib")
    result = report.plot_runs(seeded_runs(tmp_path), "test/accuracy", tmp_path / "c.png")
    assert_legend_hides_nothing(result.figure)
    # Twelve long labels: wrapped, and the figure grows to hold them.
    dirs = []
    for i in range(12):
        config = {**CONFIG, "algorithm_options": {"a_rather_long_option_name": i,
                                                  "another_long_option": 2 * i}}
        dirs.append(make_run(tmp_path / f"long{i}", config, RECORDS))
    result = report.plot_runs(dirs, "test/accuracy", tmp_path / "long.png")
    assert result.labels[3] == "a_rather_long_option_name=3 another_long_option=6"
    texts = [t.get_text() for t in result.figure.axes[0].get_legend().get_texts()]
    assert texts[3] == "a_rather_long_option_name=3\nanother_long_option=6"
    assert_legend_hides_nothing(result.figure)


def test_plot_adds_the_training_loss_when_a_run_has_few_evaluations(tmp_path):
    pytest.importorskip("matplotlib")
    # Two seeds, evaluated once, at the end; seed 1's loss is seed 0's + 1; round 3 is NaN.
    losses = {0: (2.0, 1.5, "nan", 1.0), 1: (3.0, 2.5, "nan", 2.0)}
    runs = []
    for seed, seed_losses in losses.items():
        records = [{"round": r, "kind": "train", "train/loss": loss}
                   for r, loss in zip((1, 2, 3, 4), seed_losses)]
        records.append({"round": 4, "kind": "eval", "test/accuracy": 0.5 + 0.25 * seed})
        runs.append(make_run(tmp_path / f"s{seed}", {**CONFIG, "seed": seed}, records))
    result = report.plot_runs(runs, "test/accuracy", tmp_path / "end.png")
    assert result.train_loss and result.labels == ("emnist fedavg (2 seeds)",)
    ax, loss_ax = result.figure.axes
    (line,) = ax.get_lines()  # the evaluation at the end: one point
    assert list(line.get_xdata()) == [4] and list(line.get_ydata()) == [0.625]
    assert loss_ax.get_ylabel() == "train/loss (each round)"
    assert loss_ax.get_xlabel() == "round"
    (loss_line,) = loss_ax.get_lines()
    assert list(loss_line.get_xdata()) == [1, 2, 3, 4]
    ys = list(loss_line.get_ydata())
    assert ys[:2] == [2.5, 2.0] and math.isnan(ys[2]) and ys[3] == 1.5  # mean of 2 seeds
    assert loss_line.get_color() == line.get_color()
    assert len(loss_ax.collections) == 1  # the band of the two seeds
    assert_legend_hides_nothing(result.figure)
    # Three evaluations, or the train records plotted themselves: no second panel.
    a, _ = two_runs(tmp_path)
    assert len(report.plot_runs([a], "test/accuracy", tmp_path / "a.png").figure.axes) == 1
    result = report.plot_runs(runs, "train/loss", tmp_path / "t.png")
    assert result.kind == "train" and not result.train_loss and len(result.figure.axes) == 1


def test_labels_leave_out_how_a_run_was_carried_out(tmp_path):
    base = {"task": "t", "algorithm": "fedavg", "seed": 0, "chunk_size": 1, "devices": 1,
            "eval_every": 10, "data": "/home/me/data/leaf/train", "out": "x"}
    dirs = [tmp_path / n for n in ("r1", "r2", "r3")]
    # fedprox ran with another chunk size, device count and eval_every: not in its label.
    prox = {**base, "algorithm": "fedprox", "chunk_size": 8, "devices": 2, "eval_every": 5}
    assert report.run_labels(dirs[:2], [base, prox]) == ["fedavg", "fedprox"]
    # When nothing else differs, they tell the runs apart.
    assert report.run_labels(dirs[:2], [base, {**base, "chunk_size": 8}]) == [
        "chunk_size=1", "chunk_size=8"]
    # Data folders: the shortest tail that tells them apart.
    other = {**base, "data": "/home/me/data/leaf-iid/train"}
    assert report.run_labels(dirs[:2], [base, other]) == [
        "data=leaf/train", "data=leaf-iid/train"]
    third = {**base, "data": "/scratch/partitions/alpha0.1"}
    assert report.run_labels(dirs, [base, other, third]) == [
        "data=leaf/train", "data=leaf-iid/train", "data=alpha0.1"]


def test_seed_groups_and_their_labels(tmp_path):
    base = {"task": "t", "algorithm": "fedavg", "client_lr": 0.1, "seed": 0, "out": "a"}
    configs = [base, {**base, "client_lr": 0.2}, {**base, "seed": 1, "out": "b"}, None,
               {**base, "seed": 1, "client_lr": 0.2, "out": "c"}, {**base, "out": "d"}]
    groups = report.seed_groups(configs)
    assert groups == [[0, 2, 5], [1, 4], [3]]
    dirs = [tmp_path / f"r{i}" for i in range(6)]
    assert report.curve_labels(dirs, configs, groups) == [
        "client_lr=0.1 (3 runs)",  # seed 0 twice: "runs", not "seeds"
        "client_lr=0.2 (2 seeds)", "r3"]
    # One curve of several seeds says what it is.
    assert report.curve_labels(dirs, configs, [[0, 2]]) == ["t fedavg (2 seeds)"]


def test_aggregate_series_over_runs():
    rounds, mean, low, high = report.aggregate_series(
        [([0, 2, 4], [0.0, 1.0, math.nan]), ([0, 2, 4, 6], [2.0, 3.0, 4.0, 5.0])])
    assert rounds == [0, 2, 4, 6]
    assert mean[:2] == [1.0, 2.0] and low[:2] == [0.0, 1.0] and high[:2] == [2.0, 3.0]
    assert all(math.isnan(v[2]) for v in (mean, low, high))  # a NaN run: a gap
    assert (mean[3], low[3], high[3]) == (5.0, 5.0, 5.0)  # only one run logged round 6
