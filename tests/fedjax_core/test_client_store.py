"""Host and disk client stores against the device store: the same numbers, round after round."""

import jax
import numpy as np
import pytest

from fedjax_core import client_store
from fedjax_core.aggregate.attacks import attack
from fedjax_core.aggregate.compression import top_k
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.ditto import ditto
from fedjax_core.algorithms.feddyn import feddyn
from fedjax_core.algorithms.scaffold import scaffold
from fedjax_core.client_store import StoreSpec
from fedjax_core.data import pack_cohort
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients

SIZES = (5, 2, 9, 1, 4, 3, 6, 2)
# Repeated clients across rounds, a client twice in one cohort (round 1), and a cohort
# of new clients only (round 3): rows are gathered, patched from the previous round,
# and written back.
COHORTS = [[0, 1, 2], [2, 3, 2], [1, 4, 5], [6, 7, 3], [0, 2, 6]]


def algorithms():
    n = len(SIZES)
    return {
        "scaffold": scaffold(0.1, 1.0, num_clients=n),
        "scaffold_topk": scaffold(0.1, 1.0, num_clients=n,
                                  aggregator=top_k(fraction=0.3, error_feedback=True)),
        "feddyn_attack": feddyn(0.1, 1.0, num_clients=n,
                                aggregator=attack("mean", fraction=0.5, persistent=True)),
        "ditto": ditto(0.1, 1.0, lam=0.5),
    }


MODEL = tiny_softmax_model()
_STEPS: dict = {}


def built(name):
    """`(algorithm, jitted round)` of `name`, built once: every backend's run shares the
    compiled round (host and disk runs have the same cohort-sized shapes)."""
    if name not in _STEPS:
        alg = algorithms()[name]
        _STEPS[name] = (alg, jit_round(alg, MODEL))
    return _STEPS[name]


def run(name, spec, rounds=len(COHORTS), directory=None):
    alg, step = built(name)
    data = unequal_clients(SIZES)
    params = MODEL.init(jax.random.key(0))
    if directory is not None:
        spec = spec._replace(directory=directory)
    state = client_store.attach(alg.init(params), spec)
    for r in range(rounds):
        cohort = pack_cohort(data, COHORTS[r], batch_size=2, epochs=1, seed=1, round_num=r,
                             steps=5)  # one shape: one compile per algorithm
        state, _ = step(state, cohort, jax.random.key(r))
    return state


_DEVICE: dict = {}


def device_run(name):
    """The device store's run of `name` (computed once per test session)."""
    if name not in _DEVICE:
        _DEVICE[name] = run(name, StoreSpec("device"))
    return _DEVICE[name]


def store_rows(state):
    """Every store's rows of the clients seen, in population row order, as numpy."""
    index = client_store.host_index(state)
    if index is None:
        size = int(state.index.size)
        return [jax.tree.map(lambda t: np.asarray(t[:size]), s.rows)
                for s in client_store._stores(state)]
    index.host.view(index.version)
    return index.host.read(np.arange(index.host.size))


@pytest.mark.parametrize("name,backend", [
    ("scaffold", "host"), ("scaffold", "disk"), ("scaffold_topk", "disk"), ("ditto", "host")])
def test_backend_equals_device(name, backend, tmp_path):
    want = device_run(name)
    got = run(name, StoreSpec(backend), directory=tmp_path / "store")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 want.params, got.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 store_rows(want), store_rows(got))
    # 8 distinct clients seen; the index maps each position to the device store's row.
    host = client_store.host_index(got).host
    assert host.size == int(want.index.size) == 8
    version = client_store.host_index(got).version
    np.testing.assert_array_equal(host.rows_of(np.arange(8), version),
                                  np.asarray(want.index.row_of)[:8])


def test_feddyn_persistent_attackers_equal_device(tmp_path):
    """FedDyn's rows and the persistent attackers' flags (drawn keyed by the population
    row) on disk equal the device store's."""
    want = device_run("feddyn_attack")
    got = run("feddyn_attack", StoreSpec("disk"), directory=tmp_path / "s")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 (want.params, store_rows(want)), (got.params, store_rows(got)))
    flags = store_rows(got)[0]   # the aggregator's store comes first
    assert flags["assigned"].all() and 0 < flags["malicious"].sum() < 8


def test_bf16_rows_error_is_small():
    """bf16 rows: SCAFFOLD's params stay within 1e-2 of the float32 store's (measured
    ~1e-4 here; docs/scaling.md), and the rows are exactly bfloat16-representable."""
    want = run("scaffold", StoreSpec("host"))
    got = run("scaffold", StoreSpec("host", dtype="bf16"))
    err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(want.params), jax.tree.leaves(got.params)))
    assert 0 < err < 1e-2
    rows = store_rows(got)[0]
    for leaf in jax.tree.leaves(rows):
        np.testing.assert_array_equal(leaf, leaf.astype(jax.numpy.bfloat16).astype(np.float32))


def test_stale_state_refused():
    alg, step = built("scaffold")
    data = unequal_clients(SIZES)
    state = client_store.attach(alg.init(MODEL.init(jax.random.key(0))), StoreSpec("host"))
    cohort = pack_cohort(data, [0, 1, 2], batch_size=2, epochs=1, seed=1, round_num=0, steps=5)
    step(state, cohort, jax.random.key(0))
    with pytest.raises(client_store.StaleStoreError, match="newest state"):
        step(state, cohort, jax.random.key(0))


def test_choose_backend_by_footprint():
    gib = 2**30
    assert client_store.choose_backend(1000, 1 << 20, 16 * gib, 64 * gib).backend == "device"
    host = client_store.choose_backend(342_477, 1 << 20, 16 * gib, 1024 * gib)
    assert host.backend == "host" and "334.5 GiB" in host.reason
    assert client_store.choose_backend(342_477, 16 << 20, 80 * gib, 64 * gib).backend == "disk"
    assert client_store.choose_backend(10, 4, None, None).backend == "disk"


def test_attach_rejects_bad_values():
    with pytest.raises(ValueError, match="choose one of: device, host, disk"):
        client_store.attach({}, StoreSpec("ssd"))
    with pytest.raises(ValueError, match="choose one of: f32, bf16"):
        client_store.attach({}, StoreSpec("host", dtype="fp8"))


def test_file_table_reads_writes_and_grows_without_mapping(tmp_path):
    """A disk table: rows written by index read back exactly; growing keeps them (no
    copy) and new rows read as zeros; out-of-range rows are refused."""
    with open(tmp_path / "t.bin", "w+b") as f:
        t = client_store.FileTable(f.fileno(), 4, (2, 3), np.float32)
        assert t.shape == (4, 2, 3) and t.nbytes == 4 * 24
        a = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
        t[np.array([3, 1])] = a
        np.testing.assert_array_equal(t[np.array([1, 3])], a[::-1])
        np.testing.assert_array_equal(t[0], np.zeros((2, 3), np.float32))
        t.resize(16)
        assert (tmp_path / "t.bin").stat().st_size == 16 * 24
        np.testing.assert_array_equal(t[3], a[0])
        np.testing.assert_array_equal(t[15], np.zeros((2, 3), np.float32))
        t[15] = 7.0
        assert t[15].sum() == 42.0
        with pytest.raises(IndexError):
            t[16]
