"""bfloat16 mixed precision against float32: FedAvg accuracy on the FEMNIST LEAF sample, and speed.

Accuracy: `fedjax run femnist-leaf --precision P` (FedJAX's EMNIST CNN, FedAvg, the
hyperparameters of `benchmarks.femnist_accuracy`, whose `run_ours` runs each one) for every
seed and precision, `--rounds` rounds (300), the test accuracy over every test image at round
0, every `--eval-every` rounds (50) and after the last. The issue's bar: the bf16 runs' final
accuracy within 1 point of the f32 runs' (mean over seeds). `--jobs` runs at a time.

Speed: seconds per round of `fedjax run TASK --precision P` for `--speed-tasks`
(shakespeare-plays: the plays LSTM, 10 clients of batch 4; femnist-leaf: the EMNIST CNN, 10
clients of batch 20), `--speed-rounds` rounds (the median of `round_time_s` after
`--speed-warmup` rounds, which include compiling), one run at a time, evaluation cut to one
test client (`--eval-test-clients 1 --eval-train-clients 0`) so that it does not count.

Writes `benchmarks/results/precision_accuracy.json`.

Example:
  python -m benchmarks.precision_accuracy --data /work/shared/femnist_leaf_sample --jobs 2
  python -m benchmarks.precision_accuracy --rounds 3 --eval-every 1 --speed-rounds 4   # smoke
"""

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.femnist_accuracy import ROOT, machine, run_ours

RESULTS = ROOT / "benchmarks" / "results" / "precision_accuracy.json"


def accuracy_runs(args, workdir: Path) -> list[dict]:
    """Every (seed, precision) FedAvg run on the FEMNIST sample, `args.jobs` at a time."""
    def one(job):
        seed, precision = job
        print(f"seed {seed}, {precision}: {args.rounds} rounds ...", flush=True)
        res = run_ours(args, seed, workdir, extra=("--precision", precision), tag=precision)
        res["precision"] = precision
        print(f"seed {seed}, {precision}: final accuracy "
              f"{res['history'][-1]['test/accuracy']:.4f} in {res['wall_s']:.0f} s", flush=True)
        return res

    jobs = [(seed, p) for seed in args.seeds for p in args.precisions]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return list(pool.map(one, jobs))  # subprocesses: the threads only wait


def summary(runs: list[dict]) -> dict:
    """Per precision, the final test accuracy of each seed and their mean; the bf16 - f32
    difference of the means in points, and whether it is within 1 point."""
    out: dict = {}
    for p in dict.fromkeys(r["precision"] for r in runs):
        final = {str(r["seed"]): r["history"][-1]["test/accuracy"] for r in runs
                 if r["precision"] == p}
        out[p] = {"final_accuracy": final, "mean": statistics.fmean(final.values())}
    if "f32" in out and "bf16" in out:
        diff = 100 * (out["bf16"]["mean"] - out["f32"]["mean"])
        out["bf16_minus_f32_points"] = diff
        out["within_1_point"] = abs(diff) <= 1.0
    return out


def seconds_per_round(args, task: str, precision: str, workdir: Path) -> dict:
    """The median `round_time_s` of `fedjax run TASK --precision P` after the warm-up rounds."""
    out = workdir / f"speed-{task}-{precision}"
    cmd = [sys.executable, "-c", "from cli.entry import main; main()", "run", task,
           "--rounds", str(args.speed_rounds), "--precision", precision, "--seed", "0",
           "--eval-every", "0", "--eval-test-clients", "1", "--eval-train-clients", "0",
           "--checkpoint-every", "0", "--out", str(out)]
    if task == "femnist-leaf":
        cmd += ["--data", args.data]
    with open(workdir / f"speed-{task}-{precision}.log", "w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=log)
    times = [json.loads(line)["round_time_s"]
             for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    timed = times[args.speed_warmup:] or times[-1:]
    return {"task": task, "precision": precision, "median_s_per_round": statistics.median(timed),
            "first_round_s": times[0], "timed_rounds": len(timed)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--data", default="/work/shared/femnist_leaf_sample",
                    help="LEAF FEMNIST folder with train/ and test/")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--precisions", nargs="+", default=["f32", "bf16"],
                    choices=["f32", "bf16"])
    ap.add_argument("--clients-per-round", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--client-lr", type=float, default=0.1)
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=1, help="accuracy runs at the same time")
    ap.add_argument("--speed-tasks", nargs="*", default=["shakespeare-plays", "femnist-leaf"],
                    help="tasks whose seconds per round are timed (none: skip)")
    ap.add_argument("--speed-rounds", type=int, default=12)
    ap.add_argument("--speed-warmup", type=int, default=2,
                    help="first rounds left out of the median (compiling)")
    ap.add_argument("--workdir", default="", help="where the runs write (default: a temp dir)")
    ap.add_argument("--json-out", default=str(RESULTS))
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="precision-accuracy-"))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = accuracy_runs(args, workdir)
    speed = [seconds_per_round(args, task, p, workdir)  # one at a time: timings
             for task in args.speed_tasks for p in args.precisions]
    for s in speed:
        print(f"{s['task']} {s['precision']}: {s['median_s_per_round']:.3f} s/round", flush=True)
    hp = {k: getattr(args, k) for k in ("rounds", "clients_per_round", "batch_size",
                                        "client_lr", "server_lr", "eval_every", "seeds")}
    results = {"task": "femnist-leaf", "algorithm": "fedavg", "epochs": 1,
               "hyperparameters": hp, "jobs": args.jobs, "machine": machine(),
               "summary": summary(runs), "speed": speed, "runs": runs,
               "wall_s": time.perf_counter() - start}
    Path(args.json_out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["summary"], indent=1))
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
