"""Peak host memory and seconds per round of FedAvg for cohorts of 1,000 and 10,000 clients,
with dense cohorts (`pack_cohort`) and with device-resident data (`index_cohort`).

The population: EMNIST-like client sizes (gamma, mean 226.8, std 88.9, at least 10 examples,
as in FedJAX's EMNIST-62 train split), 20,000 clients by default, each example 60 float32
features and a label in 0..9 (class templates plus noise, so the task is learnable). The
model: an MLP 60 -> 32 -> 10 (`fedjax_core.models.linear.mlp`), client SGD at batch 20, one
epoch, FedAvg, `Plan(chunk_size)`.

Each (mode, cohort size) runs in its own subprocess so that each peak is its own:
`ru_maxrss` (the whole process, data loading included) and the peak resident memory of the
rounds alone (Linux `VmHWM`, reset through `/proc/self/clear_refs` after the data is
loaded), minus the resident memory at that point: what the rounds add.

    python -m benchmarks.cohort_memory            # writes benchmarks/results/cohort_memory.json
    python -m benchmarks.cohort_memory --clients 2000 --cohorts 100 1000 --rounds 5   # quick

Never part of the tests. On a CPU backend the device's arrays live in host memory too, so
device-resident runs hold the population twice (the `FederatedData` and the device copy).
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SIZE_MEAN, SIZE_STD, SIZE_MIN = 226.8, 88.9, 10


def client_sizes(num_clients: int, seed: int = 0) -> np.ndarray:
    """Gamma-distributed client sizes with EMNIST-62's mean and std, at least `SIZE_MIN`."""
    rng = np.random.default_rng(seed)
    k, theta = (SIZE_MEAN / SIZE_STD) ** 2, SIZE_STD ** 2 / SIZE_MEAN
    return np.maximum(np.rint(rng.gamma(k, theta, size=num_clients)).astype(np.int64), SIZE_MIN)


