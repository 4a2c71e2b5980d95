"""Plots and summaries of run directories: what `fedjax plot` and `fedjax report` show.

`plot_runs` draws one metric against the round for several runs (matplotlib, the `plot`
extra): runs that differ only in seed as one mean curve with a min-max band, each curve
labelled by what differs, the legend outside the axes, and the per-round training loss
below when the runs were evaluated fewer than 3 times. `summarize` condenses one run into a
dict of plain numbers. Both read only `config.json` and `metrics.jsonl`; a missing or
malformed run directory is a `ConfigError`.
"""

import json
import math
import statistics
import textwrap
from pathlib import Path
from typing import Any

import attrs

from fedjax_api import rundir
from fedjax_api.errors import ConfigError, unknown
from fedjax_core import atomic

KINDS = ("eval", "train")

# Keys of config.json that never tell runs apart in a legend.
_NOT_OPTIONS = ("out", "versions", "status")
# How a run is carried out, not what it computes: named in a label only when nothing else
# tells two curves apart.
_MECHANICS = ("checkpoint_every", "keep_checkpoints", "tensorboard", "device_data",
              "chunk_size", "devices", "eval_every", "deterministic")
# Paths, shown by the shortest tail that tells them apart.
_PATHS = ("data",)
# Shown first, as bare values, when they differ between runs.
_BARE = ("task", "algorithm", "aggregator")
# A run with fewer evaluations than this also gets a panel of its per-round training loss.
MIN_EVALS = 3
TRAIN_LOSS = "train/loss"
# Legend labels longer than this many characters wrap onto the next line.
LEGEND_WRAP = 40


@attrs.frozen
class PlotResult:
    """What `plot_runs` drew: the file, the matplotlib `Figure`, the legend labels (one per
    curve), the record kind the values came from, the metric, the run directories of
    each curve (several for runs that differ only in seed) and whether a second panel
    shows the per-round training loss."""

    path: Path
    figure: Any
    labels: tuple[str, ...]
    kind: str
    metric: str
    runs: tuple[tuple[Path, ...], ...] = ()
    train_loss: bool = False


def load_run(run_dir) -> tuple[dict | None, list[dict]]:
    """`(config, records)` of a run directory; `config` is None when `config.json` is
    missing. `ConfigError` when the directory or its `metrics.jsonl` is missing or malformed."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"no run directory {str(run_dir)!r}"
                          + (" (it is a file)" if path.exists() else ""))
    records = rundir.read_metrics(path)
    return _read_config(path), records


def _read_config(path: Path) -> dict | None:
    file = path / rundir.CONFIG_FILE
    if not file.exists():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{str(file)!r} is not valid JSON ({getattr(e, 'msg', e)}); "
                          "restore it from the run or delete it") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{str(file)!r} does not hold a JSON object; restore it from the "
                          "run or delete it")
    return config


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric_names(records: list[dict], kind: str | None = None) -> list[str]:
    names = {}
    for r in records:
        if kind is None or r.get("kind") == kind:
            names.update((k, None) for k, v in r.items() if k != "round" and _number(v))
    return list(names)


def _series(records: list[dict], metric: str, kind: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of `metric` in the `kind` records, by round (the last record of a
    round wins); inf and -inf become NaN (a gap)."""
    by_round = {}
    for r in records:
        if r.get("kind") == kind and _number(r.get(metric)) and _number(r.get("round")):
            by_round[int(r["round"])] = float(r[metric])
    rounds = sorted(by_round)
    return rounds, [v if math.isfinite(v) else math.nan for v in (by_round[x] for x in rounds)]


