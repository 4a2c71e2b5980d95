"""`fedjax run | resume | tasks | algorithms`.

No federated logic lives here: the options (made from the run-option schema, see
`cli.options`) become an `ExperimentConfig`, the facade runs it, and this module only shows
progress (`cli.progress`) and results. A user's mistake prints one line `error: ...` and
exits with code 2.
"""

import datetime
import inspect
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import attrs
import typer
from rich.table import Table

from cli import bench, data, export, options, privacy, process, report, sweep
from cli.common import console, print_error, user_errors
from cli.options import Command
from cli.progress import ProgressBar
from fedjax_api import accelerator, config, configfile, distributed, listing
from fedjax_api.compile_cache import enable_compilation_cache
from fedjax_api.config import ExperimentConfig
from fedjax_api.experiment import Experiment, Interrupted, RunResult
from fedjax_api.options import Schema
from fedjax_api.resume import resume_config

DEFAULT_TASK = options.DEFAULT_TASK

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="fedjax-sim: federated learning simulation on JAX.")
app.add_typer(data.app, name="data")
app.add_typer(privacy.app, name="privacy")
report.register(app)
bench.register(app)
sweep.register(app)
export.register(app)


def run_command(schema: Schema = config.OPTIONS) -> Command:
    """`fedjax run` with the options of `schema` (`fedjax_api.config.OPTIONS`)."""

    @user_errors
    def run(*, task: str | None, config_file: Path | None, set_: list[str] | None,
            coordinator: str | None, num_processes: int | None, process_id: int | None,
            **given: Any) -> None:
        """Train a task with a federated algorithm and report train/test metrics."""
        options.check_task_word(task, schema)
        cfg = configfile.resolve_file(config_file, set_ or [], {
            **options.values(schema, "run", given), "task": task},
            default_task=DEFAULT_TASK, schema=schema)
        accelerator.prepare(cfg)  # CPU devices, deterministic ops: before JAX starts
        distributed.initialize(coordinator, num_processes, process_id)
        if cfg.out is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            cfg = attrs.evolve(cfg, out=str(Path("runs") / cfg.task / f"{cfg.algorithm}-{stamp}"))
        _train(cfg)

    return options.command(run, [*options.parameters(schema, "run"),
                                 *options.file_parameters(), *options.launch_parameters()])


def resume_command(schema: Schema = config.OPTIONS) -> Command:
    """`fedjax resume` with the resumable options of `schema`."""

    @user_errors
    def resume(*, run_dir: Path, allow_changes: str | None, coordinator: str | None,
               num_processes: int | None, process_id: int | None, **given: Any) -> None:
        """Continue a run from its newest good checkpoint; the same seed gives the same result.

        A run of several processes resumes with the same processes: start each again with
        `fedjax resume RUN_DIR` and its own --process-id (or the FEDJAX_* variables).
        """
        allowed = tuple(k.strip().replace("-", "_") for k in (allow_changes or "").split(",")
                        if k.strip())
        changes = {k: v for k, v in options.values(schema, "resume", given).items()
                   if v is not None}
        cfg = resume_config(run_dir, changes, allowed, schema=schema)
        accelerator.prepare(cfg)  # CPU devices, deterministic ops: before JAX starts
        distributed.initialize(coordinator, num_processes, process_id)
        _train(cfg, resuming=True)

    run_dir = Annotated[Path, typer.Argument(help="The run directory to continue.")]
    allow = Annotated[str | None, typer.Option(help="Comma-separated options allowed to differ "
                                                    "from the checkpoint's config, e.g. rounds.")]
    return options.command(resume, [
        options.param("run_dir", run_dir, inspect.Parameter.empty),
        *options.parameters(schema, "resume"), options.param("allow_changes", allow),
        *options.launch_parameters()])


run = app.command("run")(run_command())
resume = app.command("resume")(resume_command())