def population(num_clients: int, features: int, classes: int = 10, seed: int = 0):
    """An `InMemoryFederatedData` whose clients are views into one `[N, features]` array."""
    from fedjax_core.data import InMemoryFederatedData

    sizes = client_sizes(num_clients, seed)
    total = int(sizes.sum())
    rng = np.random.default_rng(seed + 1)
    templates = rng.normal(size=(classes, features)).astype(np.float32)
    y = rng.integers(0, classes, size=total, dtype=np.int32)
    x = np.empty((total, features), np.float32)
    for s in range(0, total, 1 << 20):
        e = min(total, s + (1 << 20))
        x[s:e] = templates[y[s:e]] + rng.normal(size=(e - s, features)).astype(np.float32)
    ends = np.cumsum(sizes)
    return InMemoryFederatedData({
        f"c{i:05d}": {"x": x[e - n:e], "y": y[e - n:e]}
        for i, (n, e) in enumerate(zip(sizes.tolist(), ends.tolist()))})


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Resets this process's peak resident memory (`VmHWM`); False where the kernel can't."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(mode: str, cohort_size: int, args) -> dict:
    import jax
    import optax

    from fedjax_api.dataset import FederatedDataset
    from fedjax_core import parallel
    from fedjax_core.algorithms.base import jit_round
    from fedjax_core.algorithms.fedavg import fedavg
    from fedjax_core.data.device import IndexedBatches
    from fedjax_core.models.linear import mlp

    rss_start = _status_mib("VmRSS")
    data = population(args.clients, args.features)
    rss_data = _status_mib("VmRSS")
    ds = FederatedDataset(data=data, batch_size=args.batch_size, seed=0,
                          device_resident=mode == "device")
    t = time.perf_counter()
    if mode == "device":
        jax.block_until_ready(ds.device_examples.features)
    put_s = time.perf_counter() - t
    rss_loaded = _status_mib("VmRSS")
    reset = _reset_peak()

    model = mlp((args.features,), (args.hidden,), num_classes=10)
    alg = fedavg(optax.sgd(args.client_lr), optax.sgd(1.0))
    step = jit_round(alg, model, parallel.Plan(chunk_size=args.chunk_size))
    key = jax.random.key(0)
    state = alg.init(jax.jit(model.init)(jax.random.fold_in(key, 2**31 - 1)))
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    sample_s, step_s, total_s, losses, shapes, cohort_bytes = [], [], [], [], set(), 0
    for r in range(args.warmup + args.rounds):
        t0 = time.perf_counter()
        cohort = ds.sample(clients=cohort_size, round=r)
        t1 = time.perf_counter()
        state, metrics = step(state, cohort, jax.random.fold_in(key, r))
        jax.block_until_ready((state, metrics))
        t2 = time.perf_counter()
        shapes.add(cohort.mask.shape)
        b = cohort.batches
        host = [b.index] if isinstance(b, IndexedBatches) else list(b.values())
        cohort_bytes = max(cohort_bytes, sum(np.asarray(a).nbytes for a in host)
                           + cohort.mask.nbytes)
        if r >= args.warmup:
            sample_s.append(t1 - t0)
            step_s.append(t2 - t1)
            total_s.append(t2 - t0)
        losses.append(float(metrics["train/loss"]))
        del cohort, b, host
    peak_rounds = _status_mib("VmHWM") if reset else float("nan")
    return {
        "mode": mode, "cohort": cohort_size,
        "num_params": int(num_params),
        "median_s_per_round": statistics.median(total_s),
        "median_sample_s": statistics.median(sample_s),
        "median_step_s": statistics.median(step_s),
        "timed_rounds": len(total_s),
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_start_mib": rss_start, "rss_after_data_mib": rss_data,
        "rss_after_load_mib": rss_loaded,
        "device_put_s": put_s,
        "peak_rounds_mib": peak_rounds,
        "rounds_increase_mib": peak_rounds - rss_loaded,
        "cohort_host_mib": cohort_bytes / 2**20,
        "stacked_deltas_mib": cohort_size * num_params * 4 / 2**20,
        "cohort_shapes": sorted(shapes),
        "first_loss": losses[0], "last_loss": losses[-1],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    p.add_argument("--clients", type=int, default=20_000, help="population size")
    p.add_argument("--cohorts", type=int, nargs="+", default=[1_000, 10_000])
    p.add_argument("--modes", nargs="+", default=["dense", "device"])
    p.add_argument("--features", type=int, default=60)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--client-lr", type=float, default=0.05)
    p.add_argument("--chunk-size", type=int, default=50)
    p.add_argument("--rounds", type=int, default=20, help="timed rounds after the warm-up")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "cohort_memory.json")
    p.add_argument("--worker", nargs=2, metavar=("MODE", "COHORT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args)))
        return
    import jax

    runs = []
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for cohort in args.cohorts:
        for mode in args.modes:
            cmd = [sys.executable, "-m", "benchmarks.cohort_memory", *passthrough,
                   "--worker", mode, str(cohort)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            run = json.loads(out.strip().splitlines()[-1])
            runs.append(run)
            print(f"{mode:6s} cohort {cohort:6d}: {run['median_s_per_round']:.3f} s/round "
                  f"(sample {run['median_sample_s']:.3f}, step {run['median_step_s']:.3f}), "
                  f"ru_maxrss {run['ru_maxrss_mib']:.0f} MiB, rounds add "
                  f"{run['rounds_increase_mib']:.0f} MiB over {run['rss_after_load_mib']:.0f} "
                  f"MiB loaded", flush=True)
    by = {(r["mode"], r["cohort"]): r for r in runs}
    ratios = {}
    if len(args.cohorts) >= 2:
        small, large = min(args.cohorts), max(args.cohorts)
        for mode in args.modes:
            a, b = by[(mode, small)], by[(mode, large)]
            ratios[mode] = {
                "ru_maxrss_ratio": b["ru_maxrss_mib"] / a["ru_maxrss_mib"],
                "peak_rounds_ratio": b["peak_rounds_mib"] / a["peak_rounds_mib"],
                "s_per_round_ratio": b["median_s_per_round"] / a["median_s_per_round"],
            }
    sizes = client_sizes(args.clients)
    result = {
        "benchmark": "cohort_memory",
        "setup": {"population_clients": args.clients, "population_examples": int(sizes.sum()),
                  "client_size_mean": float(sizes.mean()), "client_size_max": int(sizes.max()),
                  "features": args.features, "hidden": args.hidden,
                  "batch_size": args.batch_size, "epochs": 1, "chunk_size": args.chunk_size,
                  "timed_rounds": args.rounds, "warmup_rounds": args.warmup,
                  "population_mib": int(sizes.sum()) * (args.features + 1) * 4 / 2**20},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "jax": jax.__version__, "backend": jax.default_backend(),
                    "cpus": __import__("os").cpu_count()},
        "runs": runs,
        "ratios_largest_over_smallest": ratios,
        "note": "each (mode, cohort) in its own process; timings on a shared machine are "
                "noisy; peak_rounds_mib is VmHWM after a reset once the data was loaded.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