def _fmt(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _flat(config: dict) -> dict[str, Any]:
    """config.json as `{key: value}`, the option dicts spread (`algorithm_options.b2`)."""
    out = {}
    for key, value in config.items():
        if key in _NOT_OPTIONS:
            continue
        if isinstance(value, dict):
            out.update((f"{key}.{k}", v) for k, v in value.items())
        else:
            out[key] = value
    return out


def _same(value) -> str:
    return json.dumps(value, sort_keys=True)


def _differing(flats: list[dict]) -> list[str]:
    """The keys whose value (or presence) differs between `flats`, first seen first."""
    order = {}
    for f in flats:
        order.update((k, None) for k in f)
    return [k for k in order if len({_same(f.get(k, "\0absent")) for f in flats}) > 1]


def _paths(values: list) -> dict[str, str]:
    """`{path: tail}`: each path of `values` by its shortest tail that no other path ends
    in (`/data/leaf/train`, `/data/leaf-iid/train` -> `leaf/train`, `leaf-iid/train`)."""
    texts = sorted({_fmt(v) for v in values})
    parts = {t: Path(t).parts or (t,) for t in texts}

    def tail(t: str, n: int) -> str:
        return str(Path(*parts[t][-n:]))

    out = {}
    for t in texts:
        others = [u for u in texts if u != t]
        out[t] = next((tail(t, n) for n in range(1, len(parts[t]) + 1)
                       if all(tail(u, n) != tail(t, n) for u in others)), t)
    return out if len(set(out.values())) == len(texts) else {t: t for t in texts}


def _compose(flats: list[dict | None], keys: list[str]) -> list[str]:
    """`fedprox proximal_weight=0.1`: the values of `keys`, bare for task, algorithm and
    aggregator, `name=value` for the others (the dict's name kept when two leaves clash)."""
    keys = sorted(keys, key=lambda k: _BARE.index(k) if k in _BARE else len(_BARE))
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    shown = {k: leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(keys, leaves)}
    known = [f for f in flats if f is not None]
    paths = {k: _paths([f[k] for f in known if k in f]) for k in keys if k in _PATHS}
    labels = []
    for f in flats:
        parts = []
        for k in keys:
            if f is not None and k in f:
                value = paths[k][_fmt(f[k])] if k in paths else _fmt(f[k])
                parts.append(value if k in _BARE else f"{shown[k]}={value}")
        labels.append(" ".join(parts))
    return labels


def _labels(names: list[str], flats: list[dict | None]) -> list[str]:
    """A label per config: the options that differ between them, those that change only how
    a run is carried out (`chunk_size`, `eval_every`, ...) only when needed to tell two
    apart; `names[i]` when the config is missing or says nothing."""
    known = [f for f in flats if f is not None]
    if len(known) == 1 and len(flats) == 1:
        labels = _compose(flats, [k for k in ("task", "algorithm") if k in known[0]])
    else:
        differing = _differing(known)
        labels = _compose(flats, [k for k in differing if k not in _MECHANICS])
        if len(set(labels)) < len(labels) and any(k in _MECHANICS for k in differing):
            labels = _compose(flats, differing)
    return [label or name for label, name in zip(labels, names)]


def run_labels(run_dirs, configs: list[dict | None]) -> list[str]:
    """A legend label per run: its task, algorithm and the options that differ between the
    runs (`fedprox proximal_weight=0.1`); the directory name when that says nothing.

    Options that change only how a run is carried out (`chunk_size`, `devices`,
    `eval_every`, checkpointing, TensorBoard) appear only when nothing else tells two runs
    apart; a differing `data` path is shortened to the tail that tells the paths apart.

    Example: runs of fedavg and fedprox on one task are labelled "fedavg" and
    "fedprox proximal_weight=0.01"; a single run "TASK ALGORITHM".
    """
    names = [Path(d).name or str(d) for d in run_dirs]
    flats = [None if c is None else _flat(c) for c in configs]
    labels = _labels(names, flats)
    for i, label in enumerate(labels):  # two runs that read the same: add the directory
        if labels.count(label) > 1 and label != names[i]:
            labels[i] = f"{label} ({names[i]})"
    return [label if labels.count(label) == 1 else str(d) for label, d in zip(labels, run_dirs)]


def seed_groups(configs: list[dict | None]) -> list[list[int]]:
    """The runs (indices into `configs`) whose configs differ only in `seed` (or in their
    `out` directory and recorded versions), in the order each group first appears; a run
    without a config is a group of its own.

    Example:
      >>> seed_groups([{"client_lr": 0.1, "seed": 0}, {"client_lr": 0.2, "seed": 0},
      ...              {"client_lr": 0.1, "seed": 1}])
      [[0, 2], [1]]
    """
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        if config is None:
            key = f"\0{i}"
        else:
            key = _same({k: v for k, v in _flat(config).items() if k != "seed"})
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def curve_labels(run_dirs, configs: list[dict | None],
                 groups: list[list[int]]) -> list[str]:
    """A legend label per group of runs (`seed_groups`): the options that differ between the
    groups as `run_labels` writes them, and `(3 seeds)` after a group of several runs (`(3
    runs)` when seeds repeat).

    Example: the members of a sweep over `client_lr` 0.01, 0.1 and seeds 0, 1, 2 make two
    curves, "client_lr=0.01 (3 seeds)" and "client_lr=0.1 (3 seeds)".
    """
    run_dirs = list(run_dirs)
    if all(len(g) == 1 for g in groups):
        return run_labels([run_dirs[g[0]] for g in groups], [configs[g[0]] for g in groups])
    names = [Path(run_dirs[g[0]]).name or str(run_dirs[g[0]]) for g in groups]
    firsts = [configs[g[0]] for g in groups]
    flats = [None if c is None else _flat(c) for c in firsts]
    labels = _labels(names, flats)
    out = []
    for label, g in zip(labels, groups):
        if len(g) > 1:
            seeds = {_same((configs[i] or {}).get("seed")) for i in g}
            label += f" ({len(g)} {'seeds' if len(seeds) == len(g) else 'runs'})"
        out.append(label)
    return out


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plotting needs the plot extra: pip install 'fedjax-sim[plot]'"
                          ) from None
    return Figure, FigureCanvasAgg


