"""Recorded outputs of every algorithm: which runs are recorded, and the one harness that runs them.

`tests/fixtures/algorithm_outputs.npz` holds, for each `Entry`, the final server state's
leaves and every round's metrics, written by `tests/fixtures/make_algorithm_outputs.py`
before the round-skeleton refactor; `test_recorded_outputs.py` reruns every entry and
compares. Only `run_recorded` knows how a round is driven from the host (the per-client
state rows, the cohort's slots): a refactor that changes that rewrites `run_recorded`
alone, never the recording.

Keys of the file:
  `<entry>/state/<keypath>`        a leaf of the final state (`jax.tree_util.keystr`);
                                   PRNG keys as their `key_data`.
  `<entry>/metrics/<round>/<name>` a round's metric, e.g. `fedavg.s0.c1/metrics/2/train/loss`.
"""

import pathlib
import re
from typing import NamedTuple

import jax
import numpy as np

from fedjax_core import parallel
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.algorithms import registry
from fedjax_core.algorithms.base import jit_round
from fedjax_core.data import pack_cohort
from tests.fedjax_core.algorithms.test_conformance import (
    AGGREGATOR_OPTIONS,
    COHORTS,
    DATA,
    build,
)
from tests.fedjax_core.helpers import tiny_softmax_model

FIXTURE = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "algorithm_outputs.npz"
SEEDS = (0, 1)
MESH_DEVICES = 2
MESH_AGGREGATORS = ("coordinate_median", "top_k")
"""Aggregators recorded under a mesh: both stack the clients' deltas; `top_k` also keeps a
per-client error-feedback store inside the aggregator state."""
MESH_ALGORITHMS = ("scaffold",)
"""Algorithms recorded under a mesh: SCAFFOLD keeps per-client control variates."""


class Entry(NamedTuple):
    """One recorded run: `algorithm` (registry name) with `aggregator` (registry name, None:
    the algorithm's default), from `seed`, under `Plan(chunk_size, mesh of devices)`
    (`devices = 1`: no mesh)."""

    algorithm: str
    aggregator: str | None = None
    seed: int = 0
    chunk_size: int = 1
    devices: int = 1

    @property
    def name(self) -> str:
        """E.g. `fedavg.s0.c1`, `fedavg+top_k.s0.c1.d2`: no `/`, which separates keys."""
        agg = f"+{self.aggregator}" if self.aggregator else ""
        mesh = f".d{self.devices}" if self.devices > 1 else ""
        return f"{self.algorithm}{agg}.s{self.seed}.c{self.chunk_size}{mesh}"


_NAME = re.compile(r"(?P<alg>[a-z0-9_]+)(\+(?P<agg>[a-z0-9_]+))?\.s(?P<seed>\d+)"
                   r"\.c(?P<chunk>\d+)(\.d(?P<devices>\d+))?")


def parse(name: str) -> Entry:
    """The `Entry` whose `name` is `name`."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"not a recorded entry name: {name!r}")
    return Entry(m["alg"], m["agg"], int(m["seed"]), int(m["chunk"]), int(m["devices"] or 1))


def entries() -> list[Entry]:
    """Every recorded run: each algorithm on seeds 0 and 1 with chunk size 1 and on seed 0
    with chunk size 3; FedAvg with each aggregator; a few runs over a 2-device mesh."""
    out = []
    for alg in sorted(registry.ALGORITHMS):
        out += [Entry(alg, seed=s) for s in SEEDS] + [Entry(alg, chunk_size=3)]
    out += [Entry("fedavg", agg) for agg in sorted(aggregators.AGGREGATORS)]
    out += [Entry("fedavg", agg, devices=MESH_DEVICES) for agg in MESH_AGGREGATORS]
    out += [Entry(alg, devices=MESH_DEVICES) for alg in MESH_ALGORITHMS]
    return out


def make(entry: Entry):
    """`(algorithm, model, seed, plan)` of `entry`, as `test_conformance.build` builds them."""
    aggregator = None
    if entry.aggregator is not None:
        aggregator = aggregators.build(entry.aggregator,
                                       **AGGREGATOR_OPTIONS.get(entry.aggregator, {}))
    mesh = parallel.client_mesh(entry.devices) if entry.devices > 1 else None
    return (build(entry.algorithm, aggregator), tiny_softmax_model(), entry.seed,
            parallel.Plan(entry.chunk_size, mesh))


def run_recorded(alg, model, seed: int, plan: parallel.Plan):
    """Three rounds of `alg` on test_conformance's DATA and COHORTS.

    The model starts from `model.init(key(seed))`; round r packs its cohort with `seed`
    and runs under the key `fold_in(key(seed + 100), r)`. THE ONLY place that drives a
    round from the host: the round-skeleton refactor changed only this function (the
    per-client index moved into the state; `jit_round` fits the stores).

    Returns:
      `(final_state, [metrics of round 0, 1, 2])`.
    """
    step = jit_round(alg, model, plan)
    state = alg.init(model.init(jax.random.key(seed)))
    if plan.mesh is not None:
        state = parallel.replicate(state, plan)
    metrics = []
    for r, clients in enumerate(COHORTS):
        cohort = pack_cohort(DATA, clients, batch_size=2, epochs=1, seed=seed, round_num=r,
                             steps=6)
        state, m = step(state, cohort, jax.random.fold_in(jax.random.key(seed + 100), r))
        metrics.append(m)
    return state, metrics


def host(x) -> np.ndarray:
    """A leaf as a numpy array; a PRNG key as its `key_data`."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def record(name: str, state, metrics) -> dict[str, np.ndarray]:
    """The file's arrays for entry `name`: `{"<name>/state/<keypath>": leaf,
    "<name>/metrics/<round>/<metric>": value}`."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        out[f"{name}/state/{jax.tree_util.keystr(path)}"] = host(leaf)
    for r, m in enumerate(metrics):
        for k, v in m.items():
            out[f"{name}/metrics/{r}/{k}"] = host(v)
    return out


def run_entry(entry: Entry) -> dict[str, np.ndarray]:
    """`entry` run now, as the file records it."""
    state, metrics = run_recorded(*make(entry))
    return record(entry.name, state, metrics)


def load(path=FIXTURE) -> dict[str, dict[str, np.ndarray]]:
    """The recording: `{entry name: {key without the entry's prefix: array}}`."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as f:
        for key in f.files:
            name, rest = key.split("/", 1)
            out.setdefault(name, {})[rest] = f[key]
    return out

