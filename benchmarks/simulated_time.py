"""Cost of the simulated clock (docs/simulated_time.md): host seconds per round.

1. Populations of 1,000,000 clients (the MLP cohort scenarios' scale): heterogeneous
   profiles, diurnal availability and the selection rule (all, overcommit, deadline with
   partial work) per round, and the FedBuff timeline per server step; target < 20 ms.
2. The CNN (EMNIST, 3,400 clients) and LSTM (Shakespeare, 715 clients) tasks: the clock's
   time per round as a fraction of the round's compute, the median round time measured by
   `benchmarks/run.py` on this machine (benchmarks/results/emnist-cnn.json and
   shakespeare-lstm.json, clients 10, chunk 1); target < 5%.

Medians over rounds after the first (which builds the population's spells). Writes
benchmarks/results/simulated_time.json.

  python -m benchmarks.simulated_time [--rounds 50]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from fedjax_core import simtime

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = {"emnist-cnn": (3400, 1_206_590, 20, 226), "shakespeare-lstm": (715, 819_920, 4, 3000)}
"""name: (clients, parameters, batch size, mean examples per client)."""


def clock(n: int, params: int, batch: int, mean_size: int, rule: str, k: int = 10, seed: int = 0):
    sizes = np.maximum(1, np.random.default_rng(seed).lognormal(np.log(mean_size), 0.8, n)
                       ).astype(np.int64)
    model = simtime.TimeModel(simtime.heterogeneous(n, seed), simtime.client_steps(sizes, batch),
                              batch, 32.0 * params, 32.0 * params)
    avail = simtime.DiurnalMarkov(n, seed)
    if rule == "async":
        return simtime.AsyncTimeline(model, avail, sizes, k, 2 * k, 4, seed=seed)
    kw = {"deadline_s": 60.0, "partial": True} if rule == "deadline" else {}
    return simtime.SyncTimeline(model, avail, sizes, k, seed=seed, rule=rule, **kw)


def per_round_ms(c, rounds: int) -> float:
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        c.plan(r)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    out: dict = {"rounds": args.rounds, "million": {}, "tasks": {}}
    for rule in ("all", "overcommit", "deadline", "async"):
        t0 = time.perf_counter()
        c = clock(1_000_000, 1_000_000, 20, 50, rule, k=100)
        build = time.perf_counter() - t0
        out["million"][rule] = {"median_ms_per_round": per_round_ms(c, args.rounds),
                                "build_s": build, "clients_per_round": 100}
        print("1M", rule, out["million"][rule], flush=True)
    for name, (n, params, batch, mean_size) in TASKS.items():
        recorded = json.loads((RESULTS / f"{name}.json").read_text())["ours"]["median_s"]
        for rule in ("overcommit", "async"):
            ms = per_round_ms(clock(n, params, batch, mean_size, rule), args.rounds)
            out["tasks"][f"{name}/{rule}"] = {"median_ms_per_round": ms,
                                              "round_median_s": recorded,
                                              "fraction": ms / 1e3 / recorded}
            print(name, rule, out["tasks"][f"{name}/{rule}"], flush=True)
    (RESULTS / "simulated_time.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