def _choose_kind(runs, metric: str, kind: str | None) -> str:
    counts = {k: sum(len(_series(records, metric, k)[0]) for _, records in runs) for k in KINDS}
    if kind is not None:
        if kind not in KINDS:
            raise unknown("kind", kind, KINDS)
        if counts[kind] == 0 and counts[_other(kind)] > 0:
            raise ConfigError(f"metric {metric!r} is not in the {kind} records of these runs "
                              f"but in their {_other(kind)} records: use --kind {_other(kind)}")
    else:
        kind = max(KINDS, key=lambda k: counts[k])  # ties: eval, the first
    if counts[kind] == 0:
        available = {n: None for _, records in runs for n in _metric_names(records, None)}
        if not available:
            raise ConfigError("these runs have no metrics yet (metrics.jsonl holds no record)")
        raise unknown("metric", metric, list(available))
    return kind


def _other(kind: str) -> str:
    return "train" if kind == "eval" else "eval"


def aggregate_series(series: list[tuple[list[int], list[float]]]
                     ) -> tuple[list[int], list[float], list[float], list[float]]:
    """`(rounds, mean, low, high)` of several runs' `(rounds, values)`: at each round any
    run logged, the mean, minimum and maximum over the runs that logged it (a NaN value
    makes all three NaN: a gap).

    Example:
      >>> aggregate_series([([0, 2], [0.1, 0.5]), ([0, 2, 4], [0.3, 0.7, 0.8])])
      ([0, 2, 4], [0.2, 0.6, 0.8], [0.1, 0.5, 0.8], [0.3, 0.7, 0.8])
    """
    by_round: dict[int, list[float]] = {}
    for rounds, values in series:
        for x, v in zip(rounds, values):
            by_round.setdefault(x, []).append(v)
    rounds = sorted(by_round)
    mean, low, high = [], [], []
    for x in rounds:
        vs = by_round[x]
        nan = any(math.isnan(v) for v in vs)
        mean.append(math.nan if nan else math.fsum(vs) / len(vs))
        low.append(math.nan if nan else min(vs))
        high.append(math.nan if nan else max(vs))
    return rounds, mean, low, high


