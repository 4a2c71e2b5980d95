"""Peak memory of SCAFFOLD rounds with a per-client store, with and without donating the
state to the round (`jit_round(..., donate_state=True)`).

Each variant runs in its own process (peak RSS is a process's lifetime maximum): an MLP
16 -> 256 -> 64 (21k params), 2,000 clients of 4 examples, 100 a round, for 25 rounds, so
that the store of control variates grows to 2,048 rows (about 175 MB). Reported: the
compiled round's `memory_analysis` (arguments, outputs, temporaries, and the bytes of
outputs aliased to donated arguments), the store's bytes, and the process's peak RSS.

Usage: python -m benchmarks.round_memory [--out benchmarks/results/round_memory.json]
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

CLIENTS, COHORT, ROUNDS = 2000, 100, 25


def measure(donate: bool) -> dict:
    """One variant, in this process."""
    import jax
    import numpy as np

    from fedjax_core import client_state
    from fedjax_core.algorithms.base import jit_round
    from fedjax_core.algorithms.scaffold import scaffold
    from fedjax_core.data import InMemoryFederatedData, pack_cohort
    from fedjax_core.models.linear import mlp
    from fedjax_core.parallel import Plan

    model = mlp((16,), (256,), num_classes=64)
    rng = np.random.default_rng(0)
    data = InMemoryFederatedData({
        f"c{i:05d}": {"x": rng.normal(size=(4, 16)).astype(np.float32),
                      "y": rng.integers(0, 64, size=4).astype(np.int32)} for i in range(CLIENTS)})
    alg = scaffold(0.1, 1.0, num_clients=CLIENTS)
    step = jit_round(alg, model, Plan(4), donate_state=donate)
    state = alg.init(model.init(jax.random.key(0)))
    analysis = None
    for r in range(ROUNDS):
        idx = list(range((r * COHORT) % CLIENTS, (r * COHORT) % CLIENTS + COHORT))
        cohort = pack_cohort(data, idx, batch_size=4, epochs=1, seed=0, round_num=r)
        if r == ROUNDS - 1:
            analysis = step.lower(state, cohort, jax.random.key(r)).compile().memory_analysis()
        state, metrics = step(state, cohort, jax.random.key(r))
        float(metrics["train/loss"])
    stores = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
        x, client_state.ClientStore)) if isinstance(s, client_state.ClientStore)]
    store_bytes = sum(x.nbytes for s in stores for x in jax.tree.leaves(s))
    a = analysis
    assert a is not None  # XLA:CPU and GPU both report it
    return {"donate_state": donate, "store_mb": store_bytes / 2**20,
            "argument_mb": a.argument_size_in_bytes / 2**20,
            "output_mb": a.output_size_in_bytes / 2**20,
            "alias_mb": a.alias_size_in_bytes / 2**20,
            "temp_mb": a.temp_size_in_bytes / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    p.add_argument("--out", default="benchmarks/results/round_memory.json")
    p.add_argument("--variant", choices=["keep", "donate"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant == "donate")))
        return
    rows = []
    for variant in ("keep", "donate"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.round_memory", "--variant",
                              variant], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    Path(args.out).write_text(json.dumps({"clients": CLIENTS, "cohort": COHORT,
                                          "rounds": ROUNDS, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
