"""Speed of google/fedjax 0.0.17's own FedAvg on the Shakespeare LSTM, in FedJAX's own venv.

Started by `benchmarks/shakespeare_vs_fedjax.py` (never imported by fedjax-sim: it needs
FedJAX 0.0.17 and a JAX it runs on, see docs/benchmarks.md "FedJAX 0.0.17 itself"). It uses
FedJAX's own pieces, as `fedjax/experiments/fed_avg/run_fed_avg.py` does for Shakespeare:

  * `fedjax.SQLiteFederatedData` over the plays' training snippets written by the driver
    (feature `snippets`, one bytes row per speech, as FedJAX's Shakespeare files), preprocessed
    by `fedjax.datasets.shakespeare.preprocess_client` (sequences of `--sequence-length`),
  * `fedjax.models.shakespeare.create_lstm_model()` (haiku: embed 8, 2 x LSTM 256, dense 90),
  * `fedjax.algorithms.fed_avg.federated_averaging` with client and server SGD and
    `ShuffleRepeatBatchHParams(batch_size, num_epochs)`, FedJAX's default `jit` backend.

The clients of each round come from `--schedule` (a JSON list of lists of client ids), which
the driver takes from fedjax-sim's sampler, so both frameworks train on the same clients.

Timing: first one untimed priming round on one client of `--batch-size` sequences, which
compiles the client step (`--cache-dir` keeps it for the next run): FedJAX's
`shuffle_repeat_batch` fills a client's last batch from a reshuffle of its examples, so every
batch has `--batch-size` rows and the step one shape. Then a fresh server state, `--warmup`
untimed rounds, and the remaining rounds of the schedule timed. A round's time is
`algorithm.apply` up to `block_until_ready` (FedJAX's batching and shuffling included;
reading the clients from SQLite and preprocessing them before it is `load_s`, not in it).
Per example means per sequence the clients hold (FedJAX computes `steps x batch` rows, the
wrapped-around ones included; ours computes each sequence once per epoch and masks the rest).

Run (as the driver does; `--shims` on jax >= 0.6, see `benchmarks/fedjax_shims.py`):
  /work/fedjax-venv-jax010/bin/python -W ignore benchmarks/fedjax_shakespeare_speed.py \\
      --train plays_train.sqlite --schedule s.json --warmup 1 --shims --json-out out.json
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def round_summary(rows: list[dict]) -> dict:
    """Medians over timed rounds: seconds, examples, ms per example and per SGD step.

    Args:
      rows: one dict per timed round with `s` (seconds), `examples` and `steps`.

    Returns:
      `median_round_s`, `median_examples_per_round`, `median_ms_per_example` (median of each
      round's `1000 s / examples`), `median_ms_per_step`, `total_ms_per_example` (all timed
      seconds over all timed examples), `timed_rounds`.

    Example:
      >>> round_summary([{"s": 1.0, "examples": 100, "steps": 25}])["median_ms_per_example"]
      10.0
    """
    if not rows:
        raise ValueError("no timed rounds; pass more rounds than --warmup")
    return {"timed_rounds": len(rows),
            "median_round_s": statistics.median(r["s"] for r in rows),
            "median_examples_per_round": statistics.median(r["examples"] for r in rows),
            "median_ms_per_example": statistics.median(1e3 * r["s"] / r["examples"] for r in rows),
            "median_ms_per_step": statistics.median(1e3 * r["s"] / r["steps"] for r in rows),
            "total_ms_per_example": 1e3 * sum(r["s"] for r in rows)
                                    / sum(r["examples"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--train", required=True, help="FedJAX SQLite file with `snippets`")
    ap.add_argument("--schedule", required=True, help="JSON list (rounds) of lists of client ids")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds of the schedule first")
    ap.add_argument("--shims", action="store_true",
                    help="put back JAX names FedJAX 0.0.17 needs (benchmarks/fedjax_shims.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--sequence-length", type=int, default=80)
    ap.add_argument("--client-lr", type=float, default=1.0)
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--cache-dir", default="",
                    help="JAX's persistent compilation cache (later runs skip the compiles)")
    ap.add_argument("--json-out", required=True)
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))  # benchmarks.* (stdlib-only at import) from this checkout
    from benchmarks.femnist_accuracy import cpu_model

    shims = []
    if args.shims:
        from benchmarks import fedjax_shims
        shims = fedjax_shims.apply()

    import functools
    import importlib
    from importlib import metadata

    import jax
    import numpy as np

    if args.cache_dir:  # keyed by jax version, backend and program: one folder serves all
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    fedjax = importlib.import_module("fedjax")  # installed only in FedJAX's own venv

    prep = functools.partial(fedjax.datasets.shakespeare.preprocess_client,
                             sequence_length=args.sequence_length)
    train = fedjax.SQLiteFederatedData.new(args.train).preprocess_client(prep)
    with open(args.schedule) as f:
        schedule = [[c.encode() for c in ids] for ids in json.load(f)]
    if args.warmup >= len(schedule):
        ap.error(f"--warmup {args.warmup} leaves none of the schedule's {len(schedule)} rounds "
                 "to time; give more rounds or a smaller --warmup")

    model = fedjax.models.shakespeare.create_lstm_model()
    algorithm = fedjax.algorithms.fed_avg.federated_averaging(
        grad_fn=fedjax.model_grad(model),
        client_optimizer=fedjax.optimizers.sgd(learning_rate=args.client_lr),
        server_optimizer=fedjax.optimizers.sgd(learning_rate=args.server_lr),
        client_batch_hparams=fedjax.ShuffleRepeatBatchHParams(
            batch_size=args.batch_size, num_epochs=args.epochs, seed=args.seed))
    params = model.init(jax.random.PRNGKey(args.seed))
    base = jax.random.PRNGKey(10_000 + args.seed)

    # Priming: the step compiled before any round is timed (one client, one batch).
    first = next(iter(train.get_clients(schedule[0][:1])))[1].all_examples()
    n = args.batch_size
    priming = [(b"priming", fedjax.ClientDataset(
        {k: np.resize(v, (n,) + v.shape[1:]) for k, v in first.items()}),
        jax.random.fold_in(base, 10**6))]
    t = time.perf_counter()
    jax.block_until_ready(algorithm.apply(algorithm.init(params), priming)[0])
    priming_s = time.perf_counter() - t
    print(f"priming (compiles the step): {priming_s:.1f} s", flush=True)

    state = algorithm.init(params)
    rows = []
    for r, ids in enumerate(schedule):
        t = time.perf_counter()
        keys = jax.random.split(jax.random.fold_in(base, r), len(ids))
        clients = [(cid, ds, keys[j]) for j, (cid, ds) in enumerate(train.get_clients(ids))]
        sizes = [len(ds) for _, ds, _ in clients]
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        state, _ = algorithm.apply(state, clients)
        jax.block_until_ready(state)
        s = time.perf_counter() - t
        steps = sum(math.ceil(n * args.epochs / args.batch_size) for n in sizes)
        row = {"round": r, "timed": r >= args.warmup, "s": s, "load_s": load_s,
               "clients": len(ids), "examples": sum(sizes) * args.epochs, "steps": steps,
               "client_sizes": sizes}
        rows.append(row)
        print(f"round {r}{'' if row['timed'] else ' (warm-up)'}: {s:.2f} s, "
              f"{row['examples']} examples, {1e3 * s / row['examples']:.1f} ms per example",
              flush=True)

    out = {"framework": "fedjax-0.0.17", "fedjax": metadata.version("fedjax"),
           "jax": jax.__version__, "jaxlib": metadata.version("jaxlib"),
           "dm_haiku": metadata.version("dm-haiku"), "shims": shims,
           "python_executable": sys.executable,
           "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                       "python": platform.python_version(), "backend": jax.default_backend()},
           "settings": {k: v for k, v in vars(args).items() if k not in ("json_out",)},
           "model": "fedjax.models.shakespeare.create_lstm_model() (embed 8, 2 x LSTM 256, "
                    "dense 90; haiku static_unroll)",
           "warmup": args.warmup, "priming_s": priming_s,
           **round_summary([r for r in rows if r["timed"]]), "rounds": rows}
    Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
