"""Wall time of a K-member sweep (`fedjax_api.sweep.Sweep`) against one run of the same task.

One run is `Experiment.run` with the task's defaults (its cohorts packed on the host each
round, as `fedjax run` does), and again with the training examples device-resident (the
data path a sweep takes); each sweep trains K members of the same config in one program
per round. Sweeps of three shapes are timed, K = 8 each:
8 client learning rates with one seed (one cohort per round, shared by all members),
4 client learning rates x 2 seeds (two cohorts), and 8 seeds (eight cohorts: the members
share nothing). Everything runs in one process, back to back; the first rounds (compilation)
are left out of the medians.

    python -m benchmarks.sweep_speed --task synthetic --rounds 50

Writes `benchmarks/results/sweep_speed.json`; never part of the tests.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import attrs
import jax

from benchmarks.measure import matmul_gflops
from fedjax_api import config
from fedjax_api.experiment import Experiment
from fedjax_api.sweep import Sweep

RESULTS = Path(__file__).parent / "results"


def _summary(train_records, eval_seconds, total, warmup):
    times = [r["round_time_s"] for r in train_records]
    timed = times[warmup:]
    return {"first_round_s": times[0], "median_round_s": statistics.median(timed),
            "rounds_timed": len(timed), "steady_total_s": sum(timed),
            "eval_s": eval_seconds, "total_s": total}


def time_single(cfg, warmup, device_resident=False):
    start = time.perf_counter()
    exp = Experiment.from_config(cfg)
    if device_resident:  # the data path a sweep takes: examples on the device, index cohorts
        task = exp.task
        exp = attrs.evolve(exp, task=attrs.evolve(
            task, train=attrs.evolve(task.train, device_resident=True)))
    result = exp.run()
    total = time.perf_counter() - start
    train = [r for r in result.history if r["kind"] == "train"]
    evals = sum(r.get("eval_time_s", 0.0) for r in result.history if r["kind"] == "eval")
    out = _summary(train, evals, total, warmup)
    out["final_test"] = result.final["test"]
    return out


def time_sweep(cfg, warmup, seeds_together=1, examples_on_device=None, **grid):
    sweep = Sweep.grid(cfg, seeds_together=seeds_together,
                       examples_on_device=examples_on_device, **grid)
    start = time.perf_counter()
    result = sweep.run()
    total = time.perf_counter() - start
    train = [r for r in result.members[0].history if r["kind"] == "train"]
    evals = sum(r.get("eval_time_s", 0.0) for m in result.members for r in m.history
                if r["kind"] == "eval")
    out = _summary(train, evals, total, warmup)
    out["members"] = len(sweep.members)
    out["seeds"] = len({m.seed for m in sweep.members})
    out["seeds_together"] = seeds_together
    out["examples_on_device"] = examples_on_device
    out["final_test_accuracy"] = {m.member.label: m.final["test"].get("accuracy")
                                  for m in result.members}
    return out


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--task", default="synthetic")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=2, help="first rounds left out")
    parser.add_argument("--repeats", type=int, default=1,
                        help="times the one run and the sweeps are timed, alternating")
    parser.add_argument("--with-packed-batches", action="store_true",
                        help="also time sweeps that pack padded batches on the host each "
                             "round, as one run does (examples_on_device=False)")
    parser.add_argument("--with-vmapped-seeds", action="store_true",
                        help="also time the 8-seed sweep with all seeds under vmap")
    args = parser.parse_args()

    cfg = config.resolve(args.task, rounds=args.rounds, eval_every=0)
    lr = cfg.client_lr
    lrs8 = [lr * f for f in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)]
    shapes = {
        "1 member (K=1 sweep)": dict(),
        "8 client lrs x 1 seed": dict(client_lr=lrs8),
        "4 client lrs x 2 seeds": dict(client_lr=lrs8[2:6], seeds=[0, 1]),
        "1 client lr x 8 seeds": dict(seeds=list(range(8))),
    }
    if args.with_packed_batches:
        shapes["8 client lrs x 1 seed, batches packed on the host"] = dict(
            client_lr=lrs8, examples_on_device=False)
        shapes["1 client lr x 8 seeds, batches packed on the host"] = dict(
            seeds=list(range(8)), examples_on_device=False)
    if args.with_vmapped_seeds:
        shapes["1 client lr x 8 seeds, seeds_together=8"] = dict(seeds=list(range(8)),
                                                                  seeds_together=8)
    result = {
        "task": args.task, "rounds": args.rounds, "warmup_rounds": args.warmup,
        "clients_per_round": cfg.clients_per_round, "batch_size": cfg.batch_size,
        "epochs": cfg.epochs, "algorithm": cfg.algorithm,
        "machine": platform.machine(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "matmul_gflops": matmul_gflops()["gflops"],
        "note": "one process, variants back to back; round_time_s includes sampling and "
                "packing the next cohort (overlapping the device), as Experiment.run does",
        "single": [], "single_device_resident": [],
        "sweeps": {name: [] for name in shapes},
    }
    for _ in range(args.repeats):
        single = time_single(cfg, args.warmup)
        result["single"].append(single)
        resident = time_single(cfg, args.warmup, device_resident=True)
        result["single_device_resident"].append(resident)
        print(f"one run: median {single['median_round_s'] * 1e3:.1f} ms/round, "
              f"total {single['total_s']:.2f} s; with device-resident data "
              f"{resident['median_round_s'] * 1e3:.1f} ms/round, total "
              f"{resident['total_s']:.2f} s", flush=True)
        for name, grid in shapes.items():
            s = time_sweep(cfg, args.warmup, **grid)
            s["ratio_median_round"] = s["median_round_s"] / single["median_round_s"]
            s["ratio_steady_total"] = s["steady_total_s"] / single["steady_total_s"]
            s["ratio_total"] = s["total_s"] / single["total_s"]
            s["ratio_median_round_vs_device_resident_run"] = (
                s["median_round_s"] / resident["median_round_s"])
            result["sweeps"][name].append(s)
            print(f"K={s['members']} ({name}): median {s['median_round_s'] * 1e3:.1f} ms/round "
                  f"= {s['ratio_median_round']:.2f}x one run's; steady total "
                  f"{s['ratio_steady_total']:.2f}x; total with compile and eval "
                  f"{s['total_s']:.2f} s = {s['ratio_total']:.2f}x; "
                  f"{s['ratio_median_round_vs_device_resident_run']:.2f}x the device-resident "
                  "run's rounds", flush=True)
    result["ratios"] = {name: statistics.median(s["ratio_median_round"] for s in runs)
                        for name, runs in result["sweeps"].items()}
    result["ratios_vs_device_resident_run"] = {
        name: statistics.median(s["ratio_median_round_vs_device_resident_run"] for s in runs)
        for name, runs in result["sweeps"].items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "sweep_speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
