"""The native CPU kernels side by side with FedJAX 0.0.17 and with the pure-JAX fallback.

    python -m benchmarks.native_kernels --fedjax-python /tmp/venv-fedjax/bin/python

runs, back to back on this machine (run it on a quiet one):

1. FedJAX 0.0.17's own EMNIST benchmark (`fedjax_emnist_bench.py` beside the shared
   `synth_emnist.py`, in FedJAX's venv: its CNN, its FedAvg, its full evaluation);
2. the suite's `emnist-cnn` and `emnist-eval` scenarios (`benchmarks.run`) in fresh
   processes, once per variant: `native` (the default when the kernels are built:
   Winograd for the 3x3 layers that qualify, oneDNN's direct convolution for the others),
   `native-direct` (`FEDJAX_NATIVE_CONV=direct`: oneDNN's direct convolutions only),
   `fallback` (`FEDJAX_NATIVE=0`: the pure-JAX path, im2col and `lax.conv`), and each of
   `--precisions` beyond f32 with the native kernels;

and writes `OUT/native_kernels.json` (default `benchmarks/results/`): the machine (CPU
model, its vector flags, the native kernels' status), per variant the median round and
evaluation seconds, the fraction of the measured f32 matmul peak, and the speed-up over
FedJAX. Each variant's full suite JSON is kept in `OUT/native_kernels/<variant>/`. The
Shakespeare LSTM's side of the comparison is `benchmarks.shakespeare_vs_fedjax`.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import measure
from benchmarks.run import default_out

SHARED_BENCH = Path(__file__).resolve().parent.parent.parent / "shared" / "bench"


def run_fedjax(python: str, bench_dir: Path, rounds: int, warmup: int, out: Path) -> dict:
    """FedJAX 0.0.17's EMNIST round and evaluation benchmark, in its own venv."""
    subprocess.run([python, "-W", "ignore", "fedjax_emnist_bench.py", "--warmup", str(warmup),
                    "--rounds", str(rounds), "--json-out", str(out)],
                   cwd=bench_dir, check=True)
    return json.loads(out.read_text())


def run_variant(name: str, env: dict, extra: list[str], rounds: int, warmup: int,
                fedjax_json: Path | None, out_dir: Path, baseline: bool) -> dict:
    """`benchmarks.run emnist-cnn emnist-eval` in a fresh process with `env` added."""
    command = [sys.executable, "-m", "benchmarks.run", "emnist-cnn", "emnist-eval",
               "--rounds", str(rounds), "--warmup", str(warmup), "--chunk-sizes", "1",
               "--out", str(out_dir / name), *extra]
    if fedjax_json is not None:
        command += ["--fedjax-json", str(fedjax_json)]
    if not baseline:
        command.append("--no-baseline")
    (out_dir / name).mkdir(parents=True, exist_ok=True)
    print(f"== {name}: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(command[2:])}",
          flush=True)
    subprocess.run(command, env={**os.environ, **env}, check=True)
    summary = json.loads((out_dir / name / "summary.json").read_text())
    cnn, ev = summary["rows"]["emnist-cnn"], summary["rows"]["emnist-eval"]
    return {"env": env, "args": extra, "machine": summary["machine"],
            "round_s": cnn["ours_s"], "round_flops_fraction": cnn["flops_fraction"],
            "round_speedup_vs_fedjax": cnn["speedup_vs_fedjax"],
            "baseline_round_s": cnn["baseline_s"], "eval_s": ev["ours_s"],
            "eval_speedup_vs_fedjax": ev["speedup_vs_fedjax"],
            "matmul_gflops": summary["matmul_gflops_per_scenario"].get("emnist-cnn")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or '').strip().splitlines()[0])
    p.add_argument("--fedjax-python", default=None,
                   help="python of a venv with fedjax==0.0.17 (none: skip FedJAX)")
    p.add_argument("--fedjax-bench", default=str(SHARED_BENCH),
                   help="directory of fedjax_emnist_bench.py and synth_emnist.py")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precisions", default="f32,bf16",
                   help="precisions to time with the native kernels (f32 always)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE,...",
                   help="another variant with environment variables, e.g. "
                        "'threads-all:FEDJAX_NATIVE_THREADS=0' (repeatable)")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else default_out()
    work = out / "native_kernels"
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    fedjax = fedjax_json = None
    if args.fedjax_python:
        fedjax_json = work / "fedjax_emnist.json"
        print("== FedJAX 0.0.17", flush=True)
        fedjax = run_fedjax(args.fedjax_python, Path(args.fedjax_bench), args.rounds,
                            args.warmup, fedjax_json)
    variants = {"native": ({}, []), "native-direct": ({"FEDJAX_NATIVE_CONV": "direct"}, []),
                "fallback": ({"FEDJAX_NATIVE": "0"}, [])}
    for spec in args.variant:
        name, _, assignments = spec.partition(":")
        env = dict(a.split("=", 1) for a in assignments.split(",") if "=" in a)
        if not name or not env:
            p.error(f"--variant {spec!r}: expected NAME:VAR=VALUE[,VAR=VALUE...]")
        variants[name] = (env, [])
    for precision in [q.strip() for q in args.precisions.split(",") if q.strip()]:
        if precision != "f32":
            variants[f"native-{precision}"] = ({}, ["--precision", precision])
    results = {}
    for name, (env, extra) in variants.items():
        results[name] = run_variant(name, env, extra, args.rounds, args.warmup, fedjax_json,
                                    work, baseline=(name == "native"))
    record = {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": measure.machine_info(), "rounds": args.rounds, "warmup": args.warmup,
              "fedjax_0.0.17": None if fedjax is None else {
                  "jax": fedjax.get("jax"), "round_median_s": fedjax.get("median_round_s"),
                  "eval_median_s": fedjax.get("eval_median_s")},
              "variants": results}
    (out / "native_kernels.json").write_text(json.dumps(record, indent=1) + "\n")
    print(markdown(record))
    return 0


def markdown(record: dict) -> str:
    """The docs' table of a `native_kernels.json` record."""
    lines = ["| variant | s/round | FLOP/s % of matmul | vs FedJAX | eval 10k s | eval vs FedJAX |",
             "| --- | --- | --- | --- | --- | --- |"]
    fj = record.get("fedjax_0.0.17")
    if fj:
        lines.append(f"| FedJAX 0.0.17 (jax {fj['jax']}) | {fj['round_median_s']:.3f} | | 1x | "
                     f"{fj['eval_median_s']:.3f} | 1x |")

    def cell(v, fmt):
        return "-" if v is None else fmt.format(v)

    for name, v in record["variants"].items():
        lines.append(f"| {name} | {cell(v['round_s'], '{:.3f}')} | "
                     f"{cell(v['round_flops_fraction'], '{:.0%}')} | "
                     f"{cell(v['round_speedup_vs_fedjax'], '{:.2f}x')} | "
                     f"{cell(v['eval_s'], '{:.3f}')} | {cell(v['eval_speedup_vs_fedjax'], '{:.2f}x')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