def _style(i: int, colors: list[str]) -> dict:
    """The i-th curve's colour; after the colour cycle, the next line style."""
    return {"color": colors[i % len(colors)],
            "linestyle": ("-", "--", ":", "-.")[i // len(colors) % 4]}


def _draw(ax, series, style: dict, label: str | None, markers: bool):
    """One curve: the mean of `series` and, over several runs, their min-max band."""
    rounds, mean, low, high = aggregate_series(series)
    (line,) = ax.plot(rounds, mean, label=label, marker="o" if markers and len(rounds) <= 30
                      else None, markersize=3, linewidth=1.5, **style)
    if len(series) > 1:
        ax.fill_between(rounds, low, high, color=style["color"], alpha=0.2, linewidth=0)
    return line


def _legend(fig, ax, lines, labels: list[str], banded: bool):
    """The legend outside the axes, to the right of the top one, so it hides no curve;
    the figure grows by its width (and height, when it is taller than the axes)."""
    wrapped = [textwrap.fill(label, LEGEND_WRAP, break_on_hyphens=False) for label in labels]
    legend = ax.legend(lines, wrapped, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       borderaxespad=0.0, fontsize="small", title_fontsize="small",
                       ncols=1 + (len(lines) - 1) // 16,
                       title="shaded: min to max over the runs" if banded else None)
    box = legend.get_window_extent(fig.canvas.get_renderer())
    width, height = box.width / fig.dpi, box.height / fig.dpi
    fig.set_size_inches(fig.get_figwidth() + width + 0.1,
                        max(fig.get_figheight(), height + 1.0))
    return legend


X_AXES = ("round", "simulated_time")
"""What `plot_runs` can draw against: the round, or the simulated clock in hours."""


def simulated_hours(records: list[dict], series: tuple[list, list]) -> tuple[list, list]:
    """`series` (rounds, values) with each round replaced by the simulated clock after it,
    in hours (`time/simulated_s` of its train record; round 0 is 0); rounds without a
    clock reading are left out."""
    clock = {0: 0.0}
    clock.update({int(r["round"]): float(r["time/simulated_s"]) / 3600.0 for r in records
                  if r.get("kind") == "train" and _number(r.get("time/simulated_s"))})
    kept = [(clock[r], v) for r, v in zip(*series) if r in clock]
    return [h for h, _ in kept], [v for _, v in kept]


def time_to_target(records: list[dict], targets, metric: str = "test/accuracy"
                   ) -> list[dict[str, Any]]:
    """The first evaluation reaching each target, on the simulated clock.

    Args:
      records: a run's records.
      targets: the values to reach (`metric >= target`; `<=` for a loss).
      metric: the eval metric.

    Returns:
      One `{"target", "round", "simulated_s"}` per target; `round` None when never
      reached, `simulated_s` None without simulated time (round 0 is 0 s).

    Example:
      >>> time_to_target(load_run("runs/a")[1], [0.6, 0.7])
    """
    rounds, values = _series(records, metric, "eval")
    clock = {0: 0.0}
    clock.update({int(r["round"]): float(r["time/simulated_s"]) for r in records
                  if r.get("kind") == "train" and _number(r.get("time/simulated_s"))})
    lower = higher_is_better(metric) is False
    out = []
    for target in targets:
        hit = next((r for r, v in zip(rounds, values)
                    if (v <= target if lower else v >= target)), None)
        out.append({"target": float(target), "round": hit,
                    "simulated_s": None if hit is None else clock.get(hit)})
    return out


def plot_runs(run_dirs, metric: str, out, kind: str | None = None,
              x: str = "round") -> PlotResult:
    """Draws `metric` against the round for each run into `out` (PNG, PDF or SVG by its
    suffix), written atomically.

    Runs whose configs differ only in `seed` make one curve: their mean at each round, in
    a band from their minimum to their maximum. Each curve is labelled by the options
    that differ between the curves (`curve_labels`), in a legend outside the axes. When
    the values come from the eval records and a run has fewer than 3 of them (e.g. it was
    evaluated only at the end), a second panel below shows the per-round `train/loss` of
    the train records, drawn the same way.

    Args:
      run_dirs: run directories (the `--out` of `fedjax run`).
      metric: a metric name of the records, e.g. `test/accuracy` or `train/loss`.
      out: the image file to write.
      kind: take the values from the `eval` or the `train` records; None: the kind whose
        records hold the metric most often (eval on a tie).
      x: "round", or "simulated_time": against the simulated clock in hours (runs with
        `--devices-profile`; `simulated_hours`).

    Returns:
      A `PlotResult` with the figure (its first axes holds one line per curve, in the order
      of the curves' first runs) and the labels.

    Example:
      >>> plot_runs(["runs/a", "runs/b"], "test/accuracy", "curve.png").labels
      ('fedavg', 'fedprox proximal_weight=0.01')
    """
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise ConfigError("give at least one run directory")
    if x not in X_AXES:
        raise ConfigError(f"unknown x axis {x!r}; choose one of: {', '.join(X_AXES)}")
    Figure, FigureCanvasAgg = _matplotlib()
    out = Path(out)
    runs = [load_run(d) for d in run_dirs]
    kind = _choose_kind(runs, metric, kind)
    missing = [str(d) for d, (_, records) in zip(run_dirs, runs)
               if not _series(records, metric, kind)[0]]
    if missing:
        raise ConfigError(f"metric {metric!r} is in no {kind} record of "
                          f"{', '.join(repr(m) for m in missing)}; plot the runs that have it")
    if x == "simulated_time":
        untimed = [str(d) for d, (_, records) in zip(run_dirs, runs)
                   if not any("time/simulated_s" in r for r in records)]
        if untimed:
            raise ConfigError(f"{untimed[0]!r} has no simulated time: run it with "
                              "--devices-profile, or plot against the round")

    sparse = kind == "eval" and any(len(_series(records, metric, kind)[0]) < MIN_EVALS
                                    for _, records in runs)
    losses = [_along(x, records, _series(records, TRAIN_LOSS, "train")) for _, records in runs]
    with_loss = sparse and any(rounds for rounds, _ in losses)
    fig = Figure(figsize=(5.6, 5.6 if with_loss else 4.0), dpi=150, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    formats = canvas.get_supported_filetypes()
    fmt = out.suffix[1:].lower()
    if fmt not in formats:
        raise ConfigError(f"cannot tell the image format of {str(out)!r}: end the file name "
                          "in .png, .pdf or .svg")
    configs = [config for config, _ in runs]
    groups = seed_groups(configs)
    labels = curve_labels(run_dirs, configs, groups)
    if with_loss:
        ax, loss_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    else:
        ax, loss_ax = fig.add_subplot(), None
    colors = _cycle_colors()
    lines = []
    for i, (group, label) in enumerate(zip(groups, labels)):
        style = _style(i, colors)
        series = [_along(x, runs[j][1], _series(runs[j][1], metric, kind)) for j in group]
        lines.append(_draw(ax, series, style, label, markers=True))
        if loss_ax is not None:
            loss_series = [losses[j] for j in group if losses[j][0]]
            if loss_series:
                _draw(loss_ax, loss_series, style, None, markers=False)
    from matplotlib.ticker import MaxNLocator

    for a in (ax, loss_ax) if loss_ax is not None else (ax,):
        locator = a.xaxis.get_major_locator()
        assert isinstance(locator, MaxNLocator)  # a new axes' AutoLocator
        locator.set_params(integer=x == "round")  # rounds are whole numbers
        a.grid(alpha=0.3)
    ax.set_ylabel(metric)
    ax.set_title(_title(metric, kind, configs))
    if loss_ax is not None:
        loss_ax.set_ylabel(f"{TRAIN_LOSS} (each round)")
        loss_ax.set_xlabel(_X_LABELS[x])
    else:
        ax.set_xlabel(_X_LABELS[x])
    _legend(fig, ax, lines, labels, banded=any(len(g) > 1 for g in groups))

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replace(out) as f:  # a new temporary file, renamed over `out`
            fig.savefig(f, format=fmt)
    except OSError as e:
        raise ConfigError(f"cannot write {str(out)!r} ({e.strerror or e}); choose a "
                          "writable -o") from None
    return PlotResult(path=out, figure=fig, labels=tuple(labels), kind=kind, metric=metric,
                      runs=tuple(tuple(Path(run_dirs[j]) for j in g) for g in groups),
                      train_loss=loss_ax is not None)


def _cycle_colors() -> list[str]:
    from matplotlib import rcParams
    return list(rcParams["axes.prop_cycle"].by_key()["color"])


def _title(metric: str, kind: str, configs) -> str:
    known = [c for c in configs if c is not None]
    shared = [str(known[0][k]) for k in ("task", "algorithm")
              if known and all(k in c and c[k] == known[0][k] for c in known)]
    where = f" on {', '.join(shared)}" if shared else ""
    return f"{metric} ({kind} records){where}"


def higher_is_better(metric: str) -> bool | None:
    """Whether a larger value of `metric` is better: False for losses, errors,
    perplexities and the sequence metrics' OOV and truncation rates, None for counts
    (`num_...`), True otherwise (accuracies)."""
    leaf = metric.rsplit("/", 1)[-1]
    if leaf.startswith("num_") or leaf.endswith("_count"):
        return None
    return not any(word in leaf for word in ("loss", "error", "perplexity", "oov_rate",
                                             "truncation_rate"))


def _final_and_best(records: list[dict], metric: str) -> dict:
    rounds, values = _series(records, metric, "eval")
    raw = {int(r["round"]): float(r[metric]) for r in records
           if r.get("kind") == "eval" and _number(r.get(metric)) and _number(r.get("round"))}
    out = {"final": raw[rounds[-1]], "final_round": rounds[-1], "best": None, "best_round": None}
    direction = higher_is_better(metric)
    finite = [(v, x) for x, v in zip(rounds, values) if math.isfinite(v)]
    if direction is not None and finite:
        sign = 1 if direction else -1
        best_value, best_round = max(finite, key=lambda vx: (sign * vx[0], -vx[1]))
        out.update(best=best_value, best_round=best_round)
    return out


_X_LABELS = {"round": "round", "simulated_time": "simulated hours"}


def _along(x: str, records: list[dict], series: tuple[list, list]) -> tuple[list, list]:
    return simulated_hours(records, series) if x == "simulated_time" else series


def eval_sample(records: list[dict]) -> dict | None:
    """Which evaluations read a sample of the test clients (`--eval-test-clients`).

    Returns:
      None when every eval record is of the whole test set; otherwise `{"clients": N,
      "total": M, "sampled_rounds": [...], "full_rounds": [...], "text": "..."}`: the
      sample's size, the test clients there are, the rounds of the sampled and of the
      whole-test-set evaluations, and that in words.

    Example:
      >>> eval_sample(load_run("runs/so")[1])["text"]
      'test metrics at rounds 0-90 on a fixed sample of 50 of 1000 test clients; at round 100 on all 1000'
    """
    evals = [r for r in records if r.get("kind") == "eval" and _number(r.get("round"))]
    sampled = [r for r in evals if _number(r.get("test_clients"))]
    if not sampled:
        return None
    n, raw = int(sampled[-1]["test_clients"]), sampled[-1].get("test_clients_total")
    total = int(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None
    full = [int(r["round"]) for r in evals if not _number(r.get("test_clients"))]
    rounds = [int(r["round"]) for r in sampled]
    of = f" of {total}" if total is not None else ""
    text = f"test metrics at {_rounds_text(rounds)} on a fixed sample of {n}{of} test clients"
    if full:
        text += f"; at {_rounds_text(full)} on all{of.replace(' of', '')}"
    return {"clients": n, "total": total,
            "sampled_rounds": rounds, "full_rounds": full, "text": text}


def _rounds_text(rounds: list[int]) -> str:
    if len(rounds) == 1:
        return f"round {rounds[0]}"
    if len(rounds) == 2:
        return f"rounds {rounds[0]} and {rounds[1]}"
    return f"rounds {rounds[0]}-{rounds[-1]}"


def summarize(run_dir) -> dict:
    """The figures of one run, as plain Python values.

    Returns:
      `{"run_dir", "task", "algorithm", "rounds_planned", "rounds_done",
        "metrics": {name: {"final", "final_round", "best", "best_round"}},
        "last_train_loss", "last_train_loss_round", "train_time_s", "eval_time_s",
        "wall_time_s", "rounds_per_s", "steady_rounds_per_s", "compile_time_s",
        "privacy": {"epsilon", "delta", "round"} or None}`.
      `metrics` holds every `test/` and `train/` metric of the eval records: its last value
      and the best one (the highest, or the lowest for losses; None for counts), each with
      its round. `wall_time_s` is the sum of every record's `round_time_s` and `eval_time_s`;
      `rounds_per_s` = training rounds / `wall_time_s`; `steady_rounds_per_s` = 1 / the
      median `round_time_s` of the rounds after the first; `compile_time_s` estimates the
      compilation as the first round's time minus that median (at least 0; None with fewer
      than two rounds). `privacy` has the last `privacy/epsilon` and `dp_delta` from
      config.json. The metrics' final and best values come from every eval record, of a
      sample of the test clients or not (`eval_sample` says which were sampled).
    """
    config, records = load_run(run_dir)
    if config is None:
        raise ConfigError(f"no {rundir.CONFIG_FILE} in {str(run_dir)!r}: not a fedjax run "
                          "directory (give the --out of a `fedjax run`)")
    records = sorted(records, key=lambda r: r.get("round", 0) if _number(r.get("round")) else 0)
    train = [r for r in records if r.get("kind") == "train" and _number(r.get("round"))]
    evals = [r for r in records if r.get("kind") == "eval"]

    metrics = {}
    names = [n for n in _metric_names(evals) if n.startswith(("test/", "train/"))]
    names.sort(key=lambda n: not n.startswith("test/"))  # test/ first, else as logged
    for name in names:
        metrics[name] = _final_and_best(evals, name)

    losses = [r for r in train if _number(r.get("train/loss"))]
    train_time = sum(float(r["round_time_s"]) for r in records
                     if _number(r.get("round_time_s")))
    eval_time = sum(float(r["eval_time_s"]) for r in records if _number(r.get("eval_time_s")))
    wall = train_time + eval_time
    times = [float(r["round_time_s"]) for r in train if _number(r.get("round_time_s"))]
    steady = statistics.median(times[1:]) if len(times) >= 2 else None

    privacy = None
    spent = [r for r in records if _number(r.get("privacy/epsilon"))]
    if spent:
        privacy = {"epsilon": float(spent[-1]["privacy/epsilon"]),
                   "delta": config.get("dp_delta"), "round": int(spent[-1]["round"])}

    return {
        "run_dir": str(run_dir),
        "task": config.get("task"),
        "algorithm": config.get("algorithm"),
        "rounds_planned": config.get("rounds"),
        "rounds_done": max((int(r["round"]) for r in train), default=0),
        "metrics": metrics,
        "last_train_loss": float(losses[-1]["train/loss"]) if losses else None,
        "last_train_loss_round": int(losses[-1]["round"]) if losses else None,
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "wall_time_s": wall,
        "rounds_per_s": len(train) / wall if wall > 0 and train else None,
        "steady_rounds_per_s": 1 / steady if steady else None,
        "compile_time_s": max(0.0, times[0] - steady) if steady is not None else None,
        "privacy": privacy,
    }
