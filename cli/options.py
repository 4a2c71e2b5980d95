"""Command-line options that several commands declare the same way (`run`, `resume`,
`sweep`): one `Annotated` type each, so their names, help and defaults stay in step."""

from typing import Annotated, Optional

import typer

Rounds = Annotated[Optional[int], typer.Option(help="Training rounds.")]
ClientsPerRound = Annotated[Optional[int], typer.Option(help="Clients sampled per round.")]
BatchSize = Annotated[Optional[int], typer.Option(help="Client batch size.")]
Epochs = Annotated[Optional[int], typer.Option(help="Local epochs per round.")]
EvalTrainClients = Annotated[Optional[int], typer.Option(
    help="Training clients (a fixed sample) evaluated at the end.")]
MaxSteps = Annotated[Optional[int], typer.Option(
    help="Cap on each client's local steps per round. Default: the task's.")]
DataDir = Annotated[Optional[str], typer.Option(
    help="Where a task reads its files (e.g. the LEAF folder for femnist-leaf).")]

# Several processes (fedjax_api.distributed.initialize).
Coordinator = Annotated[Optional[str], typer.Option(
    metavar="HOST:PORT",
    help="Several processes: process 0's address and a free port, the same for every "
         "process; `auto` lets JAX detect a TPU pod, Slurm or Open MPI cluster. "
         "Default: $FEDJAX_COORDINATOR.")]
NumProcesses = Annotated[Optional[int], typer.Option(
    help="Several processes: how many. Default: $FEDJAX_NUM_PROCESSES.")]
ProcessId = Annotated[Optional[int], typer.Option(
    help="Several processes: this one, 0 .. P-1; process 0 writes the run directory. "
         "Default: $FEDJAX_PROCESS_ID.")]
