"""FedAvg test accuracy by round on the FEMNIST LEAF sample: fedjax-sim against FedJAX 0.0.17.

Both frameworks train the same model (FedJAX's EMNIST CNN, 1,206,590 parameters) on the same
clients with the same preprocessing and hyperparameters, for each seed:

  * data: the LEAF FEMNIST sample (`--data`, a folder with train/ and test/), read by our task
    `femnist-leaf`; FedJAX reads the same files converted by `fedjax data convert` into its
    SQLite format. Both invert the pixels (`x = 1 - x`) as FedJAX's EMNIST does.
  * FedAvg: client SGD (`--client-lr`), server SGD (`--server-lr`), batch `--batch-size`,
    one epoch, `--clients-per-round` clients per round.
  * sampling: fedjax-sim's uniform sampler for the seed; the same client ids go to FedJAX, so
    both frameworks see the same clients in the same rounds. Initial weights, batch order and
    dropout masks come from each framework's own random streams (same distributions).
  * evaluation: accuracy over every example of the test split at round 0 and every
    `--eval-every` rounds.

Runs the four runs (2 seeds x 2 frameworks), `--jobs` at a time, writes
`benchmarks/results/femnist_accuracy.json`, and draws `docs/images/femnist_accuracy.png`
(mean over seeds, band = min..max). `--plot-only` redraws from the JSON.

Example:
  python -m benchmarks.femnist_accuracy --data /work/shared/femnist_leaf_sample --jobs 2
  python -m benchmarks.femnist_accuracy --plot-only
"""

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "femnist_accuracy.json"
FIGURE = ROOT / "docs" / "images" / "femnist_accuracy.png"
FEDJAX_SCRIPT = ROOT / "benchmarks" / "fedjax_femnist_accuracy.py"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine and the versions of this side (jax, fedjax-sim)."""
    import jax

    from fedjax_api.versions import package_version

    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "fedjax_sim": package_version(), "python": platform.python_version()}


def schedule(data: str, seed: int, rounds: int, clients_per_round: int) -> list[list[str]]:
    """The client ids of each round that `fedjax run femnist-leaf --seed SEED` trains on."""
    from fedjax_api.tasks import registry

    task = registry.get("femnist-leaf", seed=seed, data_path=data)
    ids = task.train.data.client_ids
    return [[str(ids[i]) for i in task.train.sample_indices(clients_per_round, r)]
            for r in range(rounds)]


def check_same_clients(data: str, sched: list[list[str]], run_dir: Path) -> None:
    """Each round of our run trained on exactly the examples of the clients `sched` gives
    FedJAX (`train/num_examples` = the sum of their sizes), or an AssertionError."""
    from fedjax_api.tasks import registry

    train = registry.get("femnist-leaf", data_path=data).train.data
    sizes = dict(zip(map(str, train.client_ids), map(int, train.client_sizes)))
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            expected = sum(sizes[c] for c in sched[rec["round"] - 1])
            assert int(rec["train/num_examples"]) == expected, (rec["round"], expected)


def run_ours(args, seed: int, workdir: Path, extra: tuple[str, ...] = (), tag: str = "ours"
             ) -> dict:
    """`fedjax run femnist-leaf` as a user runs it (plus the options `extra`, in run dir
    `TAG-SEED`); the history from its metrics.jsonl."""
    out = workdir / f"{tag}-{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resume
    cmd = [sys.executable, "-c", "from cli.entry import main; main()", "run", "femnist-leaf", "--data", args.data,
           "--algorithm", "fedavg", "--rounds", str(args.rounds), "--seed", str(seed),
           "--clients-per-round", str(args.clients_per_round),
           "--batch-size", str(args.batch_size), "--epochs", "1",
           "--client-lr", str(args.client_lr), "--server-lr", str(args.server_lr),
           "--eval-every", str(args.eval_every), "--out", str(out), *extra]
    t = time.perf_counter()
    with open(workdir / f"{tag}-{seed}.log", "w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=log)
    wall = time.perf_counter() - t
    history = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "test/accuracy" in rec:
            history.append({"round": rec["round"], "test/accuracy": rec["test/accuracy"],
                            "test/loss": rec.get("test/loss")})
    return {"framework": "fedjax-sim", "seed": seed, "history": history, "wall_s": wall}


def run_fedjax(args, seed: int, workdir: Path, sched: list[list[str]]) -> dict:
    """FedJAX 0.0.17 in its own venv on the converted files and the same schedule."""
    sched_path = workdir / f"schedule-{seed}.json"
    sched_path.write_text(json.dumps(sched))
    out = workdir / f"fedjax-{seed}.json"
    cmd = [args.fedjax_python, "-W", "ignore", str(FEDJAX_SCRIPT),
           "--train", str(workdir / "train.sqlite"), "--test", str(workdir / "test.sqlite"),
           "--schedule", str(sched_path), "--seed", str(seed),
           "--batch-size", str(args.batch_size), "--client-lr", str(args.client_lr),
           "--server-lr", str(args.server_lr), "--eval-every", str(args.eval_every),
           "--json-out", str(out)]
    t = time.perf_counter()
    with open(workdir / f"fedjax-{seed}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log)
    wall = time.perf_counter() - t
    res = json.loads(out.read_text())
    return {"framework": "fedjax-0.0.17", "seed": seed, "history": res["history"],
            "wall_s": wall, "jax": res["jax"]}


def convert(data: str, workdir: Path) -> None:
    """The LEAF splits as FedJAX SQLite, with our converter (`fedjax data convert`)."""
    from fedjax_core.data.convert import leaf_to_sqlite

    for split in ("train", "test"):
        leaf_to_sqlite(Path(data) / split, workdir / f"{split}.sqlite")


def run_all(args) -> dict:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="femnist-accuracy-"))
    workdir.mkdir(parents=True, exist_ok=True)
    convert(args.data, workdir)
    schedules = {seed: schedule(args.data, seed, args.rounds, args.clients_per_round)
                 for seed in args.seeds}

    def one(job):
        seed, which = job
        print(f"seed {seed}: {which} ...", flush=True)
        if which == "fedjax-sim":
            res = run_ours(args, seed, workdir)
            check_same_clients(args.data, schedules[seed], workdir / f"ours-{seed}")
        else:
            res = run_fedjax(args, seed, workdir, schedules[seed])
        print(f"seed {seed}: {which}: final accuracy {res['history'][-1]['test/accuracy']:.4f} "
              f"in {res['wall_s']:.0f} s", flush=True)
        return res

    jobs = [(seed, which) for seed in args.seeds for which in args.frameworks]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(one, jobs))  # subprocesses: the threads only wait
    fedjax_jax = next((r["jax"] for r in runs if r.get("jax")), None)
    hp = {k: getattr(args, k) for k in ("rounds", "clients_per_round", "batch_size",
                                        "client_lr", "server_lr", "eval_every", "seeds")}
    return {"task": "femnist-leaf", "data": "FEMNIST LEAF sample (105 train writers, "
            "14,708 train / 4,088 test examples)", "algorithm": "fedavg", "epochs": 1,
            "hyperparameters": hp, "machine": {**machine(), "fedjax_0_0_17_jax": fedjax_jax},
            "runs": runs}


def plot(results: dict, path: Path = FIGURE) -> None:
    """Mean test accuracy over seeds by round, with the min..max band, per framework."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, color in (("fedjax-sim", "tab:blue"), ("fedjax-0.0.17", "tab:orange")):
        runs = [r for r in results["runs"] if r["framework"] == name]
        if not runs:
            continue
        rounds = np.array([h["round"] for h in runs[0]["history"]])
        acc = np.array([[h["test/accuracy"] for h in r["history"]] for r in runs])
        label = "fedjax-sim" if name == "fedjax-sim" else "FedJAX 0.0.17"
        ax.plot(rounds, acc.mean(0), color=color,
                label=f"{label}: mean of {len(runs)} seeds, band min..max")
        ax.fill_between(rounds, acc.min(0), acc.max(0), color=color, alpha=0.25, linewidth=0)
    hp = results["hyperparameters"]
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (all test images)")
    m = results["machine"]
    fig.text(0.01, 0.01, f"{m['cpu_model']}, {m['cpu_count']} cores; fedjax-sim {m['fedjax_sim']} "
             f"(jax {m['jax']}); FedJAX 0.0.17 (jax {m.get('fedjax_0_0_17_jax')})",
             fontsize=6, color="gray")
    ax.set_title(f"FedAvg on the FEMNIST LEAF sample, FedJAX's EMNIST CNN\n"
                 f"{hp['clients_per_round']} clients/round, "
                 f"batch {hp['batch_size']}, 1 epoch, client SGD {hp['client_lr']}, server SGD "
                 f"{hp['server_lr']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--data", default="/work/shared/femnist_leaf_sample",
                    help="LEAF FEMNIST folder with train/ and test/")
    ap.add_argument("--fedjax-python", default="/tmp/venv-fedjax/bin/python",
                    help="python of a venv with fedjax==0.0.17 (docs/benchmarks.md)")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--frameworks", nargs="+", default=["fedjax-sim", "fedjax-0.0.17"])
    ap.add_argument("--clients-per-round", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--client-lr", type=float, default=0.1)
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    ap.add_argument("--workdir", default="", help="where the runs write (default: a temp dir)")
    ap.add_argument("--json-out", default=str(RESULTS))
    ap.add_argument("--figure", default=str(FIGURE))
    ap.add_argument("--plot-only", action="store_true", help="redraw from --json-out")
    args = ap.parse_args(argv)
    if not args.plot_only:
        if "fedjax-0.0.17" in args.frameworks and not Path(args.fedjax_python).exists():
            ap.exit(2, f"error: {args.fedjax_python} does not exist; create FedJAX 0.0.17's "
                       "venv as docs/benchmarks.md says, or pass --fedjax-python\n")
        results = run_all(args)
        Path(args.json_out).write_text(json.dumps(results, indent=1) + "\n")
    results = json.loads(Path(args.json_out).read_text())
    plot(results, Path(args.figure))
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
