"""`fedjax run | tasks | algorithms`.

No federated logic lives here: options become an `ExperimentConfig`, the facade runs it,
and this module only shows progress and results. A user's mistake prints one line
`error: ...` and exits with code 2.
"""

import datetime
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli import bench, data, options, privacy, report, sweep
from cli.common import console, print_error, user_errors
from fedjax_api import config, configfile, distributed, tasks
from fedjax_api.compile_cache import enable_compilation_cache
from fedjax_api.experiment import Experiment, Interrupted
from fedjax_api.resume import resume_config
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.algorithms import registry

DEFAULT_TASK = "shakespeare-plays"

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="fedjax-sim: federated learning simulation on JAX.")
app.add_typer(data.app, name="data")
app.add_typer(privacy.app, name="privacy")
report.register(app)
bench.register(app)
sweep.register(app)


def _default_out(task: str, algorithm: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / task / f"{algorithm}-{stamp}"


@app.command()
@user_errors
def run(
    task: Annotated[Optional[str], typer.Argument(
        help=f"Task to run: {', '.join(tasks.names())} (see `fedjax tasks`). "
             f"Default: {DEFAULT_TASK}.")] = None,
    algorithm: Annotated[Optional[str], typer.Option(
        help=f"Federated algorithm: {', '.join(sorted(registry.ALGORITHMS))} (options: "
             "`fedjax algorithms`). Default: the task's.")] = None,
    rounds: options.Rounds = None,
    clients_per_round: options.ClientsPerRound = None,
    client_lr: Annotated[Optional[float], typer.Option(help="Client SGD learning rate.")] = None,
    server_lr: Annotated[Optional[float], typer.Option(
        help="Server learning rate. Default: the task's value for the algorithm.")] = None,
    batch_size: options.BatchSize = None,
    epochs: options.Epochs = None,
    seed: Annotated[Optional[int], typer.Option(
        help="Seed of sampling, shuffling, init and client keys. Default: 0.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(
        help="Evaluate on the test set at round 0 and every N rounds (0: only at the end).")] = None,
    eval_train_clients: options.EvalTrainClients = None,
    chunk_size: Annotated[Optional[int], typer.Option(
        help="Clients trained together under vmap (1: one by one).")] = None,
    device_data: Annotated[bool, typer.Option(
        "--device-data", help="Keep every training example on the device; each round "
        "sends an index (large cohorts of small examples).")] = False,
    devices: Annotated[Optional[int], typer.Option(
        help="Devices (per process) each round's clients are split over; 0: all. On a "
             "CPU-only machine, starts that many CPU devices. Default: 1.")] = None,
    coordinator: options.Coordinator = None,
    num_processes: options.NumProcesses = None,
    process_id: options.ProcessId = None,
    max_steps: options.MaxSteps = None,
    data: options.DataDir = None,
    option: Annotated[Optional[list[str]], typer.Option(
        "--option", metavar="NAME=VALUE",
        help="An algorithm option, repeatable, e.g. --option proximal_weight=0.1 "
             "(see `fedjax algorithms`).")] = None,
    aggregator: Annotated[Optional[str], typer.Option(
        help=f"How the server combines client updates: "
             f"{', '.join(sorted(aggregators.AGGREGATORS))} (options: `fedjax algorithms`). "
             "Default: mean.")] = None,
    aggregator_option: Annotated[Optional[list[str]], typer.Option(
        "--aggregator-option", metavar="NAME=VALUE",
        help="An aggregator option, repeatable, e.g. --aggregator-option beta=0.1.")] = None,
    personalize_steps: Annotated[Optional[int], typer.Option(
        help="At each evaluation, also fine-tune on each test client's own training "
             "data for this many steps and report the per-client accuracy.")] = None,
    sampling: Annotated[Optional[str], typer.Option(
        help="Client sampling: uniform (fixed cohort, without replacement) or poisson "
             "(each client with probability clients-per-round / clients). Default: uniform.")] = None,
    clip: Annotated[Optional[float], typer.Option(
        help="DP: L2 norm each client's update is clipped to (initial norm with "
             "--adaptive-clip).")] = None,
    noise_multiplier: Annotated[Optional[float], typer.Option(
        help="DP: Gaussian noise std on the clipped sum, in units of --clip.")] = None,
    dp_epsilon: Annotated[Optional[float], typer.Option(
        help="DP: target epsilon after all rounds; calibrates --noise-multiplier.")] = None,
    dp_delta: Annotated[Optional[float], typer.Option(help="DP: target delta.")] = None,
    dp_accountant: Annotated[Optional[str], typer.Option(
        help="DP accountant: rdp or pld. Default: rdp.")] = None,
    adaptive_clip: Annotated[bool, typer.Option(
        "--adaptive-clip", help="DP: adapt the clip norm to the median update norm "
                                "(private quantile estimation).")] = False,
    noise_cohort_size: Annotated[Optional[int], typer.Option(
        help="DP: add the noise a cohort of this many clients would need (simulate fewer).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        help="Write a checkpoint every N rounds (and after the last). 0: only after the "
             "last. Default: 50.")] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option(
        help="Checkpoints kept (the newest). Default: 3.")] = None,
    tensorboard: Annotated[bool, typer.Option(
        "--tensorboard", help="Also write TensorBoard event files of every metric (needs "
                              "the tensorboard extra).")] = False,
    skip_nonfinite_clients: Annotated[bool, typer.Option(
        "--skip-nonfinite-clients",
        help="Drop clients whose update is NaN or infinite (counted) instead of stopping.")] = False,
    config_file: Annotated[Optional[Path], typer.Option(
        "--config", help="TOML experiment config (docs/config.md); options given on the "
                         "command line override it.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE",
        help="Override a config key, repeatable, e.g. --set client.lr=0.1.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Run directory for config.json and metrics.jsonl. Default: runs/TASK/ALGORITHM-TIME.")] = None,
) -> None:
    """Train a task with a federated algorithm and report train/test metrics."""
    cfg = configfile.resolve_file(config_file, set_ or [], dict(
        task=task, algorithm=algorithm, rounds=rounds, clients_per_round=clients_per_round,
        client_lr=client_lr, server_lr=server_lr, batch_size=batch_size, epochs=epochs,
        seed=seed, eval_every=eval_every, eval_train_clients=eval_train_clients,
        chunk_size=chunk_size, devices=devices, device_data=device_data or None,
        max_steps=max_steps, data=data,
        algorithm_options=_name_values("--option", option),
        aggregator=aggregator, aggregator_options=_name_values("--aggregator-option",
                                                               aggregator_option),
        personalize_steps=personalize_steps, sampling=sampling, clip=clip,
        noise_multiplier=noise_multiplier, dp_epsilon=dp_epsilon, dp_delta=dp_delta,
        dp_accountant=dp_accountant, adaptive_clip=adaptive_clip or None,
        noise_cohort_size=noise_cohort_size, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, skip_nonfinite_clients=skip_nonfinite_clients or None,
        tensorboard=tensorboard or None,
        out=str(out) if out is not None else None), default_task=DEFAULT_TASK)
    distributed.request_cpu_devices(cfg.devices)  # before JAX starts: no effect after
    distributed.initialize(coordinator, num_processes, process_id)
    if cfg.out is None:
        cfg = config.ExperimentConfig(**{**cfg.to_dict(),
                                         "out": str(_default_out(cfg.task, cfg.algorithm))})
    with console.status(f"loading task {cfg.task}..."):
        exp = Experiment.from_config(cfg)
    _describe(cfg, exp)
    result = _run_with_progress(exp)
    _print_results(exp, result)


