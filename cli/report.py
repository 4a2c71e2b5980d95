"""`fedjax plot | report`: curves and a summary of run directories.

The figures come from `fedjax_api.report` (`plot_runs`, `summarize`); this module only
prints them. Register both commands on the main app with `register(app)`.
"""

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cli.common import console, user_errors
from fedjax_api import report as api
from fedjax_api.errors import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Plots and summaries of run directories.")


@app.command()
@user_errors
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(
        help="Run directories (the --out of `fedjax run`).", show_default=False)],
    metric: Annotated[str, typer.Option(
        help="Metric to plot against the round, e.g. test/accuracy or train/loss.")]
        = "test/accuracy",
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Image to write: .png, .pdf or .svg.")] = Path("curve.png"),
    kind: Annotated[Optional[str], typer.Option(
        help="Records to read: eval or train. Default: those holding the metric most often.")]
        = None,
    x: Annotated[str, typer.Option(
        "--x", help="Horizontal axis: round, or simulated_time (hours of the simulated "
                    "clock; runs with --devices-profile).")] = "round",
) -> None:
    """Curves of one metric against the round, labelled by what differs; runs that differ
    only in seed as their mean with a min-max band; with fewer than 3 evaluations, the
    per-round training loss below."""
    result = api.plot_runs(run_dirs, metric, out, kind, x=x)
    n, curves = sum(len(g) for g in result.runs), len(result.labels)
    text = f"wrote {result.path}: {metric} ({result.kind} records) of {n} run{'s' if n > 1 else ''}"
    if curves < n:
        text += f" as {curves} curve{'s' if curves > 1 else ''} (mean and min-max over seeds)"
    if result.train_loss:
        text += f", with their per-round {api.TRAIN_LOSS} below"
    console.print(text, highlight=False)


def _num(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.6g}{unit}"


def _seconds(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g} s" if value < 60 else f"{value:.0f} s ({value / 60:.1f} min)"


@app.command()
@user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(
        help="A run directory (the --out of `fedjax run`).", show_default=False)],
    target: Annotated[Optional[str], typer.Option(
        help="Accuracies to reach, e.g. 0.6,0.7: prints the round and simulated time of the "
             "first evaluation reaching each.", show_default=False)] = None,
) -> None:
    """Summary of a run: final and best metrics, speed, compile time, privacy spent; with
    --target, the simulated time to reach each accuracy."""
    s = api.summarize(run_dir)
    planned = f" of {s['rounds_planned']}" if s["rounds_planned"] is not None else ""
    console.print(f"run {s['run_dir']}: task {s['task']}, algorithm {s['algorithm']}, "
                  f"{s['rounds_done']}{planned} rounds done", highlight=False)
    sampled = api.eval_sample(api.load_run(run_dir)[1])  # --eval-test-clients
    if sampled is not None:
        console.print(sampled["text"], highlight=False)
    if s["metrics"]:
        table = Table("metric", "final", "round", "best", "round")
        for name, m in s["metrics"].items():
            table.add_row(name, _num(m["final"]), str(m["final_round"]), _num(m["best"]),
                          "-" if m["best_round"] is None else str(m["best_round"]))
        console.print(table)
    else:
        console.print("no evaluation records yet", highlight=False)
    if s["last_train_loss"] is not None:
        console.print(f"last train/loss: {_num(s['last_train_loss'])} "
                      f"(round {s['last_train_loss_round']})", highlight=False)
    console.print(f"wall time: {_seconds(s['wall_time_s'])} (rounds {_seconds(s['train_time_s'])}"
                  f", evaluation {_seconds(s['eval_time_s'])})", highlight=False)
    speed = f"rounds/s: {_num(s['rounds_per_s'])}"
    if s["steady_rounds_per_s"] is not None:
        speed += f" ({_num(s['steady_rounds_per_s'])} after the first round)"
    console.print(speed, highlight=False)
    if s["compile_time_s"] is not None:
        console.print(f"compile time: about {_seconds(s['compile_time_s'])} (the first round's "
                      "time minus the median of the others)", highlight=False)
    if target is not None:
        _targets(run_dir, target)
    if s["privacy"] is not None:
        p = s["privacy"]
        delta = "" if p["delta"] is None else f" at delta = {p['delta']:g}"
        console.print(f"privacy spent: epsilon = {_num(p['epsilon'])}{delta} "
                      f"(round {p['round']})", highlight=False)


def _targets(run_dir: Path, text: str) -> None:
    try:
        targets = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--target expects numbers separated by commas, got {text!r}"
                              ) from None
    table = Table("target test/accuracy", "round", "simulated time")
    for hit in api.time_to_target(api.load_run(run_dir)[1], targets):
        when = hit["simulated_s"]
        table.add_row(f"{hit['target']:g}", "not reached" if hit["round"] is None
                      else str(hit["round"]),
                      "-" if when is None else f"{when:.6g} s ({when / 3600:.3g} h)")
    console.print(table)


def register(main_app: typer.Typer) -> None:
    """Adds `plot` and `report` as top-level commands of `main_app`."""
    main_app.command()(plot)
    main_app.command()(report)
