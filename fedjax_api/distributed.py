"""Several devices and several processes (hosts) running one federated simulation.

One process, several devices: `mesh(devices)` splits each round's cohort over that many
of the process's devices (`fedjax run --devices N`).

Several processes: JAX's multi-controller runtime. The same program runs once per
process (typically one per host, or one per GPU); `initialize` joins them, and then
`jax.devices()` lists every process's devices, so the mesh spans them all. Every process
samples the same cohort from the same seed, packs only the slots that land on its own
devices (`sample_cohort`), and the round runs as one computation over every device: the
server state is replicated on all of them, the cohort's clients are split over them,
and the aggregation's reduction crosses processes (over gloo on CPU, NCCL on GPU).

A process joins through `fedjax run --coordinator HOST:PORT --num-processes P
--process-id I`, or the environment variables `FEDJAX_COORDINATOR`,
`FEDJAX_NUM_PROCESSES`, `FEDJAX_PROCESS_ID`. `--coordinator auto` (or
`FEDJAX_COORDINATOR=auto`) calls `jax.distributed.initialize()` without arguments, so
that JAX detects the cluster itself (Cloud TPU pod slices, Slurm, Open MPI).

Only process 0 writes the run directory (config, metrics, checkpoints); every process
evaluates with its own copy of the replicated parameters, so every process's
`RunResult` holds the same numbers.
"""

import os
from typing import Mapping

import jax
import numpy as np

from fedjax_api.errors import ConfigError
from fedjax_core import parallel
from fedjax_core.data import Cohort
from fedjax_core.parallel import Plan

ENV_COORDINATOR = "FEDJAX_COORDINATOR"
ENV_NUM_PROCESSES = "FEDJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "FEDJAX_PROCESS_ID"
AUTO = "auto"
"""`coordinator="auto"`: let `jax.distributed.initialize()` detect the cluster."""


def _int_setting(name: str, value, env: str, environ: Mapping[str, str]) -> int | None:
    if value is None:
        raw = environ.get(env, "").strip()
        if not raw:
            return None
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{env} must be an integer, got {raw!r}") from None
    return int(value)


def settings(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None,
             environ: Mapping[str, str] | None = None) -> tuple[str, int | None, int | None] | None:
    """The multi-process settings: the arguments, else the `FEDJAX_*` environment variables.

    Returns:
      None when none is set (one process); `("auto", None, None)` for JAX's cluster
      detection; else `(coordinator, num_processes, process_id)`, all checked.

    Raises:
      ConfigError: a setting is missing or out of range.

    Example:
      >>> settings("10.0.0.1:1234", 2, 0)
      ('10.0.0.1:1234', 2, 0)
    """
    environ = os.environ if environ is None else environ
    if coordinator is None:
        coordinator = environ.get(ENV_COORDINATOR, "").strip() or None
    num_processes = _int_setting("num-processes", num_processes, ENV_NUM_PROCESSES, environ)
    process_id = _int_setting("process-id", process_id, ENV_PROCESS_ID, environ)
    if coordinator is None and num_processes is None and process_id is None:
        return None
    if coordinator == AUTO:
        return AUTO, num_processes, process_id
    missing = [flag for flag, v in (("--coordinator HOST:PORT", coordinator),
                                    ("--num-processes", num_processes),
                                    ("--process-id", process_id)) if v is None]
    if missing:
        raise ConfigError(f"several processes need {', '.join(missing)} too (or the "
                          f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID} "
                          "environment variables; --coordinator auto lets JAX detect a "
                          "TPU pod, Slurm or Open MPI cluster)")
    assert coordinator is not None and num_processes is not None and process_id is not None
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--coordinator must be HOST:PORT (process 0's address and a free "
                          f"port), got {coordinator!r}")
    if num_processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id must be between 0 and {num_processes - 1} "
                          f"(--num-processes {num_processes}), got {process_id}")
    return coordinator, num_processes, process_id


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               environ: Mapping[str, str] | None = None) -> bool:
    """Joins JAX's multi-process runtime (`jax.distributed.initialize`), if asked to.

    Call it before any JAX computation. Settings come from the arguments, else from
    `FEDJAX_COORDINATOR`, `FEDJAX_NUM_PROCESSES`, `FEDJAX_PROCESS_ID`; with none set it
    does nothing (one process). `coordinator="auto"` lets JAX detect the cluster (Cloud
    TPU, Slurm, Open MPI; `num_processes`/`process_id` are then passed on if given). On
    CPU the processes' collectives use gloo (JAX's default,
    `jax_cpu_collectives_implementation`).

    Args:
      coordinator: `HOST:PORT` of process 0 (every process gives the same), or "auto".
      num_processes: how many processes take part.
      process_id: this process, in `0 .. num_processes - 1`.
      environ: where the environment variables are read (default `os.environ`).

    Returns:
      True when this process runs with others (now or already), else False.

    Raises:
      ConfigError: incomplete or invalid settings, or JAX already ran a computation.

    Example:
      >>> initialize("10.0.0.1:1234", num_processes=2, process_id=0)   # on host 0
      >>> initialize("10.0.0.1:1234", num_processes=2, process_id=1)   # on host 1
    """
    found = settings(coordinator, num_processes, process_id, environ)
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if found is None:
        return False
    address, n, pid = found
    try:
        if address == AUTO:
            jax.distributed.initialize(num_processes=n, process_id=pid)
        else:
            jax.distributed.initialize(address, n, pid)
    except RuntimeError as e:
        raise ConfigError(f"cannot join the other processes: {e}") from None
    except ValueError as e:  # auto-detection found no cluster
        raise ConfigError(f"cannot detect the cluster ({e}); give --coordinator HOST:PORT "
                          "--num-processes P --process-id I") from None
    return jax.process_count() > 1


