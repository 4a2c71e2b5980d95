"""`fedjax bench`: the benchmark suite (`benchmarks.run`) with a table of the results.

The suite itself (scenarios, the sequential baseline, the measurements) lives in the
`benchmarks` package; this module parses the options, runs it and prints the table.
Register the command on the main app with `register(app)`.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from cli.common import console, user_errors
from fedjax_api.errors import ConfigError


@user_errors
def bench(
    scenarios: Annotated[Optional[list[str]], typer.Argument(
        help="Scenarios to run (default: all): emnist-cnn, emnist-logreg, shakespeare-lstm, "
             "stackoverflow-lstm, cohort-1000, cohort-10000, emnist-eval.",
        show_default=False)] = None,
    rounds: Annotated[Optional[int], typer.Option(
        help="Timed rounds per scenario (evaluation: timed repetitions). Default 20, "
             "--quick 5.")] = None,
    warmup: Annotated[Optional[int], typer.Option(
        help="Untimed rounds first. Default 3, --quick 1.")] = None,
    select_rounds: Annotated[Optional[int], typer.Option(
        help="Rounds timed per candidate chunk size before the fastest is chosen. "
             "Default 3.")] = None,
    chunk_sizes: Annotated[Optional[str], typer.Option(
        help="Candidate chunk sizes, e.g. 1,10,100. Default: each scenario's own.")] = None,
    num_clients: Annotated[Optional[int], typer.Option(
        help="Population size, to scale a scenario down.")] = None,
    clients_per_round: Annotated[Optional[int], typer.Option(
        help="Cohort size, to scale a scenario down.")] = None,
    baseline_clients: Annotated[Optional[int], typer.Option(
        help="Larger cohorts: the baseline times this many clients of each and "
             "extrapolates. Default 1000.")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="A smoke run: 5 timed rounds, 1 warm-up, one chunk size.")] = False,
    no_baseline: Annotated[bool, typer.Option(
        "--no-baseline", help="Time only the library's round.")] = False,
    out: Annotated[Optional[Path], typer.Option(
        help="Directory for the JSON results. Default: benchmarks/results.")] = None,
    fedjax_json: Annotated[Optional[Path], typer.Option(
        help="JSON of FedJAX 0.0.17's own benchmark (fedjax_emnist_bench.py --json-out), "
             "to compare emnist-cnn and emnist-eval with.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds allowed per worker process.")] = 3600.0,
) -> None:
    """Time FedAvg rounds and evaluation against a FedJAX-style sequential loop."""
    try:
        from benchmarks import run
        from benchmarks.scenarios import SCENARIOS
    except ImportError as e:
        raise ConfigError(f"cannot import the benchmark suite ({e}); reinstall the package "
                          "(pip install -e .), whose pyproject lists `benchmarks`") from None

    unknown = [s for s in scenarios or [] if s not in SCENARIOS]
    if unknown:
        raise ConfigError(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    if fedjax_json is not None and not fedjax_json.is_file():
        raise ConfigError(f"--fedjax-json {fedjax_json}: no such file (write it with "
                          "fedjax_emnist_bench.py --json-out)")
    for name, value in (("rounds", rounds), ("select-rounds", select_rounds),
                        ("num-clients", num_clients), ("clients-per-round", clients_per_round),
                        ("baseline-clients", baseline_clients)):
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}")
    if warmup is not None and warmup < 0:
        raise ConfigError(f"--warmup must be non-negative, got {warmup}")
    try:
        options = run.make_options(rounds, warmup, select_rounds, chunk_sizes, num_clients,
                                   clients_per_round, baseline_clients, quick)
    except ValueError:
        raise ConfigError(f"--chunk-sizes expects comma-separated integers, got {chunk_sizes!r}"
                          ) from None
    summary = run.run_suite(scenarios or None, options, out, fedjax_json,
                            baseline=not no_baseline, timeout=timeout)
    table = Table(title="fedjax bench (medians; speed-up = baseline s / ours s)",
                  box=box.SIMPLE_HEAD)
    for _, header, _ in run.COLUMNS:
        table.add_column(header, justify="left" if header == "scenario" else "right",
                         no_wrap=True)
    rows = [summary["rows"][n] for n in summary["scenarios_run"] if n in summary["rows"]]
    for r in rows:
        table.add_row(*run.table_cells(r))
    # Cells never wrap: on a narrow terminal the rows run past its edge instead.
    Console(width=max(console.width, 120)).print(table)
    for r in rows:
        if r.get("speedup_vs_fedjax") is not None:
            console.print(f"{r['scenario']}: FedJAX 0.0.17 {r['fedjax_s']:.3f} s, speed-up "
                          f"{r['speedup_vs_fedjax']:.2f}x", highlight=False)
        if r.get("error"):
            console.print(f"{r['scenario']}: {r['error']}", highlight=False)
    if any(r.get("baseline_extrapolated") for r in rows):
        console.print("* baseline extrapolated from a subset of each cohort's clients",
                      highlight=False)
    m = summary["machine"]
    console.print(f"machine: {m['cpu_model']}, {m['cpu_count']} cores, jax {m['jax']} "
                  f"({m['backend']}); JSON in {out or run.default_out()}", highlight=False)
    where = "device memory (memory_stats peak_bytes_in_use)" if m["backend"] != "cpu" \
        else "host peak RSS"
    console.print(f"peak MB: {where}; FLOP/s %: against the f32 matmul peak measured in the "
                  f"same run, at the default matmul precision (TF32 on NVIDIA GPUs)",
                  highlight=False)
    if any(r.get("error") for r in rows):
        raise typer.Exit(1)


def register(main_app: typer.Typer) -> None:
    """Adds `bench` as a top-level command of `main_app`."""
    main_app.command()(bench)
