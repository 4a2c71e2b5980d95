"""The worked experiment of docs/simulated_time.md: time to a target accuracy on the simulated clock.

FEMNIST sample (task femnist-leaf on ../shared/femnist_leaf_sample: 105 writers), FedAvg's
CNN (batch 20, client SGD 0.1), heterogeneous devices (`fedjax_core.simtime.heterogeneous`) and diurnal availability,
10 clients per round, each run stopped at the first evaluation (every 2 rounds) at or above
the target test accuracy:

    all         FedAvg, every round waits for all 10 clients
    overcommit  FedAvg, draw 13, keep the first 10 to finish
    deadline    FedAvg, 20 s deadline with partial work
    fedbuff     FedBuff on the event timeline, buffer 10, concurrency 20
    fedasync    FedAsync (fedbuff rule=fedasync): one arrival per server step, concurrency 20
                (not in the default --runs; add it with --runs fedasync --merge)

Writes benchmarks/results/simulated_time_experiment.json and docs/images/simulated_time.png.

  python -m benchmarks.simulated_time_experiment [--target 0.6] [--max-rounds 120] [--eval-every 2]
"""

import argparse
import json
import time
from pathlib import Path

from fedjax_api import Experiment, config
from fedjax_api.loop import Callback

DATA = Path(__file__).resolve().parents[2] / "shared" / "femnist_leaf_sample"
RUNS = {
    "all": dict(algorithm="fedavg"),
    "overcommit": dict(algorithm="fedavg", selection="overcommit"),
    "deadline": dict(algorithm="fedavg", selection="deadline", deadline=20.0, partial_work=True),
    "fedbuff": dict(algorithm="fedbuff", concurrency=20),
    # FedAsync: one arrival per server step (so 10x the steps, evaluated every 10x the
    # rounds), mixing weight alpha = 0.6, s = (1 + tau)^-0.5; with 20 in flight staleness is
    # about 20, so 40 versions are kept
    "fedasync": dict(algorithm="fedbuff", concurrency=20, clients_per_round=1, server_lr=0.6,
                     algorithm_options={"rule": "fedasync", "max_staleness": 40},
                     rounds_scale=10),
}
"""The runs; `rounds_scale` multiplies the run's round limit and evaluation period."""


class StopAtTarget(Callback):
    """Stops the run at the first evaluation reaching `target` test accuracy."""

    def __init__(self, target: float):
        self.target = target

    def on_record(self, loop, record):
        if record["kind"] == "eval" and record.get("test/accuracy", 0.0) >= self.target:
            loop.stop(f"reached {self.target}")


def run(name: str, target: float, max_rounds: int, data: str, seed: int,
        eval_every: int = 2) -> dict:
    options = dict(RUNS[name])
    scale = options.pop("rounds_scale", 1)
    settings = dict(data=data, rounds=max_rounds * scale, clients_per_round=10, batch_size=20,
                    client_lr=0.1, server_lr=1.0, eval_every=eval_every * scale,
                    eval_train_clients=0, seed=seed, devices_profile="heterogeneous",
                    availability="diurnal")
    cfg = config.resolve("femnist-leaf", **{**settings, **options})
    start = time.perf_counter()
    result = Experiment.from_config(cfg).run(callbacks=[StopAtTarget(target)])
    train = {r["round"]: r for r in result.history if r["kind"] == "train"}
    curve = [(r["round"], train[r["round"]]["time/simulated_s"] if r["round"] else 0.0,
              r["test/accuracy"]) for r in result.history
             if r["kind"] == "eval" and "test/accuracy" in r]
    reached = [c for c in curve if c[2] >= target]
    return {"rounds": reached[0][0] if reached else None,
            "simulated_s": reached[0][1] if reached else None,
            "curve": curve, "wall_s": time.perf_counter() - start,
            "eval_every": cfg.eval_every, "clients_per_round": cfg.clients_per_round,
            "mean_round_s": sum(t["time/round_simulated_s"] for t in train.values()) / len(train),
            "dropped_per_round": sum(t["time/clients_dropped"] for t in train.values()) / len(train)}


def plot(results: dict, target: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, res in results.items():
        _, t, acc = zip(*res["curve"])
        ax.plot([x / 3600 for x in t], acc, marker=".", label=name)
    ax.axhline(target, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("test accuracy")
    ax.set_title("FEMNIST sample, heterogeneous devices, diurnal availability")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--target", type=float, default=0.6)
    parser.add_argument("--max-rounds", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--runs", default="all,overcommit,deadline,fedbuff")
    parser.add_argument("--merge", action="store_true",
                        help="add to the runs already in the results file")
    parser.add_argument("--eval-every", type=int, default=2)
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    path = root / "benchmarks" / "results" / "simulated_time_experiment.json"
    results = json.loads(path.read_text())["runs"] if args.merge and path.exists() else {}
    for name in args.runs.split(","):
        results[name] = run(name, args.target, args.max_rounds, args.data, args.seed,
                            args.eval_every)
        print(name, {k: v for k, v in results[name].items() if k != "curve"}, flush=True)
        out = {"target": args.target, "seed": args.seed, "task": "femnist-leaf (sample)",
               "eval_every": args.eval_every, "max_rounds": args.max_rounds, "runs": results}
        path.write_text(json.dumps(out, indent=1))  # after every run: a cut-short session keeps the rest
    plot(results, args.target, root / "docs" / "images" / "simulated_time.png")


if __name__ == "__main__":
    main()
