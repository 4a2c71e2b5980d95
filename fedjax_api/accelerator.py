"""What a run on an accelerator needs decided before it starts: the backend, the default
chunk size, and deterministic GPU kernels.

- `choose_chunk_size(backend, memory_bytes, per_client_bytes, ...)` (a pure function): 1 on
  the CPU; on a GPU or TPU the largest power of two of clients (at most the cohort) whose
  footprint fits `MEMORY_FRACTION` of the device's memory beside the model's own state.
- `client_footprint(model, batch, steps)`: one client's bytes, from the parameter count
  and one compiled training step's `memory_analysis`.
- `set_deterministic(mode)`: `--xla_gpu_deterministic_ops=true` in `XLA_FLAGS`, which only
  works before JAX starts its backends (as `distributed.request_cpu_devices`).

Example:
  >>> choose_chunk_size("gpu", memory_bytes=80e9, per_client_bytes=200e6, clients=64)
  64
"""

import importlib.util
import os
from typing import Any

import jax
import numpy as np

MEMORY_FRACTION = 0.5
"""Share of one device's memory the clients of a chunk may take (the rest holds the
state, per-client stores, the cohort's batches and XLA's own work space)."""

MAX_CHUNK = 256
"""Largest default chunk: past it a round gains nothing from vmap on a single device."""

DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"
"""The XLA flag that makes GPU scatter-adds and reductions deterministic."""

DETERMINISTIC_MODES = ("auto", "on", "off")
"""`--deterministic`: auto (on when the backend will be a GPU), on, off."""


def jax_started() -> bool:
    """Whether JAX has started its backends (after which flags and platforms are fixed)."""
    from jax._src import xla_bridge  # public JAX cannot ask without starting them

    return bool(xla_bridge.backends_are_initialized())


def expected_backend() -> str:
    """The backend JAX will use, guessed without starting it: "gpu" when a CUDA or ROCm
    plugin is installed and `JAX_PLATFORMS` allows it, "tpu" likewise, else "cpu". Once
    JAX has started, `jax.default_backend()`."""
    if jax_started():
        return jax.default_backend()
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    allowed = [p.strip() for p in platforms.split(",") if p.strip()]

    def ok(*names: str) -> bool:
        return not allowed or any(p in allowed for p in names)

    def installed(*modules: str) -> bool:
        for m in modules:
            try:
                if importlib.util.find_spec(m) is not None:
                    return True
            except (ImportError, ValueError):
                continue
        return False

    if ok("cuda", "gpu", "rocm") and installed("jax_cuda12_plugin", "jax_cuda13_plugin",
                                               "jax_plugins.xla_cuda12",
                                               "jax_plugins.xla_cuda13", "jax_rocm60_plugin"):
        return "gpu"
    if ok("tpu") and installed("libtpu"):
        return "tpu"
    return "cpu"


def set_deterministic(mode: str = "auto") -> bool:
    """Puts `DETERMINISTIC_FLAG` in `XLA_FLAGS` for mode "on", or "auto" when the backend
    will be a GPU; "off" removes it. Has an effect only before JAX starts.

    Returns:
      Whether deterministic GPU kernels are asked for (the flag is in `XLA_FLAGS`).

    Example:
      >>> set_deterministic("on")   # in a fresh process, before any JAX computation
      True
    """
    if mode not in DETERMINISTIC_MODES:
        raise ValueError(f"deterministic must be one of {', '.join(DETERMINISTIC_MODES)}, "
                         f"got {mode!r}")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_gpu_deterministic_ops")]
    want = mode == "on" or (mode == "auto" and expected_backend() == "gpu")
    if want:
        flags.append(DETERMINISTIC_FLAG)
    if not jax_started():
        if flags:
            os.environ["XLA_FLAGS"] = " ".join(flags)
        else:
            os.environ.pop("XLA_FLAGS", None)
    return DETERMINISTIC_FLAG in os.environ.get("XLA_FLAGS", "").split()


def prepare(cfg: Any) -> None:
    """Before JAX starts: the run's CPU devices (`--devices`) and deterministic GPU
    kernels (`--deterministic`)."""
    from fedjax_api import distributed

    distributed.request_cpu_devices(cfg.devices)
    set_deterministic(cfg.deterministic)