@app.command()
@user_errors
def resume(
    run_dir: Annotated[Path, typer.Argument(help="The run directory to continue.")],
    rounds: Annotated[Optional[int], typer.Option(
        help="Train to this many rounds in all (a change: needs --allow-changes rounds).")] = None,
    allow_changes: Annotated[Optional[str], typer.Option(
        help="Comma-separated options allowed to differ from the checkpoint's config, "
             "e.g. rounds.")] = None,
    coordinator: options.Coordinator = None,
    num_processes: options.NumProcesses = None,
    process_id: options.ProcessId = None,
) -> None:
    """Continue a run from its newest good checkpoint; the same seed gives the same result.

    A run of several processes resumes with the same processes: start each again with
    `fedjax resume RUN_DIR` and its own --process-id (or the FEDJAX_* variables).
    """
    allowed = tuple(k.strip().replace("-", "_") for k in (allow_changes or "").split(",")
                    if k.strip())
    cfg = resume_config(run_dir, {"rounds": rounds} if rounds is not None else None, allowed)
    distributed.request_cpu_devices(cfg.devices)  # before JAX starts: no effect after
    distributed.initialize(coordinator, num_processes, process_id)
    with console.status(f"loading task {cfg.task}..."):
        exp = Experiment.from_config(cfg, resuming=True)
    _describe(cfg, exp)
    result = _run_with_progress(exp, resume=True)
    _print_results(exp, result)


