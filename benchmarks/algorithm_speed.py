"""Seconds per round of FedAvg (CNN and LSTM), SCAFFOLD and Mime (CNN), for before/after
comparisons of the round's core (issue 13: "round time is no worse than today").

Scenarios come from `benchmarks.scenarios` (`emnist-cnn`: FedJAX's EMNIST CNN on
EMNIST-like data, 10 clients a round, batch 20; `shakespeare-lstm`: the char LSTM on
shakespeare-plays, 10 clients a round, batch 4), each algorithm with chunk size 1,
3 warm-up rounds then `--rounds` timed ones; the median is reported.

To compare two commits, run this file with each tree first on the path, in one session
on a quiet machine, and alternate them (A B A):

    PYTHONPATH=/path/to/old python benchmarks/algorithm_speed.py --label before --out a.json
    PYTHONPATH=.            python benchmarks/algorithm_speed.py --label after  --out b.json

A tree from before the round skeleton (commit 1b5d73b and earlier) kept the per-client
index on the host: for it, this script prepares SCAFFOLD's rows with that commit's
`client_state.prepare`, as its `Server.step` did. Never part of the tests.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

CASES = (("fedavg", "emnist-cnn"), ("fedavg", "shakespeare-lstm"), ("scaffold", "emnist-cnn"),
         ("mime", "emnist-cnn"))


def time_case(algorithm: str, scenario: str, rounds: int, warmup: int) -> dict:
    import jax
    import optax

    from benchmarks import scenarios
    from fedjax_core import client_state, parallel
    from fedjax_core.algorithms import registry
    from fedjax_core.algorithms.base import jit_round
    from fedjax_core.models.base import Model

    setup = scenarios.build(scenario, scenarios.Options(rounds=rounds, warmup=warmup))
    model, sample = setup.model, setup.cohort
    assert isinstance(model, Model) and sample is not None  # a training scenario
    entry = registry.get(algorithm)
    facts = {"num_clients": 3400, "client_learning_rate": setup.client_lr}
    alg = registry.build(algorithm, optax.sgd(setup.client_lr), setup.server_lr,
                         **{k: facts[k] for k in entry.needs})
    step = jit_round(alg, model, parallel.Plan(chunk_size=1))
    state = alg.init(jax.jit(model.init)(jax.random.key(0)))
    # A tree from before the skeleton has `client_state.StateIndex` and `prepare`.
    state_index = getattr(client_state, "StateIndex", None)
    host_index = state_index() if state_index is not None else None
    seconds = []
    for r in range(warmup + rounds):
        cohort = sample(r, False)
        if host_index is not None and client_state.has_stores(state):  # before the skeleton
            prepare = getattr(client_state, "prepare")
            state, slots = prepare(host_index, state, cohort.client_index)
            cohort = cohort._replace(slots=slots)
        t = time.perf_counter()
        state, metrics = step(state, cohort, jax.random.key(r))
        jax.block_until_ready((state, metrics))
        if r >= warmup:
            seconds.append(time.perf_counter() - t)
    return {"algorithm": algorithm, "scenario": scenario, "median_s": statistics.median(seconds),
            "min_s": min(seconds), "rounds": len(seconds),
            "final_loss": float(metrics["train/loss"])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = []
    for algorithm, scenario in CASES:
        row = time_case(algorithm, scenario, args.rounds, args.warmup)
        rows.append(row)
        print(f"{args.label:8s} {algorithm:9s} {scenario:17s} median {row['median_s']:.3f} s "
              f"(min {row['min_s']:.3f}, loss {row['final_loss']:.4f})", flush=True)
    args.out.write_text(json.dumps({"label": args.label, "machine": platform.machine(),
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