def choose_chunk_size(backend: str, memory_bytes: float | None, per_client_bytes: float,
                      clients: int, fixed_bytes: float = 0.0,
                      fraction: float = MEMORY_FRACTION, max_chunk: int = MAX_CHUNK) -> int:
    """The default chunk size: 1 on the CPU; elsewhere the largest power of two `c <=
    min(clients, max_chunk)` with `fixed_bytes + c * per_client_bytes <= fraction *
    memory_bytes` (at least 1).

    Args:
      backend: "cpu", "gpu" or "tpu" (`jax.default_backend()`).
      memory_bytes: one device's memory (`memory_stats()["bytes_limit"]`); None when
        unknown (then 8 clients, a guess that fits every current accelerator).
      per_client_bytes: one client's training footprint (`client_footprint`).
      clients: clients per device in a round (the cohort, divided over the mesh).
      fixed_bytes: what the round holds whatever the chunk (state, stores, batches).
      fraction: share of the memory the round may take.
      max_chunk: the largest chunk.

    Returns:
      The chunk size, >= 1.

    Example:
      >>> choose_chunk_size("cpu", 16e9, 1e6, 100)
      1
      >>> choose_chunk_size("gpu", 80e9, 1e9, 100)   # 40 GB / 1 GB: 32 (a power of two)
      32
    """
    if backend == "cpu":
        return 1
    top = max(1, min(clients, max_chunk))
    if memory_bytes is None:
        return min(8, top)
    budget = fraction * memory_bytes - fixed_bytes
    fits = int(budget // max(per_client_bytes, 1.0)) if budget > 0 else 1
    chunk = 1
    while chunk * 2 <= min(fits, top):
        chunk *= 2
    return chunk


def client_footprint(model: Any, batch: Any, steps: int = 1) -> int:
    """One client's training bytes: its copies of the parameters (params, gradient,
    optimizer slot, delta: 4x) plus the work space of one compiled training step
    (activations; `memory_analysis().temp_size_in_bytes`) plus its batches (`steps` of
    `batch`).

    Args:
      model: a `fedjax_core.models.Model`.
      batch: one batch (arrays or `jax.ShapeDtypeStruct`s with a leading batch axis).
      steps: the client's local steps (its batches are held for the round).

    Returns:
      Bytes.
    """
    from fedjax_core.models.base import masked_mean_loss

    params = jax.eval_shape(model.init, jax.random.key(0))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), batch)
    n = jax.tree.leaves(spec)[0].shape[0]
    mask = jax.ShapeDtypeStruct((n,), np.bool_)
    grad = jax.grad(lambda p, b, m, k: masked_mean_loss(model, p, b, m, k))
    compiled = jax.jit(grad).lower(params, spec, mask, jax.random.key(0)).compile()
    analysis = compiled.memory_analysis()
    temp = int(getattr(analysis, "temp_size_in_bytes", 0) or 0) if analysis else 0
    batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(spec))
    return 4 * param_bytes + temp + steps * batch_bytes


def device_memory() -> int | None:
    """Bytes of memory of the first device (`memory_stats()["bytes_limit"]`), None on the
    CPU or when the backend does not say."""
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def default_chunk_size(task: Any, clients_per_round: int, devices: int = 1) -> int:
    """`choose_chunk_size` for `task` on this backend: 1 on the CPU without compiling
    anything; elsewhere one client's footprint from a sampled client's batches."""
    backend = jax.default_backend()
    if backend == "cpu":
        return 1
    cohort = task.train.sample(1, 0)
    batch = jax.tree.map(lambda x: x[0, 0], cohort.batches)
    steps = int(np.shape(cohort.mask)[1])
    per_device = -(-clients_per_round // (devices or jax.local_device_count()))
    return choose_chunk_size(backend, device_memory(), client_footprint(task.model, batch, steps),
                             per_device)


def describe(chunk_size: int, given: bool) -> str:
    """The run header's line: backend, devices, chunk size and where it came from, and
    whether GPU kernels are deterministic."""
    det = DETERMINISTIC_FLAG in os.environ.get("XLA_FLAGS", "").split()
    backend = jax.default_backend()
    gpu = f", deterministic GPU ops {'on' if det else 'off'}" if backend == "gpu" else ""
    source = "--chunk-size" if given else f"chosen for {backend}"
    return (f"backend {backend} ({jax.device_count()} device"
            f"{'s' if jax.device_count() != 1 else ''}), chunk size {chunk_size} ({source}){gpu}")
