"""`fedjax sweep`: several learning rates, options and seeds of one task, trained as one program.

The options are those of `fedjax run`; `--client-lr`, `--server-lr`, `--seeds` and
`--option NAME=V1,V2` take comma-separated values, and the sweep trains every combination
(`fedjax_api.sweep.Sweep.grid`). Register the command on the main app with `register(app)`.
"""

import datetime
import json
import math
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli import options
from cli.common import console, user_errors
from fedjax_api import config, configfile, tasks
from fedjax_api.errors import ConfigError
from fedjax_api.sweep import SUMMARY_FILE, Sweep, SweepResult, default_metric
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.algorithms import registry


def _numbers(flag: str, text: str | None, kind=float) -> list | None:
    """`"0.01,0.1"` -> `[0.01, 0.1]`; None when not given; a `ConfigError` names the flag."""
    if text is None:
        return None
    values = []
    for part in text.split(","):
        try:
            values.append(kind(part.strip()))
        except ValueError:
            what = "integers" if kind is int else "numbers"
            raise ConfigError(f"{flag} expects comma-separated {what}, e.g. "
                              f"{'0,1,2' if kind is int else '0.01,0.1'}; got {text!r}") from None
    return values


def _options(flag: str, items: list[str] | None) -> tuple[dict, dict]:
    """`["b2=0.99,0.999", "eps=0.001"]` -> `({"eps": 0.001}, {"b2": [0.99, 0.999]})`:
    the options with one value (fixed) and those with several (swept)."""
    fixed, swept = {}, {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip() or not raw.strip():
            raise ConfigError(f"{flag} expects NAME=VALUE or NAME=V1,V2,..., got {item!r}")
        values = []
        for part in raw.split(","):
            try:
                values.append(json.loads(part))
            except json.JSONDecodeError:
                values.append(part.strip())
        if len(values) == 1:
            fixed[name.strip()] = values[0]
        else:
            swept[name.strip()] = values
    return fixed, swept


def _setting(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else str(value)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


@user_errors
def sweep(
    task: Annotated[Optional[str], typer.Argument(
        help=f"Task to run: {', '.join(tasks.names())} (see `fedjax tasks`).")] = None,
    client_lr: Annotated[Optional[str], typer.Option(
        help="Client SGD learning rates, comma-separated, e.g. 0.01,0.03,0.1. "
             "Default: the task's.")] = None,
    server_lr: Annotated[Optional[str], typer.Option(
        help="Server learning rates, comma-separated. Default: the task's value for the "
             "algorithm.")] = None,
    seeds: Annotated[Optional[str], typer.Option(
        help="Seeds, comma-separated, e.g. 0,1,2. Default: 0.")] = None,
    algorithm: Annotated[Optional[str], typer.Option(
        help=f"Federated algorithm: {', '.join(sorted(registry.ALGORITHMS))}. "
             "Default: the task's.")] = None,
    rounds: options.Rounds = None,
    clients_per_round: options.ClientsPerRound = None,
    batch_size: options.BatchSize = None,
    epochs: options.Epochs = None,
    eval_every: Annotated[Optional[int], typer.Option(
        help="Evaluate every member on the test set at round 0 and every N rounds "
             "(0: only at the end).")] = None,
    eval_train_clients: options.EvalTrainClients = None,
    chunk_size: Annotated[Optional[int], typer.Option(
        help="Clients of a member trained together under vmap (1: one by one).")] = None,
    max_steps: options.MaxSteps = None,
    data: options.DataDir = None,
    option: Annotated[Optional[list[str]], typer.Option(
        "--option", metavar="NAME=V1,V2",
        help="An algorithm option, repeatable; several comma-separated values sweep it, "
             "e.g. --option momentum=0.0,0.9.")] = None,
    aggregator: Annotated[Optional[str], typer.Option(
        help=f"How the server combines client updates: "
             f"{', '.join(sorted(aggregators.AGGREGATORS))}. Default: mean.")] = None,
    aggregator_option: Annotated[Optional[list[str]], typer.Option(
        "--aggregator-option", metavar="NAME=VALUE",
        help="An aggregator option, repeatable (one value each).")] = None,
    sampling: Annotated[Optional[str], typer.Option(
        help="Client sampling: uniform or poisson. Default: uniform.")] = None,
    skip_nonfinite_clients: Annotated[bool, typer.Option(
        "--skip-nonfinite-clients",
        help="Drop clients whose update is NaN or infinite (counted).")] = False,
    tensorboard: Annotated[bool, typer.Option(
        "--tensorboard", help="Also write TensorBoard event files for every member.")] = False,
    seeds_together: Annotated[int, typer.Option(
        help="Seeds trained together under vmap (1: one after another inside the program, "
             "the fastest on a CPU; more can fill a GPU).")] = 1,
    metric: Annotated[Optional[str], typer.Option(
        help="Final metric the table is sorted by, e.g. test/loss. Default: test/accuracy "
             "(test/loss when the task reports no accuracy).")] = None,
    config_file: Annotated[Optional[Path], typer.Option(
        "--config", help="TOML experiment config (docs/config.md) the members share; options "
                         "given on the command line override it.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a config key, repeatable.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Sweep directory: sweep.json, summary.csv and one run directory per member. "
             "Default: runs/TASK/sweep-ALGORITHM-TIME.")] = None,
) -> None:
    """Train every combination of learning rates, options and seeds as one program per round."""
    if metric is not None and (metric.partition("/")[0] not in ("test", "train")
                               or not metric.partition("/")[2]):
        raise ConfigError(f"--metric names a final test or train metric, e.g. test/accuracy "
                          f"or test/loss; got {metric!r}")
    client_lrs = _numbers("--client-lr", client_lr)
    server_lrs = _numbers("--server-lr", server_lr)
    seed_list = _numbers("--seeds", seeds, int)
    fixed, swept = _options("--option", option)
    agg_fixed, agg_swept = _options("--aggregator-option", aggregator_option)
    if agg_swept:
        raise ConfigError(f"--aggregator-option {next(iter(agg_swept))} takes one value; a "
                          "sweep varies learning rates, seeds and algorithm options")
    cfg = configfile.resolve_file(config_file, set_ or [], dict(
        task=task, algorithm=algorithm, rounds=rounds, clients_per_round=clients_per_round,
        client_lr=client_lrs[0] if client_lrs else None,
        server_lr=server_lrs[0] if server_lrs else None,
        seed=seed_list[0] if seed_list else None, batch_size=batch_size, epochs=epochs,
        eval_every=eval_every, eval_train_clients=eval_train_clients, chunk_size=chunk_size,
        max_steps=max_steps, data=data,
        algorithm_options={**fixed, **{k: v[0] for k, v in swept.items()}} or None,
        aggregator=aggregator, aggregator_options=agg_fixed or None, sampling=sampling,
        skip_nonfinite_clients=skip_nonfinite_clients or None,
        tensorboard=tensorboard or None,
        out=str(out) if out is not None else None), default_task=None)
    if cfg.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg = config.ExperimentConfig(**{**cfg.to_dict(), "out": str(
            Path("runs") / cfg.task / f"sweep-{cfg.algorithm}-{stamp}")})
    sw = Sweep.grid(cfg, client_lr=client_lrs, server_lr=server_lrs, seeds=seed_list,
                    options=swept, seeds_together=seeds_together, out_dir=cfg.out)
    k = len(sw.members)
    varied = ", ".join(sw.swept() + (["seed"] if len({m.seed for m in sw.members}) > 1
                                     else [])) or "nothing"
    console.print(f"[bold]{cfg.task}[/] with [bold]{cfg.algorithm}[/]: {k} member"
                  f"{'s' if k > 1 else ''} ({varied} varied), {cfg.rounds} rounds x "
                  f"{cfg.clients_per_round} clients, batch {cfg.batch_size}; sweep dir {cfg.out}")
    result = _run_with_progress(sw)
    _print_table(sw, result, metric)


def _run_with_progress(sw: Sweep) -> SweepResult:
    rounds, k = sw.config.rounds, len(sw.members)
    progress = Progress(
        TextColumn("round"), MofNCompleteColumn(), BarColumn(),
        TextColumn("best loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=console)
    start = time.perf_counter()
    losses: dict[int, dict[int, float]] = {}
    evals: dict[int, list] = {}
    timing = {}
    with progress:
        bar = progress.add_task("sweep", total=rounds, loss="-", speed="", note="compiling...")

        def on_record(record):
            r = record["round"]
            if record["kind"] == "train":
                losses.setdefault(r, {})[record["member"]] = record.get("train/loss", math.nan)
                if len(losses[r]) < k:
                    return
                finite = [v for v in losses.pop(r).values() if math.isfinite(v)]
                if "first" not in timing:
                    timing["first"], timing["round"] = time.perf_counter(), r
                    speed = ""
                else:
                    rate = (r - timing["round"]) / (time.perf_counter() - timing["first"])
                    speed = f"{rate:.2f} rounds/s"
                progress.update(bar, completed=r, speed=speed,
                                loss=f"{min(finite):.4f}" if finite else "nan",
                                note="evaluating..." if r == rounds else "")
            elif r < rounds:
                evals.setdefault(r, []).append((record.get("test/accuracy"), record["member"]))
                if len(evals[r]) == k:
                    scored = [(a, m) for a, m in evals.pop(r) if a is not None
                              and math.isfinite(a)]
                    if scored:
                        acc, best = max(scored)
                        progress.console.print(f"round {r}: best test accuracy {acc:.4f} "
                                               f"({sw.members[best].label})", highlight=False)

        result = sw.run(on_record)
        progress.update(bar, note="")
    console.print(f"done in {time.perf_counter() - start:.1f} s ({k} members)")
    return result


def _print_table(sw: Sweep, result: SweepResult, metric: str | None) -> None:
    metric = metric or default_metric(result.members[0].final)
    split, _, name = metric.partition("/")
    if name not in result.members[0].final.get(split, {}):
        have = sorted(f"{s}/{n}" for s, v in result.members[0].final.items() for n in v)
        raise ConfigError(f"no final metric {metric!r} to sort by; choose one of: "
                          f"{', '.join(have)}")
    options = sorted(sw.members[0].options)
    table = Table(title=f"{sw.config.task}: {len(sw.members)} members after round "
                        f"{sw.config.rounds}, best {metric} first")
    for col in ["#", "client lr", "server lr", *options, "seed"]:
        table.add_column(col, justify="right")
    shown = [metric] + [m for m in ("test/accuracy", "test/loss", "train/loss")
                        if m != metric]
    shown = [m for m in shown
             if m.partition("/")[2] in result.members[0].final.get(m.partition("/")[0], {})]
    for col in shown:
        table.add_column(col, justify="right")
    notes = any(m.diverged_round is not None for m in result.members)
    if notes:
        table.add_column("note")
    for rank, m in enumerate(result.ranked(metric), 1):
        values = [m.final.get(c.partition("/")[0], {}).get(c.partition("/")[2]) for c in shown]
        table.add_row(str(rank), f"{m.member.client_lr:g}", f"{m.member.server_lr:g}",
                      *(_setting(m.member.options[o]) for o in options), str(m.member.seed),
                      *(_fmt(v) for v in values),
                      *([] if not notes else [
                          "" if m.diverged_round is None
                          else f"diverged at round {m.diverged_round}"]))
    console.print(table)
    if sw.out_dir is not None:
        console.print(f"wrote {sw.out_dir / SUMMARY_FILE}, {sw.out_dir / 'summary.csv'} and "
                      f"one run directory per member under {sw.out_dir / 'members'}",
                      highlight=False)


def register(main_app: typer.Typer) -> None:
    """Adds `sweep` as a top-level command of `main_app`."""
    main_app.command("sweep")(sweep)
