"""Population scale: Stack Overflow at 10k, 100k, 342k and 1M clients, end to end.

For each population (`benchmarks/stackoverflow_like.py` writes the files, once, into
`--data-dir`), this runs the real command line, `fedjax run stackoverflow --data DIR ...`,
in child processes (`benchmarks/scale_child.py`) and records:

- open: the task's files opened twice in fresh processes, after their mtime is bumped (so
  an id/size index cached beside the data is stale: the first open builds it, the second
  reads it); seconds and bytes read (`rchar`), against the files' bytes;
- for each algorithm (FedAvg, SCAFFOLD), `--rounds` rounds:
  - `startup_s`: process start to the round loop's start (imports, JAX, the files opened,
    the model built; not the first round's compilation), and `from_config_s` /
    `from_config_bytes`: the part of it that opens the task;
  - `first_round_s`: the first round's `round_time_s` (compilation included);
  - `round_s_median`: the median `round_time_s` of rounds 2 and later (metrics.jsonl);
  - `host_ms_per_round`: host work (sampling and packing cohorts) per round;
  - evaluation: each `eval` record's examples, seconds, examples per second;
  - `peak_rss_bytes` (`VmHWM` of the child), `bytes_read` (its `rchar`);
  - `store_bytes`: the run directory's `client_store/` (per-client state on disk) when there
    is one, and `checkpoint_bytes`;
- 1M clients run `stackoverflow-small` (the same files and preprocessing, a small LSTM:
  `benchmarks/scale_child.py`).

Evaluation: when the command line has `--eval-test-clients`, every evaluation is of a fixed
sample of test clients (`--eval-test-clients`, default 125 clients: about 10,000 examples at
the real 81 posts per test client) and the final one too (`--final-eval sampled`); without
it, every evaluation reads the whole test split (slow: give a small `--test-clients`).
`--client-store MODE` is passed to the algorithms that keep per-client state (SCAFFOLD).

Growth exponents: for each measure, the slope of log(measure) against log(clients) over the
populations of the same kind (the real-sized ones; the small-model one apart), printed and
stored under `exponents`.

Example:
  $ python -m benchmarks.scale --sizes 10k,100k,342k --rounds 20
  $ python -m benchmarks.scale --sizes 1m --algorithms fedavg,scaffold --client-store disk
  $ python -m benchmarks.scale --quick          # 10k clients, 3 small rounds, a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import stackoverflow_like as so_like

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STATEFUL = ("scaffold", "feddyn", "ditto", "apfl")
"""Algorithms that keep per-client state (they get `--client-store`)."""
MEASURES = ("open_first_s", "open_second_s", "open_first_bytes", "open_second_bytes",
            "startup_s", "from_config_s", "from_config_bytes", "first_round_s",
            "round_s_median", "host_ms_per_round", "eval_examples_per_s", "peak_rss_bytes",
            "bytes_read", "store_bytes")


def default_data_dir() -> Path:
    """`$FEDJAX_DATA/bench` (or `~/.cache/fedjax/bench`): where the populations are kept."""
    env = os.environ.get("FEDJAX_DATA", "").strip()
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "fedjax") / "bench"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("COLUMNS", "200")
    return env


def cli_supports(flag: str, _cache: dict[str, str] = {}) -> bool:  # noqa: B006 (a memo)
    """Whether `fedjax run --help` lists `flag` (options other branches add)."""
    if "help" not in _cache:
        out = subprocess.run([sys.executable, "-c", "from cli.entry import main; main()",
                              "run", "--help"], cwd=ROOT,
                             env={**child_env(), "COLUMNS": "300"}, capture_output=True,
                             text=True, check=False)
        _cache["help"] = out.stdout + out.stderr
    return flag in _cache["help"]


def dir_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when absent)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def population_dir(data_dir: Path, label: str, population: so_like.Profile) -> Path:
    """The folder of one population, named by its size (and test clients when not default)."""
    name = f"stackoverflow-like-{label}"
    if population.test_clients != so_like.profile(population.train_clients).test_clients:
        name += f"-test{population.test_clients}"
    return data_dir / name


def ensure_data(folder: Path, population: so_like.Profile) -> dict:
    """Generates `population` into `folder` unless it is already there; its manifest."""
    if so_like.is_complete(folder, population):
        info = json.loads((folder / "manifest.json").read_text())
        info["reused"] = True
        return info
    print(f"generating {population.train_clients} clients into {folder} ...", flush=True)
    return so_like.generate(folder, population, log=lambda m: print("  " + m, flush=True))


def _child(stats: Path, args: list[str], log: Path | None = None,
           metrics: Path | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Runs `scale_child` with `args`; its stats plus `wall_s`, `exit_code` and, when
    `metrics` is given, the seconds after launch at which each record appeared."""
    cmd = [sys.executable, "-m", "benchmarks.scale_child", str(stats), *args]
    arrivals: list[float] = []
    start = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT)
        done = threading.Event()

        def watch() -> None:  # when each metrics.jsonl line appears, after launch
            seen = 0
            while not done.is_set():
                if metrics is not None and metrics.exists():
                    with open(metrics, "rb") as f:
                        lines = f.read().count(b"\n")
                    now = time.perf_counter() - start
                    arrivals.extend([now] * (lines - seen))
                    seen = max(seen, lines)
                done.wait(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        done.set()
        watcher.join()
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    wall = time.perf_counter() - start
    result: dict[str, Any] = json.loads(stats.read_text()) if stats.exists() else {}
    result.update(wall_s=wall, exit_code=code, arrivals=arrivals)
    return result


def measure_open(folder: Path, work: Path, task: str) -> dict[str, Any]:
    """First open (after the files' mtime is bumped) and second open, each in a new process."""
    files = [folder / f for f in so_like.FILES]
    now = time.time()
    for f in files:
        os.utime(f, (now, now))
    data_bytes = sum(f.stat().st_size for f in files)
    out: dict[str, Any] = {"data_bytes": data_bytes}
    for which in ("first", "second"):
        r = _child(work / f"open-{which}.json", ["open", str(folder), task])
        if r["exit_code"]:
            raise RuntimeError(f"opening {folder} failed (exit {r['exit_code']})")
        out[f"open_{which}_s"] = r["open_s"]
        out[f"open_{which}_bytes"] = r["open_rchar"]
        out[f"open_{which}_fraction"] = r["open_rchar"] / data_bytes
        out[f"open_{which}_process_s"] = r["wall_s"]
    return out


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a torn last line
    return records


def summarize_run(records: list[dict], stats: dict[str, Any], run_dir: Path,
                  rounds: int) -> dict[str, Any]:
    """The measures of one run from its records, the child's stats and its run directory."""
    arrivals = stats.get("arrivals", [])
    train = [(i, r) for i, r in enumerate(records) if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    out: dict[str, Any] = {"exit_code": stats.get("exit_code"), "wall_s": stats.get("wall_s"),
                           "rounds_done": len(train)}
    if train:
        i, first = train[0]
        out["first_round_s"] = first["round_time_s"]
        if i < len(arrivals):
            out["first_record_after_s"] = arrivals[i]
            out["startup_s"] = arrivals[i] - first["wall_time_s"]
        times = [r["round_time_s"] for _, r in train[1:]]
        if times:
            out["round_s_median"] = statistics.median(times)
            out["round_s_min"] = min(times)
    host = stats.get("host") or {}
    if "host_s" in host and train:
        out["host_ms_per_round"] = 1000 * host["host_s"] / len(train)
        out["host_hidden_fraction"] = host.get("hidden_fraction")
    out["evals"] = [{"round": r["round"], "examples": r.get("test/num_examples"),
                     "seconds": r.get("eval_time_s"),
                     "examples_per_s": (r["test/num_examples"] / r["eval_time_s"]
                                        if r.get("eval_time_s") and r.get("test/num_examples")
                                        else None),
                     "accuracy": r.get("test/accuracy")} for r in evals]
    rates = [e["examples_per_s"] for e in out["evals"] if e["examples_per_s"]]
    if rates:
        out["eval_examples_per_s"] = statistics.median(rates)
    if train:
        out["last_train_loss"] = train[-1][1].get("train/loss")
    for key, name in (("from_config_s", "from_config_s"),
                      ("from_config_rchar", "from_config_bytes"), ("rchar", "bytes_read"),
                      ("vm_hwm_bytes", "peak_rss_bytes")):
        if stats.get(key) is not None:
            out[name] = stats[key]
    out["store_bytes"] = dir_bytes(run_dir / "client_store")
    out["checkpoint_bytes"] = dir_bytes(run_dir / "checkpoints")
    out["run_dir_bytes"] = dir_bytes(run_dir)
    del rounds
    return out


def run_one(folder: Path, work: Path, task: str, algorithm: str, args: argparse.Namespace
            ) -> dict[str, Any]:
    """`fedjax run TASK --data FOLDER --algorithm ALGORITHM ...` in a child, measured."""
    run_dir = work / f"run-{algorithm}"
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    cmd = [task, "--data", str(folder), "--algorithm", algorithm,
           "--rounds", str(args.rounds), "--out", str(run_dir),
           "--eval-every", str(args.eval_every), "--eval-train-clients", "0",
           "--checkpoint-every", "0"]
    if args.eval_test_clients is not None:
        cmd += ["--eval-test-clients", str(args.eval_test_clients)]
        if cli_supports("--final-eval"):
            cmd += ["--final-eval", "sampled"]
    if args.client_store and algorithm in STATEFUL:
        cmd += ["--client-store", args.client_store]
    cmd += shlex.split(args.extra or "")
    print(f"  fedjax run {shlex.join(cmd)}", flush=True)
    stats = _child(work / f"run-{algorithm}.json", ["run", *cmd], log=work / f"run-{algorithm}.log",
                   metrics=run_dir / "metrics.jsonl", timeout=args.timeout)
    out = summarize_run(read_records(run_dir), stats, run_dir, args.rounds)
    out["command"] = "fedjax run " + shlex.join(cmd)
    if out["exit_code"]:
        tail = (work / f"run-{algorithm}.log").read_text(errors="replace")[-800:]
        out["error_tail"] = tail
        print(f"  exit {out['exit_code']}:\n{tail}", flush=True)
    return out


def log_log_slope(xs: list[float], ys: list[float | None]) -> float | None:
    """Least-squares slope of log(y) against log(x); None with fewer than 2 positive points.

    Example:
      >>> log_log_slope([1e4, 1e5], [1.0, 10.0])
      1.0
    """
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys)
           if x and y is not None and x > 0 and y > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx, 3)