def _train(cfg: ExperimentConfig, resuming: bool = False) -> None:
    """Loads and describes the experiment of `cfg`, runs it with a progress bar and prints
    the results; an interrupted run exits 130 (one that reached its time limit 3)."""
    with console.status(f"loading task {cfg.task}..."):
        exp = Experiment.from_config(cfg, resuming=resuming)
    extras = "".join(f", {k}={v}" for k, v in cfg.algorithm_options.items())
    if cfg.aggregator != "mean":
        extras += f", aggregator {cfg.aggregator}" + "".join(
            f" {k}={v}" for k, v in cfg.aggregator_options.items())
    if cfg.precision != "f32":
        extras += f", precision {cfg.precision}"
    console.print(f"[bold]{cfg.task}[/] with [bold]{cfg.algorithm}[/]{extras}: {cfg.rounds} rounds x "
                  f"{cfg.clients_per_round} clients, batch {cfg.batch_size}, client lr "
                  f"{cfg.client_lr:g}, server lr {cfg.server_lr:g}, seed {cfg.seed}")
    if exp.privacy is not None:
        console.print(exp.privacy.description, highlight=False)
    t = exp.task
    console.print(f"{t.train.num_clients} training clients ({t.train.num_examples} examples), "
                  f"{t.test.num_clients} test clients ({t.test.num_examples} examples); "
                  f"run dir {cfg.out}")
    sampled = exp.evaluator().describe()  # --eval-test-clients
    if sampled is not None:
        console.print(sampled, highlight=False)
    console.print(accelerator.describe(exp.plan.chunk_size, cfg.chunk_size is not None),
                  highlight=False)
    if exp.plan.mesh is not None:
        console.print(distributed.describe(exp.plan), highlight=False)
    start = time.perf_counter()
    try:
        result = exp.run(resume=resuming, callbacks=[ProgressBar(exp.rounds)])
    except Interrupted as e:
        print_error(str(e))
        raise typer.Exit(process.exit_code(e)) from None
    console.print(f"done in {time.perf_counter() - start:.1f} s")
    if result.stopped:
        console.print(f"stopped after round {result.server.round}: {result.stopped}")
    _print_results(exp, result)


def _print_results(exp: Experiment, result: RunResult) -> None:
    table = Table(title=f"{exp.task.name}: metrics after round {result.server.round}")
    table.add_column("metric")
    n_train = min(exp.eval_train_clients, exp.task.train.num_clients)
    table.add_column(f"train ({n_train} clients)", justify="right")
    n_test = exp.evaluator().test_sample(final=True).num_clients
    table.add_column(f"test ({n_test} clients)", justify="right")
    names = sorted(set(result.final["test"]) | set(result.final["train"]))
    for name in names:
        cells = []
        for split in ("train", "test"):
            v = result.final[split].get(name)
            cells.append("-" if v is None else (f"{v:.0f}" if name == "num_examples" else f"{v:.4f}"))
        table.add_row(name, *cells)
    console.print(table)
    if result.host:
        console.print(f"host work (sampling, packing): {result.host['host_s']:.1f} s, "
                      f"{result.host['hidden_fraction']:.0%} of it hidden behind training")
    for name, value in exp.task.baselines.items():
        test_value = result.final["test"].get(name)
        line = f"baseline (most frequent class) {name}: {value:.4f}"
        if test_value is not None:
            line += f"; model: {test_value:.4f} ({test_value - value:+.4f})"
        console.print(line)


@app.command("tasks")
def list_tasks() -> None:
    """List the canned tasks and their defaults."""
    table = Table(title="tasks")
    for col in ("name", "description", "defaults"):
        table.add_column(col)
    for row in listing.tasks():
        table.add_row(*row)
    console.print(table)


@app.command("algorithms")
def list_algorithms() -> None:
    """List the federated algorithms and aggregators, with their options and papers."""
    for title, entries in (("algorithms (--algorithm NAME --option NAME=VALUE)",
                            listing.algorithm_entries()),
                           ("aggregators (--aggregator NAME --aggregator-option NAME=VALUE)",
                            listing.aggregator_entries())):
        console.print(f"[bold]{title}[/]")
        for e in entries:
            console.print(f"  [bold]{e.name:<18}[/] {e.description}", soft_wrap=True,
                          highlight=False)
            console.print(f"  {'':<18} options: {listing.options_text(e.options)}; paper: "
                          f"{e.paper}", soft_wrap=True, highlight=False, style="dim")
        console.print()


def main() -> None:
    """Console-script entry point: also a malformed option prints one line, exit 2.

    Turns on JAX's persistent compilation cache under the cache directory first, so a
    second run of the same task starts warm (`FEDJAX_COMPILATION_CACHE=0` turns it off)."""
    process.install()  # Ctrl-C/SIGTERM: one line and 130/143; one-line warnings
    enable_compilation_cache()
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # malformed command line (typer >= 0.29 owns its parser)
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        if e.format_message():  # none after the help of a bare `fedjax` (no_args_is_help)
            print_error(f"{e.format_message()}{hint}")
        code = getattr(e, "exit_code", 2)
    except typer.Abort:
        print_error("aborted")
        code = 130
    code = process.after_command(code)  # a signal outside the round loop: one line, 130/143
    sys.exit(code if isinstance(code, int) else 0)
