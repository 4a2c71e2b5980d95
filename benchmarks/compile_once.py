"""Does a run compile its round once, and does a second process start warm?

Runs the same experiment twice, each in a fresh process, with one new persistent
compilation cache directory shared by both. In each process it counts XLA compilations
(JAX's `/jax/core/compile/backend_compile_duration` events, which also fire when the
executable comes from the persistent cache) before the first round
ended and during the remaining rounds, and persistent-cache hits; and it times the first
round (compilation included) against the median round.

    python -m benchmarks.compile_once --task synthetic --rounds 100

Writes `benchmarks/results/compile_once-<task>.json`; never part of the tests.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def child(task_name: str, rounds: int, cache: str) -> dict:
    """One process: the experiment, with compile events counted per phase."""
    start = time.perf_counter()
    import jax
    import jax.monitoring
    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    from fedjax_api import Experiment, compile_cache, config

    compile_cache.enable_compilation_cache(cache, min_compile_seconds=0.0)
    phase = {"name": "setup"}
    compiles = {"setup": [], "first_round": [], "later_rounds": [], "final_eval": []}
    hits = {"n": 0}

    def on_duration(event: str, duration_secs: float, **kwargs: str | int) -> None:
        if event == BACKEND_COMPILE_EVENT:
            compiles[phase["name"]].append(duration_secs)

    def on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits["n"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    cfg = config.resolve(task_name, rounds=rounds, eval_every=0)
    exp = Experiment.from_config(cfg)
    phase["name"] = "first_round"
    times = []

    def on_record(record):
        if record["kind"] == "train":
            times.append(record["round_time_s"])
            phase["name"] = "later_rounds" if record["round"] < rounds else "final_eval"

    result = exp.run(on_record=on_record)
    return {
        "process_s": time.perf_counter() - start,
        "first_round_s": times[0],
        "median_round_s": statistics.median(times[1:]) if len(times) > 1 else None,
        "compile_requests": {k: len(v) for k, v in compiles.items()},
        "compile_s": {k: sum(v) for k, v in compiles.items()},
        "persistent_cache_hits": hits["n"],
        "host": result.host,
    }


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--task", default="synthetic")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--child", metavar="CACHE_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.task, args.rounds, args.child)))
        return

    import jax

    result = {"task": args.task, "rounds": args.rounds, "jax": jax.__version__,
              "cpu_count": os.cpu_count(), "processes": []}
    with tempfile.TemporaryDirectory(prefix="fedjax-cache-") as cache:
        for name in ("cold", "warm"):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.compile_once", "--task", args.task,
                 "--rounds", str(args.rounds), "--child", cache],
                capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent,
                env={**os.environ, "FEDJAX_COMPILATION_CACHE": cache})
            record = {"process": name, **json.loads(out.stdout.strip().splitlines()[-1])}
            result["processes"].append(record)
            c = record["compile_requests"]
            print(f"{name}: first round {record['first_round_s']:.2f} s, median round "
                  f"{record['median_round_s']:.4f} s, compile requests setup/first/later/eval "
                  f"{c['setup']}/{c['first_round']}/{c['later_rounds']}/{c['final_eval']}, "
                  f"cache hits {record['persistent_cache_hits']}, "
                  f"host work {record['host']['hidden_fraction']:.0%} hidden")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"compile_once-{args.task}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
