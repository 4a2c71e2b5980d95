"""Compiled temporaries of one round of every registered algorithm, against FedAvg's.

For each algorithm, model (FedJAX's EMNIST CNN, 1,206,590 params; an MLP 60 -> 32 -> 10)
and cohort size (8, 128, 1,000 clients of 5 steps at batch 20), the round is lowered
and compiled from abstract inputs (nothing is run, no cohort is allocated), and
`memory_analysis().temp_size_in_bytes` is read: the scratch memory the round needs
besides its arguments and outputs. Per-client store rows are set aside: the round's loop
over chunks carries the store table, of which XLA keeps one working copy (the state is
not donated), so the ratio uses the temporaries minus the store's size; both are
recorded. Each figure is reported with its ratio to FedAvg's at the
same model and cohort size. With the weighted mean every algorithm streams its deltas
through the round skeleton, so the ratio should stay near 1 at every cohort size.

    python -m benchmarks.algorithm_memory                     # every algorithm, both models
    python -m benchmarks.algorithm_memory --models mlp --cohorts 8 128   # quick

Per-client rows are written inside the loop over chunks (`--stacked-rows-bytes 0`), the
path `parallel.run_clients` takes when a cohort's new rows exceed
`parallel.STACKED_ROWS_BYTES` (256 MiB); below it they are stacked, which is faster.

Writes benchmarks/results/algorithm_memory.json. Never part of the tests.
"""

import argparse
import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used, as jax is
    from fedjax_core.data.pack import Cohort

RESULTS = Path(__file__).parent / "results"
FACTS = {"num_domains": 2, "client_learning_rate": 0.1}
STEPS, BATCH = 5, 20


def model_and_batch(name: str):
    """The model and one example's features `{name: (shape, dtype)}`."""
    import numpy as np

    from fedjax_core.models.emnist_cnn import emnist_cnn
    from fedjax_core.models.linear import mlp

    if name == "cnn":
        return emnist_cnn(), {"x": ((28, 28, 1), np.float32), "y": ((), np.int32),
                              "domain_id": ((), np.int32)}
    return mlp((60,), (32,), num_classes=10), {"x": ((60,), np.float32), "y": ((), np.int32),
                                               "domain_id": ((), np.int32)}


def abstract_cohort(features: dict, clients: int) -> "Cohort":
    """A cohort of `clients` clients of STEPS steps at batch BATCH as shapes only
    (`jax.ShapeDtypeStruct` leaves: nothing is allocated), but for its `client_index`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fedjax_core.data.pack import Cohort

    def zeros() -> Cohort:  # run abstractly by `jax.eval_shape`
        return Cohort(
            batches={k: jnp.zeros((clients, STEPS, BATCH) + s, d)
                     for k, (s, d) in features.items()},
            mask=jnp.zeros((clients, STEPS, BATCH), np.bool_),
            num_examples=jnp.zeros((clients,), np.int32),
            client_index=jnp.zeros((clients,), np.int32))

    shapes: Cohort = jax.eval_shape(zeros)
    return shapes._replace(client_index=np.arange(clients, dtype=np.int32))


def temp_bytes(name: str, model_name: str, clients: int) -> dict:
    import functools

    import jax
    import optax

    from fedjax_core import client_state
    from fedjax_core.algorithms import registry
    from fedjax_core.parallel import Plan

    model, features = model_and_batch(model_name)
    entry = registry.get(name)
    facts = {**FACTS, "num_clients": clients}
    alg = registry.build(name, optax.sgd(0.1), 1.0, **{k: facts[k] for k in entry.needs})
    # The state as `jit_round` would fit it to a first cohort of `clients` new clients,
    # abstractly (per-client stores of a 1,000-client CNN cohort would take gigabytes).
    state = jax.eval_shape(lambda p: client_state.grow(client_state.grow_index(
        alg.init(p), clients), clients), jax.eval_shape(model.init, jax.random.key(0)))
    cohort = abstract_cohort(features, clients)
    round_fn = jax.jit(functools.partial(alg.apply, model=model, plan=Plan()))
    t = time.perf_counter()
    compiled = round_fn.lower(state, cohort, jax.random.key(1)).compile()
    seconds = time.perf_counter() - t
    memory = compiled.memory_analysis()
    if memory is None:
        raise RuntimeError(f"{jax.default_backend()} reports no memory analysis")
    stores = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
        x, client_state.ClientStore)) if isinstance(x, client_state.ClientStore)]
    store_bytes = sum(leaf.size * leaf.dtype.itemsize for s in stores
                      for leaf in jax.tree.leaves(s.rows))
    temp = int(memory.temp_size_in_bytes)
    return {"algorithm": name, "model": model_name, "cohort": clients,
            "temp_bytes": temp, "store_bytes": int(store_bytes),
            # The round's loop carries the store table: without donating the state, XLA
            # holds one working copy of it. The issue sets store rows aside.
            "temp_bytes_store_aside": max(temp - int(store_bytes), 0),
            "argument_bytes": int(memory.argument_size_in_bytes),
            "compile_s": seconds}


def main(argv=None) -> None:
    from fedjax_core.algorithms import registry

    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--cohorts", nargs="+", type=int, default=[8, 128, 1000])
    parser.add_argument("--algorithms", nargs="+", default=sorted(registry.ALGORITHMS))
    parser.add_argument("--out", type=Path, default=RESULTS / "algorithm_memory.json")
    parser.add_argument("--stacked-rows-bytes", type=int, default=0,
                        help="parallel.STACKED_ROWS_BYTES for the run; 0 (the default here) "
                             "writes per-client rows inside the loop over chunks, the path "
                             "whose memory does not grow with the cohort")
    args = parser.parse_args(argv)
    from fedjax_core import parallel
    parallel.STACKED_ROWS_BYTES = args.stacked_rows_bytes
    rows = []
    for model_name in args.models:
        for clients in args.cohorts:
            base = None
            for name in ["fedavg"] + [a for a in args.algorithms if a != "fedavg"]:
                row = temp_bytes(name, model_name, clients)
                base = base or row["temp_bytes_store_aside"]
                row["ratio_to_fedavg"] = row["temp_bytes_store_aside"] / max(base, 1)
                rows.append(row)
                print(f"{model_name:4s} cohort {clients:5d} {name:16s} "
                      f"{row['temp_bytes_store_aside'] / 2**20:10.1f} MiB  "
                      f"(store {row['store_bytes'] / 2**20:.0f} MiB)  x{row['ratio_to_fedavg']:.2f}  "
                      f"(compile {row['compile_s']:.1f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                    "steps": STEPS, "batch": BATCH, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
