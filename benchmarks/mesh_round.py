"""Seconds per FedAvg round with the cohort split over 1 and over N devices (`Plan(mesh=...)`).

Same process, same cohorts, back to back, alternating the variants round by round so that
machine noise hits both alike. On a CPU the "devices" are XLA:CPU devices sharing the same
cores: expect no speed-up there (the point of the CPU run is that the split costs little
and gives the same numbers); on several GPUs each device trains its share of the clients.

    python -m benchmarks.mesh_round --devices 8 --clients 32 --rounds 10

Writes `benchmarks/results/mesh_round.json`; never part of the tests.
"""

import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--clients", type=int, default=32, help="clients per round")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds per variant")
    ap.add_argument("--chunk-size", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=200, help="MLP hidden width (2 layers)")
    args = ap.parse_args()

    import jax
    try:
        jax.config.update("jax_num_cpu_devices", args.devices)  # before any JAX operation
    except RuntimeError:
        pass
    import optax

    from fedjax_core import parallel
    from fedjax_core.algorithms.fedavg import fedavg
    from fedjax_core.data import pack_cohort, uniform_without_replacement
    from fedjax_core.data.pack import step_bucket
    from fedjax_core.data.synthetic import synthetic
    from fedjax_core.models.linear import mlp

    train, _ = synthetic(1.0, 1.0, num_clients=200, dim=60, classes=10, seed=0)
    model = mlp((60,), (args.hidden, args.hidden), num_classes=10)
    alg = fedavg(optax.sgd(0.05), optax.sgd(1.0))
    # At most 20 local steps of batch 10; every cohort padded to one shape (one compile).
    cohorts = [pack_cohort(train, uniform_without_replacement(200, args.clients, 0, r), 10, 1,
                           seed=0, round_num=r, steps=step_bucket(20), max_steps=20)
               for r in range(args.rounds + 1)]
    params = jax.jit(model.init)(jax.random.key(0))

    variants = {}
    for d in (1, args.devices):
        plan = parallel.Plan(args.chunk_size, None if d == 1 else parallel.client_mesh(d))
        step = parallel.jit_replicated(functools.partial(alg.apply, model=model, plan=plan),
                                       plan)
        state = parallel.replicate(alg.init(params), plan)
        t = time.perf_counter()
        state, m = step(state, cohorts[0], jax.random.key(0))  # compile + first round
        jax.block_until_ready(state)
        variants[d] = {"plan": plan, "step": step, "state": state, "times": [],
                       "first_s": time.perf_counter() - t}
    for r in range(1, args.rounds + 1):
        for d, v in variants.items():
            cohort = cohorts[r]
            if v["plan"].mesh is not None:
                cohort = cohort._replace(**dict(zip(
                    ("batches", "mask", "num_examples"),
                    parallel.shard_clients((cohort.batches, cohort.mask, cohort.num_examples),
                                           v["plan"]))))
            t = time.perf_counter()
            v["state"], m = v["step"](v["state"], cohort, jax.random.fold_in(jax.random.key(0), r))
            jax.block_until_ready(v["state"])
            v["times"].append(time.perf_counter() - t)
            v["loss"] = float(m["train/loss"])
    one, many = variants[1], variants[args.devices]
    diff = max(float(abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(parallel.local_copy(one["state"].params)),
        jax.tree.leaves(parallel.local_copy(many["state"].params))))
    result = {
        "machine": platform.processor() or platform.machine(),
        "backend": jax.default_backend(), "devices": args.devices,
        "clients_per_round": args.clients, "chunk_size": args.chunk_size,
        "steps_per_round": int(cohorts[1].mask.any(-1).sum()),
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "median_s": {str(d): statistics.median(v["times"]) for d, v in variants.items()},
        "first_round_s": {str(d): v["first_s"] for d, v in variants.items()},
        "max_param_diff": diff,
    }
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mesh_round.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
