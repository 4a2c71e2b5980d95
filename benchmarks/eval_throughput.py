"""Evaluation throughput (examples/s) of the Stack Overflow LSTM: this library's evaluation
(`fedjax_core.evaluate.metric_totals`, groups of padded batches packed across clients, one
jitted `lax.scan` per group) against FedJAX 0.0.17's `evaluate_model` (one jitted call per
padded batch), on the whole test split and on a fixed sample of its clients
(`--eval-test-clients`).

Same model on both sides: FedJAX's Stack Overflow LSTM (vocab 10,000, embed 96, hidden 670,
sequences of 20; ours `fedjax_core.models.stackoverflow_lstm`, theirs
`fedjax.models.stackoverflow.create_lstm_model`), initialized (the speed does not depend on
the weights). Same synthetic data: `--examples` test examples (10,000) over clients of
log-normal sizes with mean 81 (TFF's Stack Overflow test split: 16,586,035 examples over
204,088 clients), each example a sentence of 1-20 tokens; the sample is `--sample-clients`
of them, drawn as `Evaluator.test_sample` draws it. Each pass runs once to compile, then
`--repeats` times; the JSON has every time and the medians.

FedJAX runs in its own venv (`--fedjax-python`, default /work/fedjax-venv/bin/python; see
tests/fixtures/fedjax_reference/README.md), with `tests/fixtures/fedjax_bench/fedjax_eval_bench.py`
reading the same clients from a temporary .npz; without that venv, only our side is timed.

Run:
    .venv/bin/python -m benchmarks.eval_throughput --out benchmarks/results/eval_throughput.json
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FEDJAX_SCRIPT = ROOT / "tests" / "fixtures" / "fedjax_bench" / "fedjax_eval_bench.py"
SEQ_LEN = 20
VOCAB = 10_000
MEAN_TEST_CLIENT = 16_586_035 / 204_088
"""TFF's Stack Overflow test split: examples per client (about 81)."""


def make_clients(examples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(x, y, sizes)`: `examples` sentences over clients of log-normal sizes (mean about
    81, sigma 1), `x` the BOS-led token ids `[examples, 20]` (PAD 0 after the sentence), `y`
    the next ids (EOS after the last word)."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    sizes: list[int] = []
    while sum(sizes) < examples:
        n = max(1, int(rng.lognormal(np.log(MEAN_TEST_CLIENT) - sigma ** 2 / 2, sigma)))
        sizes.append(min(n, examples - sum(sizes)))
    lengths = rng.integers(1, SEQ_LEN, size=examples)  # words per sentence
    words = rng.integers(3, VOCAB + 4, size=(examples, SEQ_LEN)).astype(np.int32)
    x = np.zeros((examples, SEQ_LEN), np.int32)
    y = np.zeros((examples, SEQ_LEN), np.int32)
    for i, n in enumerate(lengths):
        x[i, 0] = 1
        x[i, 1:n + 1] = words[i, :n]
        y[i, :n] = words[i, :n]
        y[i, n] = 2
    return x, y, np.asarray(sizes, np.int64)


def ours(x, y, sizes, sample, repeats: int, batch_size: int) -> dict:
    """Times `metric_totals` on every client and on `sample`."""
    import jax

    from fedjax_api.dataset import ClientSubset
    from fedjax_core import evaluate
    from fedjax_core.data import InMemoryFederatedData
    from fedjax_core.models.stackoverflow_lstm import stackoverflow_lstm

    starts = np.concatenate([[0], np.cumsum(sizes)])
    data = InMemoryFederatedData({
        f"c{i:06d}": {"x": x[starts[i]:starts[i + 1]], "y": y[starts[i]:starts[i + 1]]}
        for i in range(len(sizes))})
    model = stackoverflow_lstm(vocab_size=VOCAB, expected_length=13.3)
    params = jax.jit(model.init)(jax.random.key(0))
    out: dict = {"jax": jax.__version__, "backend": jax.default_backend()}
    for name, d in (("full", data), ("sampled", ClientSubset(data, sample))):
        n = int(np.sum(d.client_sizes))
        times, metrics = [], {}
        for _ in range(1 + repeats):
            t = time.perf_counter()
            metrics = evaluate.global_metrics(evaluate.metric_totals(model, params, d,
                                                                     batch_size), d)
            times.append(time.perf_counter() - t)
        out[name] = {"examples": n, "first_s": times[0], "times_s": times[1:],
                     "median_s": statistics.median(times[1:]),
                     "examples_per_s": n / statistics.median(times[1:]),
                     "metrics": {k: metrics[k] for k in ("accuracy_no_eos", "token_loss")
                                 if k in metrics}}
    return out


def fedjax(python: str, x, y, sizes, sample, repeats: int, batch_size: int) -> dict | None:
    """Times FedJAX's `evaluate_model` in its venv on the same clients (None without it)."""
    if not Path(python).exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clients.npz")
        np.savez(path, x=x, y=y, sizes=sizes, sample=sample)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        done = subprocess.run([python, "-W", "ignore", str(FEDJAX_SCRIPT), path, "--repeats",
                               str(repeats), "--batch-size", str(batch_size)],
                              capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"FedJAX's side failed:\n{done.stderr[-3000:]}")
    return json.loads(str(done.stdout).strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Evaluation throughput of the Stack Overflow LSTM.")
    ap.add_argument("--examples", type=int, default=10_000)
    ap.add_argument("--sample-clients", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fedjax-python", default="/work/fedjax-venv/bin/python")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                         "eval_throughput.json"))
    args = ap.parse_args(argv)

    from benchmarks import measure
    from fedjax_api.callbacks import TEST_SAMPLE_STREAM

    x, y, sizes = make_clients(args.examples, args.seed)
    rng = np.random.default_rng([args.seed, TEST_SAMPLE_STREAM])  # as FederatedDataset.subset
    sample = np.sort(rng.choice(len(sizes), args.sample_clients, replace=False))
    theirs = fedjax(args.fedjax_python, x, y, sizes, sample, args.repeats, args.batch_size)
    mine = ours(x, y, sizes, sample, args.repeats, args.batch_size)
    result = {
        "benchmark": "eval_throughput",
        "description": "Stack Overflow LSTM evaluation, examples/s: fedjax-sim's "
                       "metric_totals against FedJAX 0.0.17's evaluate_model",
        "options": vars(args),
        "data": {"clients": len(sizes), "examples": int(sizes.sum()),
                 "sample_clients": len(sample), "sample_examples": int(sizes[sample].sum()),
                 "sizes": measure.size_summary(sizes)},
        "machine": measure.machine_info(),
        "fedjax_sim": mine,
        "fedjax_0.0.17": theirs,
    }
    if theirs is not None:
        result["speedup"] = {k: mine[k]["examples_per_s"] / theirs[k]["examples_per_s"]
                             for k in ("full", "sampled")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for k in ("full", "sampled"):
        line = f"{k}: fedjax-sim {mine[k]['examples_per_s']:.0f} examples/s " \
               f"({mine[k]['examples']} examples, median {mine[k]['median_s']:.2f} s)"
        if theirs is not None:
            line += f"; FedJAX 0.0.17 {theirs[k]['examples_per_s']:.0f} examples/s " \
                    f"(median {theirs[k]['median_s']:.2f} s)"
        print(line, flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
