"""What every benchmark scenario measures: the machine, its matmul peak, FLOPs, memory.

FLOP counts are analytic and count matrix products only (2 FLOPs per multiply-add),
from the layer shapes, per example:

    forward      F = sum over layers of 2 * (multiply-adds of the layer)
    training     3 F - F_first_layer
                 (forward, weight gradient, input gradient of every layer but the
                 first, whose input is data: XLA does not compute that one)

Elementwise work (activations, softmax, the LSTM gates, the optimizer) is not counted,
so the fraction of the matmul peak is a lower bound of how busy the machine is. XLA's
own `cost_analysis()` of one compiled client step is recorded beside it as a check; it
counts the body of a loop (the LSTM's `lax.scan` over time) once, not once per
iteration, so it undercounts recurrent models.
"""

import os
import platform
import resource
import statistics
import time
from typing import Sequence

import numpy as np

# ---- machine ------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (`platform.processor()` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's vector-instruction flags (AVX, AVX-512, AMX, FMA, F16C) from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(flag for flag in line.split(":", 1)[1].split()
                                  if flag.startswith(("avx", "amx", "fma", "f16c")))
    except OSError:
        pass
    return []


def machine_info() -> dict:
    """CPU model and vector flags, cores, memory, Python/JAX versions, the default backend
    and devices, and whether the native CPU kernels are in use."""
    import jax
    import jaxlib.version

    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = None
    from fedjax_core.models import native

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
        "cpus_usable": affinity, "native_kernels": native.reason(),
        "memory_gib": None if mem is None else round(mem, 1),
        "machine": platform.machine(), "python": platform.python_version(),
        "jax": jax.__version__, "jaxlib": jaxlib.version.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def matmul_gflops(n: int = 2048, reps: int = 10) -> dict:
    """f32 matmul throughput of this machine now: median of `reps` timed `jit(jnp.dot)`
    of two `n x n` matrices, `2 n^3 / seconds`, at the precision the models train with
    (`jax_default_matmul_precision`: on an NVIDIA GPU the default is TF32, so this is the
    TF32 peak that a round's FLOP fraction is measured against; on a CPU, f32).

    Returns:
      `{"gflops": median, "best_gflops": fastest rep, "n": n, "reps": reps, "precision":
      the default matmul precision (None: the backend's default), "backend": ...}`.
    """
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        n = max(n, 8192)  # large enough to reach an accelerator's peak

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    flops = 2 * n ** 3
    return {"gflops": flops / statistics.median(times) / 1e9,
            "best_gflops": flops / min(times) / 1e9, "n": n, "reps": reps,
            "precision": jax.config.values.get("jax_default_matmul_precision"),
            "backend": jax.default_backend()}


def device_peak_mb() -> float | None:
    """Peak memory in use on the first device so far, MiB (`memory_stats()
    ["peak_bytes_in_use"]`); None on a CPU, where the host's peak RSS is the measure."""
    import jax

    if jax.default_backend() == "cpu":
        return None
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (`ru_maxrss`, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> float | None:
    """Resets Linux's peak resident memory mark of this process (`VmHWM`, through
    `/proc/self/clear_refs`); returns the resident memory now, MiB (None if unsupported).
    `ru_maxrss` is not reset: it keeps the peak of the whole process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_mb("VmRSS")


def peak_rss_since_reset_mb() -> float | None:
    """`VmHWM`: the peak resident memory since `reset_peak_rss()` (or the start), MiB."""
    return _status_mb("VmHWM")


# ---- contention (the machine may be shared) --------------------------------------------------

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_snapshot() -> tuple[float, float]:
    """`(CPU seconds busy on the whole machine, CPU seconds of this process)` now."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        busy = (sum(vals[:8]) - idle) / _HZ
    except OSError:
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system


def foreign_cpu(before: tuple[float, float], after: tuple[float, float]) -> tuple[float, float]:
    """`(CPU seconds used by other processes, by this one)` between two snapshots."""
    own = after[1] - before[1]
    return max(0.0, after[0] - before[0] - own), own


# ---- FLOPs --------------------------------------------------------------------------------------

def dense_flops(sizes: Sequence[int]) -> list[int]:
    """Forward FLOPs per example of each layer of an MLP of widths `sizes`."""
    return [2 * a * b for a, b in zip(sizes[:-1], sizes[1:])]


def training_flops(layer_forward: Sequence[int]) -> int:
    """`3 * sum(F) - F[0]`: forward, weight gradient and input gradient except the first
    layer's."""
    return 3 * sum(layer_forward) - layer_forward[0]


def emnist_cnn_flops(num_classes: int = 62) -> dict:
    """FLOPs per example of FedJAX's EMNIST CNN (28x28x1 input, VALID 3x3 convolutions).

    Returns:
      `{"forward", "train", "conv_forward", "conv_train"}`; training 71.6 MFLOP per
      example, 64.5 of them in the two convolutions.
    """
    conv0 = 2 * 26 * 26 * 32 * (3 * 3 * 1)
    conv1 = 2 * 24 * 24 * 64 * (3 * 3 * 32)
    dense0 = 2 * 12 * 12 * 64 * 128
    dense1 = 2 * 128 * num_classes
    layers = [conv0, conv1, dense0, dense1]
    return {"forward": sum(layers), "train": training_flops(layers),
            "conv_forward": conv0 + conv1, "conv_train": 2 * conv0 + 3 * conv1}


def mlp_flops(widths: Sequence[int]) -> dict:
    """FLOPs per example of an MLP (logistic regression: two widths)."""
    layers = dense_flops(widths)
    return {"forward": sum(layers), "train": training_flops(layers)}


def lstm_lm_flops(seq_len: int, vocab: int, embed: int, hidden: Sequence[int],
                  proj: int | None = None) -> dict:
    """FLOPs per sequence of a stacked-LSTM language model (every position computed).

    Per position: each LSTM layer `2 * 4h * (in + h)`; with `proj`, a projection
    `2 * h * proj` after each layer (Stack Overflow); the output layer `2 * in * vocab`.
    The first layer is the embedding lookup (no FLOPs), so every matmul gets all three
    passes: training = 3 x forward.
    """
    per_pos = 0
    width = embed
    for h in hidden:
        per_pos += 2 * 4 * h * (width + h)
        width = h
        if proj is not None:
            per_pos += 2 * h * proj
            width = proj
    per_pos += 2 * width * vocab
    return {"forward": per_pos * seq_len, "train": 3 * per_pos * seq_len}


def xla_flops(compiled) -> float | None:
    """`flops` of a compiled executable's `cost_analysis()` (None if unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    value = cost.get("flops")
    return None if value is None else float(value)


# ---- timing summaries ---------------------------------------------------------------------------

def summarize_times(times: Sequence[float]) -> dict:
    """Median, mean, min, max and the inter-quartile range of some round times."""
    t = np.asarray(times, np.float64)
    if t.size == 0:
        return {"median_s": None, "mean_s": None, "min_s": None, "max_s": None, "iqr_s": None}
    q1, q3 = np.percentile(t, [25, 75])
    return {"median_s": float(np.median(t)), "mean_s": float(t.mean()), "min_s": float(t.min()),
            "max_s": float(t.max()), "iqr_s": float(q3 - q1)}


def size_summary(sizes) -> dict:
    """n, total, mean, std, min, median, p95, max of client sizes."""
    s = np.asarray(sizes)
    return {"clients": int(s.size), "examples": int(s.sum()), "mean": float(s.mean()),
            "std": float(s.std()), "min": int(s.min()), "p50": float(np.median(s)),
            "p95": float(np.percentile(s, 95)), "max": int(s.max())}
