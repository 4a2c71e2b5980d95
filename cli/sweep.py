"""`fedjax sweep`: several learning rates, options and seeds of one task, trained as one program.

The options are those of `fedjax run`; `--client-lr`, `--server-lr`, `--seeds` and
`--option NAME=V1,V2` take comma-separated values, and the sweep trains every combination
(`fedjax_api.sweep.Sweep.grid`). Register the command on the main app with `register(app)`.
"""

import datetime
import math
import time
from pathlib import Path
from typing import Annotated, Any

import attrs
import typer
from rich.table import Table

from cli import options, process
from cli.common import console, print_error, user_errors
from cli.options import Command
from cli.progress import ProgressBar
from fedjax_api import accelerator, config, configfile
from fedjax_api.errors import ConfigError
from fedjax_api.loop import Interrupted
from fedjax_api.options import Schema
from fedjax_api.sweep import SUMMARY_FILE, Sweep, SweepResult, default_metric

SeedsTogether = Annotated[int, typer.Option(
    help="Seeds trained together under vmap (1: one after another inside the program, "
         "the fastest on a CPU; more can fill a GPU).")]
Metric = Annotated[str | None, typer.Option(
    help="Final metric the table is sorted by, e.g. test/loss. Default: test/accuracy "
         "(test/loss when the task reports no accuracy).")]


def _setting(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else str(value)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def sweep_command(schema: Schema = config.OPTIONS) -> Command:
    """`fedjax sweep` with the options of `schema` that a sweep takes."""

    @user_errors
    def sweep(*, task: str | None, seeds_together: int, metric: str | None,
              config_file: Path | None, set_: list[str] | None, **given: Any) -> None:
        """Train every combination of learning rates, options and seeds as one program per round."""
        if metric is not None and (metric.partition("/")[0] not in ("test", "train")
                                   or not metric.partition("/")[2]):
            raise ConfigError(f"--metric names a final test or train metric, e.g. "
                              f"test/accuracy or test/loss; got {metric!r}")
        lists = options.sweep_lists(schema, given)
        cfg = configfile.resolve_file(config_file, set_ or [], {
            **options.values(schema, "sweep", given), "task": task}, schema=schema)
        accelerator.set_deterministic(cfg.deterministic)  # before JAX starts
        if cfg.out is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            cfg = attrs.evolve(cfg, out=str(Path("runs") / cfg.task /
                                            f"sweep-{cfg.algorithm}-{stamp}"))
        sw = Sweep.grid(cfg, client_lr=lists["client_lr"], server_lr=lists["server_lr"],
                        seeds=lists["seed"], options=lists["algorithm_options"],
                        seeds_together=seeds_together, out_dir=cfg.out)
        k = len(sw.members)
        varied = ", ".join(sw.swept() + (["seed"] if len({m.seed for m in sw.members}) > 1
                                         else [])) or "nothing"
        console.print(f"[bold]{cfg.task}[/] with [bold]{cfg.algorithm}[/]: {k} member"
                      f"{'s' if k > 1 else ''} ({varied} varied), {cfg.rounds} rounds x "
                      f"{cfg.clients_per_round} clients, batch {cfg.batch_size}; sweep dir "
                      f"{cfg.out}")
        start = time.perf_counter()
        try:
            result = sw.run(callbacks=[ProgressBar(cfg.rounds, [m.label for m in sw.members])])
        except Interrupted as e:
            print_error(str(e))
            raise typer.Exit(process.exit_code(e)) from None
        console.print(f"done in {time.perf_counter() - start:.1f} s ({k} members)")
        _print_table(sw, result, metric)

    return options.command(sweep, [*options.parameters(schema, "sweep"),
                                   options.param("seeds_together", SeedsTogether, 1),
                                   options.param("metric", Metric), *options.file_parameters()])


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


sweep = sweep_command()


def register(main_app: typer.Typer) -> None:
    """Adds `sweep` as a top-level command of `main_app`."""
    main_app.command("sweep")(sweep)