def request_cpu_devices(count: int) -> bool:
    """Asks JAX for `count` CPU devices (`jax_num_cpu_devices`), so that `--devices N` runs
    on a CPU-only machine; possible only before JAX has started its backends.

    Returns:
      True if set, False when `count` is at most 1 or at most the count already asked
      for, or when JAX already started (its device count stays).
    """
    if count <= 1 or count <= jax.config.values["jax_num_cpu_devices"]:
        return False
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        return False
    return True


def is_primary() -> bool:
    """True on process 0, the one that writes the run directory (always, with one process)."""
    return jax.process_index() == 0


def mesh(devices: int = 1) -> "jax.sharding.Mesh | None":
    """The mesh a run's cohorts are split over: `devices` devices of every process.

    Args:
      devices: devices used per process; 0: all of this process's devices. With one
        process, 1 gives no mesh (everything on the default device).

    Returns:
      A `parallel.client_mesh` over the chosen devices of every process (process by
      process), or None.

    Raises:
      ConfigError: more devices asked for than this process has.

    Example:
      >>> Plan(chunk_size=1, mesh=mesh(8))
    """
    if devices < 0:
        raise ConfigError(f"devices must be at least 0 (0: all), got {devices}")
    if devices == 1 and jax.process_count() == 1:
        return None
    local = jax.local_devices()
    count = len(local) if devices == 0 else devices
    if count > len(local):
        hint = (" (on a CPU-only machine, fedjax run --devices N starts N CPU devices; a script "
                "sets jax.config.update('jax_num_cpu_devices', N) before any JAX operation)"
                if local[0].platform == "cpu" else "")
        raise ConfigError(f"--devices {devices} asks for more devices than the {len(local)} "
                          f"{local[0].platform} device(s) of this process{hint}")
    chosen = [d for p in range(jax.process_count())
              for d in [d for d in jax.devices() if d.process_index == p][:count]]
    return parallel.client_mesh(devices=chosen)


def describe(plan: Plan) -> str:
    """One line on where a round runs, e.g. "clients split over 4 cpu devices, 2
    process(es); this is process 0"."""
    if plan.mesh is None:
        return f"one {jax.devices()[0].platform} device"
    platform = plan.mesh.devices.flat[0].platform
    return (f"clients split over {plan.mesh.size} {platform} devices, {jax.process_count()} "
            f"process(es); this is process {jax.process_index()}")


def spans_processes(plan: Plan) -> bool:
    """True when the plan's mesh has devices of other processes: cohorts must then be
    assembled from every process's share (`sample_cohort`)."""
    return plan.mesh is not None and not all(
        d.process_index == jax.process_index() for d in plan.mesh.devices.flat)


def cohort_size(num_clients: int, plan: Plan) -> int:
    """`num_clients` rounded up to a multiple of the plan's device count."""
    d = parallel.num_shards(plan)
    return -(-max(num_clients, 1) // d) * d


def sample_cohort(dataset, indices, round_num: int, plan: Plan,
                  pad_to: int | None = None) -> Cohort:
    """The cohort of `indices` as global arrays split over the mesh, each process packing
    only the slots of its own devices.

    Every process must call it with the same `indices` (the same seed samples the same
    clients). The cohort is padded with empty clients (weight 0, `client_index` -1) to
    a multiple of the device count, as Poisson cohorts are padded to their bucket.
    `client_index` stays a host array of the whole cohort (every process knows it), so
    per-client state rows are assigned alike everywhere.

    Args:
      dataset: a `FederatedDataset`.
      indices: the sampled clients' positions, in slot order.
      round_num: the round (seeds the shuffles, as `FederatedDataset.cohort`).
      plan: a plan with a mesh.
      pad_to: pad to at least this many clients first (e.g. a Poisson bucket).

    Returns:
      A `Cohort` whose `batches`, `mask` and `num_examples` are global `jax.Array`s.

    Example:
      >>> idx = train.sample_indices(clients=10, round=r)      # the same on every process
      >>> cohort = sample_cohort(train, idx, r, plan)           # 12 slots on 4 devices
    """
    indices = np.asarray(indices, np.int64)
    total = cohort_size(max(len(indices), pad_to or 0), plan)
    slots = parallel.local_slots(total, plan)
    local = dataset.cohort(indices, round_num, pad_to=total, slots=slots)
    arrays = parallel.global_clients((local.batches, local.mask, local.num_examples), plan,
                                     total)
    client_index = np.full(total, -1, np.int32)
    client_index[:len(indices)] = indices
    return local._replace(batches=arrays[0], mask=arrays[1], num_examples=arrays[2],
                          client_index=client_index)