def _describe(cfg, exp) -> None:
    extras = "".join(f", {k}={v}" for k, v in cfg.algorithm_options.items())
    if cfg.aggregator != "mean":
        extras += f", aggregator {cfg.aggregator}" + "".join(
            f" {k}={v}" for k, v in cfg.aggregator_options.items())
    console.print(f"[bold]{cfg.task}[/] with [bold]{cfg.algorithm}[/]{extras}: {cfg.rounds} rounds x "
                  f"{cfg.clients_per_round} clients, batch {cfg.batch_size}, client lr "
                  f"{cfg.client_lr:g}, server lr {cfg.server_lr:g}, seed {cfg.seed}")
    if exp.privacy is not None:
        console.print(exp.privacy.description, highlight=False)
    t = exp.task
    console.print(f"{t.train.num_clients} training clients ({t.train.num_examples} examples), "
                  f"{t.test.num_clients} test clients ({t.test.num_examples} examples); "
                  f"run dir {cfg.out}")
    if exp.plan.mesh is not None:
        console.print(distributed.describe(exp.plan), highlight=False)


def _name_values(flag: str, items: list[str] | None) -> dict | None:
    """`["a=1", "b=adam"]` -> `{"a": 1, "b": "adam"}` (JSON numbers and booleans parsed)."""
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise config.ConfigError(f"{flag} expects NAME=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[name.strip()] = value
    return out


def _run_with_progress(exp: Experiment, resume: bool = False):
    progress = Progress(
        TextColumn("round"), MofNCompleteColumn(), BarColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(), TextColumn("{task.fields[note]}"),
        console=console, transient=False)
    start = time.perf_counter()
    timing = {"first": None}
    with progress:
        bar = progress.add_task("train", total=exp.rounds, loss="-", speed="", note="compiling...")

        def on_record(record):
            if record["kind"] == "train":
                r = record["round"]
                if timing["first"] is None:
                    timing["first"], timing["first_round"] = time.perf_counter(), r
                    speed = ""
                else:
                    rate = (r - timing["first_round"]) / (time.perf_counter() - timing["first"])
                    speed = f"{rate:.2f} rounds/s"
                note = "evaluating..." if r == exp.rounds else ""
                progress.update(bar, completed=r, loss=f"{record['train/loss']:.4f}",
                                speed=speed, note=note)
            else:
                acc = record.get("test/accuracy")
                if acc is not None and record["round"] < exp.rounds:  # the final one is tabled
                    progress.console.print(f"round {record['round']}: test accuracy {acc:.4f}")

        try:
            result = exp.run(on_record, resume=resume)
        except Interrupted as e:
            progress.stop()
            print_error(str(e))
            raise typer.Exit(130) from None
        progress.update(bar, note="")
    console.print(f"done in {time.perf_counter() - start:.1f} s")
    return result


def _print_results(exp: Experiment, result) -> None:
    table = Table(title=f"{exp.task.name}: metrics after round {exp.rounds}")
    table.add_column("metric")
    n_train = min(exp.eval_train_clients, exp.task.train.num_clients)
    table.add_column(f"train ({n_train} clients)", justify="right")
    table.add_column(f"test ({exp.task.test.num_clients} clients)", justify="right")
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
    for name in tasks.names():
        e = tasks.entry(name)
        d = e.defaults
        table.add_row(name, e.description,
                      f"{d.algorithm}, {d.rounds} rounds x {d.clients_per_round} clients, "
                      f"batch {d.batch_size}, client lr {d.client_lr:g}")
    console.print(table)


def _format_options(opts: dict, skip=()) -> str:
    return ", ".join(k if v is inspect.Parameter.empty else f"{k}={v}"
                     for k, v in opts.items() if k not in skip)


@app.command("algorithms")
def list_algorithms() -> None:
    """List the federated algorithms and aggregators, with their options and papers."""
    def show(title, table, options, skip=lambda e: ()):
        console.print(f"[bold]{title}[/]")
        for name in sorted(table):
            e = table[name]
            console.print(f"  [bold]{name:<18}[/] {e.description}", soft_wrap=True,
                          highlight=False)
            opts = _format_options(options(name), skip(e)) or "none"
            console.print(f"  {'':<18} options: {opts}; paper: {e.paper}", soft_wrap=True,
                          highlight=False, style="dim")

    show("algorithms (--algorithm NAME --option NAME=VALUE)", registry.ALGORITHMS,
         registry.options, lambda e: e.needs)
    console.print()
    show("aggregators (--aggregator NAME --aggregator-option NAME=VALUE)",
         aggregators.AGGREGATORS, aggregators.options)


def main() -> None:
    """Console-script entry point: also a malformed option prints one line, exit 2.

    Turns on JAX's persistent compilation cache under the cache directory first, so a
    second run of the same task starts warm (`FEDJAX_COMPILATION_CACHE=0` turns it off)."""
    enable_compilation_cache()
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # malformed command line (typer >= 0.29 owns its parser)
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print_error(f"{e.format_message()}{hint}")
        code = getattr(e, "exit_code", 2)
    except typer.Abort:
        print_error("aborted")
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
