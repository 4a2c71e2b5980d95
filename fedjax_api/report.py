"""Plots and summaries of run directories: what `fedjax plot` and `fedjax report` show.

`plot_runs` draws one metric against the round for several runs (matplotlib, the `plot`
extra); `summarize` condenses one run into a dict of plain numbers. Both read only
`config.json` and `metrics.jsonl`; a missing or malformed run directory is a `ConfigError`.
"""

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

import attrs

from fedjax_api import rundir
from fedjax_api.errors import ConfigError, unknown

KINDS = ("eval", "train")

# Keys of config.json that never tell runs apart in a legend.
_NOT_OPTIONS = ("out", "versions")
# Shown first, as bare values, when they differ between runs.
_BARE = ("task", "algorithm", "aggregator")


@attrs.frozen
class PlotResult:
    """What `plot_runs` drew: the file, the matplotlib `Figure` (one line per run), the
    legend labels in run order and the record kind the values came from."""

    path: Path
    figure: Any
    labels: tuple[str, ...]
    kind: str
    metric: str


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


def run_labels(run_dirs, configs: list[dict | None]) -> list[str]:
    """A legend label per run: its task, algorithm and the options that differ between the
    runs (`fedprox proximal_weight=0.1`); the directory name when that says nothing.

    Example: runs of fedavg and fedprox on one task are labelled "fedavg" and
    "fedprox proximal_weight=0.01"; a single run "TASK ALGORITHM".
    """
    names = [Path(d).name or str(d) for d in run_dirs]
    flats = [None if c is None else _flat(c) for c in configs]
    known = [f for f in flats if f is not None]
    order = {}
    for f in known:
        order.update((k, None) for k in f)
    if len(known) == 1 and len(run_dirs) == 1:
        differing = [k for k in ("task", "algorithm") if k in known[0]]
    else:
        differing = [k for k in order if len({json.dumps(f.get(k, "\0absent"), sort_keys=True)
                                               for f in known}) > 1]
    differing.sort(key=lambda k: (_BARE.index(k) if k in _BARE else len(_BARE)))
    leaves = [k.rsplit(".", 1)[-1] for k in differing]
    shown = {k: leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(differing, leaves)}
    labels = []
    for name, f in zip(names, flats):
        parts = [] if f is None else [
            _fmt(f[k]) if k in _BARE else f"{shown[k]}={_fmt(f[k])}"
            for k in differing if k in f]
        labels.append(" ".join(parts) or name)
    for i, label in enumerate(labels):  # two runs that read the same: add the directory
        if labels.count(label) > 1 and label != names[i]:
            labels[i] = f"{label} ({names[i]})"
    return [label if labels.count(label) == 1 else str(d) for label, d in zip(labels, run_dirs)]


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


def plot_runs(run_dirs, metric: str, out, kind: str | None = None) -> PlotResult:
    """Draws `metric` against the round for each run into `out` (PNG, PDF or SVG by its
    suffix), written atomically.

    Args:
      run_dirs: run directories (the `--out` of `fedjax run`).
      metric: a metric name of the records, e.g. `test/accuracy` or `train/loss`.
      out: the image file to write.
      kind: take the values from the `eval` or the `train` records; None: the kind whose
        records hold the metric most often (eval on a tie).

    Returns:
      A `PlotResult` with the figure (one line per run, in run order) and the labels.

    Example:
      >>> plot_runs(["runs/a", "runs/b"], "test/accuracy", "curve.png").labels
      ('fedavg', 'fedprox proximal_weight=0.01')
    """
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise ConfigError("give at least one run directory")
    Figure, FigureCanvasAgg = _matplotlib()
    out = Path(out)
    runs = [load_run(d) for d in run_dirs]
    kind = _choose_kind(runs, metric, kind)
    missing = [str(d) for d, (_, records) in zip(run_dirs, runs)
               if not _series(records, metric, kind)[0]]
    if missing:
        raise ConfigError(f"metric {metric!r} is in no {kind} record of "
                          f"{', '.join(repr(m) for m in missing)}; plot the runs that have it")

    fig = Figure(figsize=(7, 4.5), dpi=150)
    canvas = FigureCanvasAgg(fig)
    formats = canvas.get_supported_filetypes()
    fmt = out.suffix[1:].lower()
    if fmt not in formats:
        raise ConfigError(f"cannot tell the image format of {str(out)!r}: end the file name "
                          "in .png, .pdf or .svg")
    configs = [config for config, _ in runs]
    labels = run_labels(run_dirs, configs)
    ax = fig.add_subplot()
    for (_, records), label in zip(runs, labels):
        rounds, values = _series(records, metric, kind)
        ax.plot(rounds, values, label=label, marker="o" if len(rounds) <= 30 else None,
                markersize=3, linewidth=1.5)
    ax.xaxis.get_major_locator().set_params(integer=True)  # rounds are whole numbers
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(_title(metric, kind, configs))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()

    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            fig.savefig(f, format=fmt)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        raise ConfigError(f"cannot write {str(out)!r} ({e.strerror or e}); choose a "
                          "writable -o") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. its folder does not exist: nothing was written
            pass
    return PlotResult(path=out, figure=fig, labels=tuple(labels), kind=kind, metric=metric)


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
      config.json.
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
