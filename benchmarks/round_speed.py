"""Seconds per FedAvg round on a task, by chunk size, against a FedJAX-style baseline.

The baseline does what FedJAX 0.0.17 does: a Python loop over the cohort's clients and
their batches, one jitted SGD step per batch, then the weighted mean and the server step
on the host. Every variant trains on the same sampled cohorts (rounds 0..N-1 of seed 0).

    python -m benchmarks.round_speed --task shakespeare-plays --rounds 10

Writes `benchmarks/results/round_speed-<task>.json` with medians; never part of the tests.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from fedjax_api import tasks
from fedjax_core import parallel
from fedjax_core.algorithms import fedavg
from fedjax_core.algorithms.base import jit_round
from fedjax_core.data.pack import num_steps, padded_fraction
from fedjax_core.models.base import masked_mean_loss

RESULTS = Path(__file__).parent / "results"


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    """Median f32 matmul throughput of this machine, measured now."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def time_ours(task, cohorts, chunk_size, client_lr, server_lr):
    alg = fedavg(optax.sgd(client_lr), optax.sgd(server_lr))
    step = jit_round(alg, task.model, parallel.Plan(chunk_size))
    state = alg.init(jax.jit(task.model.init)(jax.random.key(0)))
    key = jax.random.key(0)
    times = []
    for r, cohort in enumerate(cohorts):
        t = time.perf_counter()
        state, metrics = step(state, cohort, jax.random.fold_in(key, r))
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    return times, float(metrics["train/loss"])


def time_baseline(task, cohorts, client_lr, server_lr):
    """FedJAX's way: one jitted step per batch, driven from Python."""
    model = task.model
    opt = optax.sgd(client_lr)

    @jax.jit
    def sgd_step(params, opt_state, batch, mask, key):
        loss, grads = jax.value_and_grad(
            lambda p: masked_mean_loss(model, p, batch, mask, key))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = jax.jit(model.init)(jax.random.key(0))
    key = jax.random.key(0)
    times = []
    for r, cohort in enumerate(cohorts):
        t = time.perf_counter()
        deltas, weights = [], []
        for c in range(cohort.num_clients):
            w, s = params, opt.init(params)
            ck = jax.random.fold_in(jax.random.fold_in(key, r), c)
            for k in range(cohort.num_steps):
                if not cohort.mask[c, k].any():
                    break
                batch = {n: v[c, k] for n, v in cohort.batches.items()}
                w, s, _ = sgd_step(w, s, batch, cohort.mask[c, k], jax.random.fold_in(ck, k))
            deltas.append(jax.tree.map(jnp.subtract, params, w))
            weights.append(float(cohort.num_examples[c]))
        total = sum(weights)
        mean = jax.tree.map(lambda *d: sum(wt * x for wt, x in zip(weights, d)) / total, *deltas)
        params = jax.tree.map(lambda p, d: p - server_lr * d, params, mean)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t)
    return times


def summary(times, warmup):
    timed = times[warmup:]
    return {"compile_and_first_round_s": times[0], "median_round_s": statistics.median(timed),
            "rounds_timed": len(timed), "all_round_s": times}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="shakespeare-plays")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk-sizes", default="1,2,5,10")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()

    task = tasks.get(args.task)
    d = task.defaults
    n = args.warmup + args.rounds
    cohorts = [task.train.sample(d.clients_per_round, r) for r in range(n)]
    real_steps = [sum(num_steps(int(x), d.batch_size, d.epochs) for x in c.num_examples)
                  for c in cohorts]
    result = {
        "task": args.task, "clients_per_round": d.clients_per_round, "batch_size": d.batch_size,
        "epochs": d.epochs, "machine": platform.machine(), "processor": platform.processor(),
        "cpu_count": __import__("os").cpu_count(), "jax": jax.__version__,
        "backend": jax.default_backend(), "matmul_gflops": matmul_gflops(),
        "median_real_steps_per_round": statistics.median(real_steps[args.warmup:]),
        "steps_per_cohort_array": cohorts[0].num_steps,
        "variants": {},
    }
    print(f"{args.task}: {d.clients_per_round} clients/round, median "
          f"{result['median_real_steps_per_round']} steps/round, "
          f"matmul {result['matmul_gflops']:.0f} GFLOP/s")
    for cs in [int(x) for x in args.chunk_sizes.split(",")]:
        times, loss = time_ours(task, cohorts, cs, d.client_lr, d.server_lr["fedavg"])
        padded = statistics.median(padded_fraction(c, d.batch_size, d.epochs, cs)
                                   for c in cohorts[args.warmup:])
        result["variants"][f"chunk_size={cs}"] = {**summary(times, args.warmup), "last_loss": loss,
                                                  "median_padded_step_fraction": padded}
        print(f"  chunk_size={cs:<3} median {statistics.median(times[args.warmup:]):.3f} s/round "
              f"(first round {times[0]:.1f} s, {padded:.0%} of computed steps padded)")
    if not args.no_baseline:
        times = time_baseline(task, cohorts, d.client_lr, d.server_lr["fedavg"])
        result["variants"]["fedjax_style_baseline"] = summary(times, args.warmup)
        base = statistics.median(times[args.warmup:])
        print(f"  baseline     median {base:.3f} s/round")
        for name, v in result["variants"].items():
            v["speedup_vs_baseline"] = base / v["median_round_s"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"round_speed-{args.task}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
