"""FedAvg on the FEMNIST LEAF sample with google/fedjax 0.0.17 itself (its own venv).

Run by `benchmarks/femnist_accuracy.py`, never imported by this project: it needs FedJAX
0.0.17 and the older JAX it pins (`/work/shared/bench/fedjax-requirements.txt`). It uses
FedJAX's own pieces, as `fedjax/experiments/fed_avg/run_fed_avg.py` does:

  * `fedjax.SQLiteFederatedData` over the files `fedjax data convert` wrote from the LEAF
    JSON, preprocessed as FedJAX's EMNIST (`x = 1 - pixels`, a channel axis),
  * `fedjax.models.emnist.create_conv_model(only_digits=False)`,
  * `fedjax.algorithms.fed_avg.federated_averaging` with client and server SGD and
    `ShuffleRepeatBatchHParams(batch_size, num_epochs)`,
  * `fedjax.training.ModelFullEvaluationFn` on the whole test split.

The clients of each round come from `--schedule` (a JSON list of lists of client ids, one
list per round), which the driver computes with fedjax-sim's sampler for the same seed, so
both frameworks train on the same clients in the same rounds.

Run (as the driver does):
  /work/fedjax-venv/bin/python -W ignore benchmarks/fedjax_femnist_accuracy.py \\
      --train train.sqlite --test test.sqlite --schedule s.json --seed 0 --json-out out.json
"""

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--schedule", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--client-lr", type=float, default=0.1)
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-batch-size", type=int, default=256)
    ap.add_argument("--json-out", required=True)
    args = ap.parse_args()

    import importlib

    import jax
    import numpy as np

    fedjax = importlib.import_module("fedjax")  # installed only in FedJAX's own venv

    def prep(client_id, examples):  # FedJAX's EMNIST preprocessing on the LEAF features
        return {"x": (1.0 - examples["x"][..., None]).astype(np.float32), "y": examples["y"]}

    train = fedjax.SQLiteFederatedData.new(args.train).preprocess_client(prep)
    test = fedjax.SQLiteFederatedData.new(args.test).preprocess_client(prep)
    with open(args.schedule) as f:
        schedule = [[c.encode() for c in ids] for ids in json.load(f)]

    model = fedjax.models.emnist.create_conv_model(only_digits=False)
    algorithm = fedjax.algorithms.fed_avg.federated_averaging(
        grad_fn=fedjax.model_grad(model),
        client_optimizer=fedjax.optimizers.sgd(learning_rate=args.client_lr),
        server_optimizer=fedjax.optimizers.sgd(learning_rate=args.server_lr),
        client_batch_hparams=fedjax.ShuffleRepeatBatchHParams(
            batch_size=args.batch_size, num_epochs=args.epochs, seed=args.seed))
    state = algorithm.init(model.init(jax.random.PRNGKey(args.seed)))
    evaluate = fedjax.training.ModelFullEvaluationFn(
        test, model, fedjax.PaddedBatchHParams(batch_size=args.eval_batch_size))

    rounds = len(schedule)
    history, round_s = [], []

    def record(r):
        m = {k: float(v) for k, v in evaluate(state, r).items()}
        history.append({"round": r, "test/accuracy": m["accuracy"], "test/loss": m["loss"]})
        print(f"round {r}: test accuracy {m['accuracy']:.4f} loss {m['loss']:.4f}", flush=True)

    record(0)
    base = jax.random.PRNGKey(10_000 + args.seed)
    for r in range(rounds):
        ids = schedule[r]
        keys = jax.random.split(jax.random.fold_in(base, r), len(ids))
        clients = [(cid, data, keys[j]) for j, (cid, data) in enumerate(train.get_clients(ids))]
        t = time.perf_counter()
        state, _ = algorithm.apply(state, clients)
        jax.block_until_ready(state)
        round_s.append(time.perf_counter() - t)
        done = r + 1
        if done == rounds or (args.eval_every and done % args.eval_every == 0):
            record(done)

    out = {"framework": "fedjax-0.0.17", "jax": jax.__version__, "seed": args.seed,
           "args": vars(args), "history": history, "round_s": round_s}
    with open(args.json_out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