def exponents(sizes: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Growth exponent of every measure, per series (`open`, `TASK/ALGORITHM`)."""
    series: dict[str, list[tuple[int, dict]]] = {}
    for entry in sizes.values():
        clients = entry["clients"]
        kind = "small" if entry["small"] else "real"
        series.setdefault(f"open ({kind})", []).append((clients, entry["open"]))
        for algorithm, run in entry["runs"].items():
            series.setdefault(f"{entry['task']}/{algorithm}", []).append((clients, run))
    out: dict[str, dict[str, float]] = {}
    for name, points in series.items():
        fits: dict[str, float] = {}
        for m in MEASURES:
            slope = log_log_slope([c for c, _ in points], [p.get(m) for _, p in points])
            if slope is not None:
                fits[m] = slope
        if fits:
            out[name] = fits
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="10k,100k,342k,1m",
                        help="train populations, comma-separated: 10k,100k,342k,1m")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--algorithms", default="fedavg,scaffold")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the populations are written (reused when present); "
                             "default $FEDJAX_DATA/bench")
    parser.add_argument("--extra", default="",
                        help="more `fedjax run` arguments, one string, e.g. "
                             "'--clients-per-round 10 --max-steps 20'")
    parser.add_argument("--eval-test-clients", type=int, default=None,
                        help="test clients of each (sampled) evaluation; default 125 when the "
                             "command line has --eval-test-clients")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--client-store", default=None,
                        help="--client-store for the algorithms with per-client state "
                             "(auto, device, host, disk)")
    parser.add_argument("--test-clients", type=int, default=None,
                        help="test clients of each population (default: the real ratio, "
                             "0.596 per train client)")
    parser.add_argument("--small-from", default="1m",
                        help="populations this large run the small model (stackoverflow-small)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 10k clients, 3 rounds of 10 clients x 10 steps, "
                             "200 test clients")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results/scale.json; "
                             "scale-quick.json with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = "10k" if args.sizes == parser.get_default("sizes") else args.sizes
        args.rounds = 3 if args.rounds == parser.get_default("rounds") else args.rounds
        args.extra = args.extra or "--clients-per-round 10 --max-steps 10"
        args.test_clients = 200 if args.test_clients is None else args.test_clients
        args.eval_every = 0
    out_path = args.out or RESULTS / ("scale-quick.json" if args.quick else "scale.json")
    has_sampled_eval = cli_supports("--eval-test-clients")
    if args.eval_test_clients is None and has_sampled_eval:
        args.eval_test_clients = 125
    if args.eval_test_clients is not None and not has_sampled_eval:
        parser.error("--eval-test-clients: this fedjax has no such option (issue 17's sampled "
                     "evaluation); leave it out, and give a small --test-clients")
    if args.client_store and not cli_supports("--client-store"):
        parser.error("--client-store: this fedjax has no such option (issue 17's client "
                     "stores); leave it out")
    data_dir = args.data_dir or default_data_dir()
    small_from = so_like.parse_count(args.small_from)
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    result: dict[str, Any] = {
        "what": "benchmarks/scale.py: Stack-Overflow-like populations end to end",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "settings": {"rounds": args.rounds, "algorithms": algorithms, "extra": args.extra,
                     "eval_every": args.eval_every, "eval_test_clients": args.eval_test_clients,
                     "client_store": args.client_store, "test_clients": args.test_clients,
                     "quick": args.quick},
        "cli_has": {flag: cli_supports(flag) for flag in
                    ("--eval-test-clients", "--final-eval", "--client-store")},
        "sizes": {}}
    for label in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        clients = so_like.parse_count(label)
        small = clients >= small_from
        population = so_like.profile(clients, small)
        if args.test_clients is not None:
            population = population._replace(test_clients=args.test_clients)
        folder = population_dir(data_dir, label, population)
        t = time.perf_counter()
        info = ensure_data(folder, population)
        generate_s = time.perf_counter() - t
        work = data_dir / "work" / folder.name
        work.mkdir(parents=True, exist_ok=True)
        task = "stackoverflow-small" if small else "stackoverflow"
        print(f"{label}: {folder} ({dir_bytes(folder) / 2**20:.0f} MiB); opening ...", flush=True)
        entry: dict[str, Any] = {
            "clients": clients, "small": small, "task": task, "folder": str(folder),
            "data": {k: info.get(k) for k in ("profile", "train", "test", "seconds")},
            "generate_s": None if info.get("reused") else generate_s,
            "open": measure_open(folder, work, task), "runs": {}}
        o = entry["open"]
        print(f"  open: first {o['open_first_s']:.2f} s / {o['open_first_fraction']:.1%} of "
              f"the files read; second {o['open_second_s']:.2f} s / "
              f"{o['open_second_fraction']:.1%}", flush=True)
        for algorithm in algorithms:
            run = run_one(folder, work, task, algorithm, args)
            entry["runs"][algorithm] = run
            print(f"  {algorithm}: startup {run.get('startup_s', float('nan')):.1f} s, first "
                  f"round {run.get('first_round_s', float('nan')):.1f} s, median round "
                  f"{run.get('round_s_median', float('nan')):.2f} s, host "
                  f"{run.get('host_ms_per_round', float('nan')):.1f} ms/round, eval "
                  f"{run.get('eval_examples_per_s', float('nan')):.0f} ex/s, peak RSS "
                  f"{(run.get('peak_rss_bytes') or 0) / 2**30:.2f} GiB, store "
                  f"{run['store_bytes'] / 2**20:.1f} MiB", flush=True)
        result["sizes"][label] = entry
        result["exponents"] = exponents(result["sizes"])
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1) + "\n")
    for name, fits in result.get("exponents", {}).items():
        print(f"growth exponents, {name}: " + ", ".join(f"{m} {v:+.2f}" for m, v in fits.items()))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
