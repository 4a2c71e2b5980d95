"""Robust aggregators: hand-computed values, padding, attackers, jit, and inside FedAvg."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core.aggregate import registry, robust
from fedjax_core.aggregate.mean import mean
from fedjax_core.aggregate.robust import (
    coordinate_median,
    krum,
    norm_bounding,
    trimmed_mean,
)
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.data import pack_cohort
from tests.fedjax_core.helpers import (
    plain_local_train,
    tiny_softmax_model,
    unequal_clients,
)

KEY = jax.random.key(0)
GARBAGE = 1e6  # values of padding clients: any leak shows


def run(agg, deltas, weights, jit=True):
    apply = jax.jit(agg.apply) if jit else agg.apply
    out, _, metrics = apply(deltas, jnp.asarray(weights, jnp.float32), agg.init(None), KEY, None)
    return jax.tree.map(np.asarray, out), {k: float(v) for k, v in metrics.items()}


def five_clients():
    """5 real clients x 3 coordinates as {"w": [., 2], "b": [.]}, padding in slot 2.

    Real clients (w0, w1, b): c0 (1, 2, 0.5), c1 (2, 0, 1), c2 (7, 1, 3), c3 (4, 3, 2),
    c4 (10, -4, -8).
    """
    w = np.array([[1, 2], [2, 0], [GARBAGE, -GARBAGE], [7, 1], [4, 3], [10, -4]], np.float32)
    b = np.array([0.5, 1.0, GARBAGE, 3.0, 2.0, -8.0], np.float32)
    weights = np.array([3, 1, 0, 2, 5, 1], np.float32)
    return {"w": jnp.asarray(w), "b": jnp.asarray(b)}, weights


def assert_tree(out, w, b, atol=1e-6):
    np.testing.assert_allclose(out["w"], w, atol=atol, rtol=1e-6)
    np.testing.assert_allclose(out["b"], b, atol=atol, rtol=1e-6)


# ----------------------------------------------------------------------------- hand-computed

def test_median_odd_and_even_counts_ignore_padding():
    deltas, weights = five_clients()
    out, metrics = run(coordinate_median(), deltas, weights)
    # w0: 1 2 4 7 10 -> 4; w1: -4 0 1 2 3 -> 1; b: -8 .5 1 2 3 -> 1
    assert_tree(out, [4, 1], 1.0)
    assert metrics["aggregate/num_clients"] == 5
    weights[5] = 0  # drop c4: 4 real clients, mean of the two middle values
    out, metrics = run(coordinate_median(), deltas, weights)
    # w0: 1 2 4 7 -> 3; w1: 0 1 2 3 -> 1.5; b: .5 1 2 3 -> 1.5
    assert_tree(out, [3, 1.5], 1.5)
    assert metrics["aggregate/num_clients"] == 4


def test_trimmed_mean_hand_values():
    deltas, weights = five_clients()
    out, metrics = run(trimmed_mean(0.2), deltas, weights)  # floor(0.2 * 5) = 1 per side
    # w0: (2 + 4 + 7) / 3; w1: (0 + 1 + 2) / 3; b: (.5 + 1 + 2) / 3
    assert_tree(out, [13 / 3, 1.0], 3.5 / 3)
    assert metrics["aggregate/num_trimmed"] == 2
    out, metrics = run(trimmed_mean(0.1), deltas, weights)  # floor(0.5) = 0: unweighted mean
    assert_tree(out, [24 / 5, 2 / 5], -1.5 / 5)
    assert metrics["aggregate/num_trimmed"] == 0
    weights[5] = 0  # 4 real clients, floor(0.25 * 4) = 1 per side
    out, _ = run(trimmed_mean(0.25), deltas, weights)
    # w0: 1 2 4 7 -> 3; w1: 0 1 2 3 -> 1.5; b: .5 1 2 3 -> 1.5
    assert_tree(out, [3, 1.5], 1.5)


def krum_points():
    """Slot 0 is padding, a copy of c1 (if it counted, c1 would score 0 + 1 and win), then
    c0..c4 = (1,1,1) + (0,0,0), (1,0,0), (0,2,0), (0,0,3), (10,10,10) as (w0, w1, b)."""
    pts = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3], [10, 10, 10]],
                   np.float32) + 1.0
    weights = np.array([0, 4, 1, 1, 2, 7], np.float32)
    return {"w": jnp.asarray(pts[:, :2]), "b": jnp.asarray(pts[:, 2])}, weights


def test_krum_hand_scores():
    # Squared distances: d01=1 d02=4 d03=9 d04=300 d12=5 d13=10 d14=281 d23=13 d24=264
    # d34=249. f=1, m=5: k=2 nearest. Scores: s0=5, s1=6, s2=9, s3=19, s4=513.
    deltas, weights = krum_points()
    out, metrics = run(krum(num_byzantine=1), deltas, weights)
    assert_tree(out, [1, 1], 1)                                   # c0
    assert metrics["aggregate/krum_selected"] == 1                # slot of c0
    assert metrics["aggregate/krum_num_selected"] == 1
    assert metrics["aggregate/krum_degenerate"] == 0
    out, metrics = run(krum(1, multi=3), deltas, weights)        # c0, c1, c2
    assert_tree(out, [4 / 3, 5 / 3], 1)
    out, metrics = run(krum(1, multi=None), deltas, weights)     # m - f = 4: c0..c3
    assert_tree(out, [5 / 4, 6 / 4], 7 / 4)
    assert metrics["aggregate/krum_num_selected"] == 4
    out, _ = run(krum(1, multi=50), deltas, weights)             # clipped to m: plain mean
    assert_tree(out, [11 / 5 + 1, 12 / 5 + 1], 13 / 5 + 1, atol=1e-5)


def test_krum_rejects_too_small_cohorts_and_degrades_on_few_real_clients():
    deltas, weights = krum_points()
    with pytest.raises(ValueError, match="at least 7 clients"):
        run(krum(num_byzantine=4), deltas, weights)               # 6 slots: 6 - 4 - 2 < 1
    run(krum(num_byzantine=3), deltas, weights)                   # 6 - 3 - 2 = 1: fine
    with pytest.raises(ValueError):
        krum(num_byzantine=-1)
    with pytest.raises(ValueError):
        krum(multi=0)
    # 3 real clients with f = 2: k = -1 -> each client's nearest neighbour.
    # (10,10,10), (0,0,0), (1,0,0): s = 281, 1, 1 -> slot 2.
    pts = np.array([[1, 0, 0], [10, 10, 10], [0, 0, 0], [1, 0, 0], [5, 5, 5], [5, 5, 5]],
                   np.float32)
    deltas = {"w": jnp.asarray(pts[:, :2]), "b": jnp.asarray(pts[:, 2])}
    weights = np.array([0, 1, 1, 1, 0, 0], np.float32)
    out, metrics = run(krum(num_byzantine=2), deltas, weights)
    assert_tree(out, [0, 0], 0)
    assert metrics["aggregate/krum_selected"] == 2
    assert metrics["aggregate/krum_degenerate"] == 1
    weights[2:] = 0                                               # a lone client: itself
    out, metrics = run(krum(num_byzantine=2), deltas, weights)
    assert_tree(out, [10, 10], 10)
    assert metrics["aggregate/krum_selected"] == 1


def test_norm_bounding_hand_values():
    deltas = {"w": jnp.array([[3.0, 0.0], [0.3, 0.0], [GARBAGE, 0.0]]),
              "b": jnp.array([4.0, 0.4, GARBAGE])}       # norms 5, 0.5, huge (padding)
    weights = np.array([1, 3, 0], np.float32)
    out, metrics = run(norm_bounding(1.0), deltas, weights)
    # c0 -> (0.6, 0, 0.8); c1 unchanged; weighted mean with weights 1, 3.
    assert_tree(out, [(0.6 + 0.9) / 4, 0.0], (0.8 + 1.2) / 4)
    assert metrics["aggregate/num_clipped"] == 1
    assert metrics["aggregate/mean_client_norm"] == pytest.approx(2.75)
    out, _ = run(norm_bounding(1.0, inner=coordinate_median()), deltas, weights)
    assert_tree(out, [0.45, 0.0], 0.6)
    out, _ = run(norm_bounding(100.0), deltas, weights)            # nothing clipped: the mean
    ref, _ = run(mean(), deltas, weights)
    assert_tree(out, ref["w"], ref["b"])
    with pytest.raises(ValueError):
        norm_bounding(0.0)


@pytest.mark.parametrize("agg", [coordinate_median(), trimmed_mean(0.2), krum(1),
                                 krum(1, None), norm_bounding(1.0)])
def test_no_real_client_gives_zeros(agg):
    deltas, weights = krum_points()
    out, _ = run(agg, deltas, np.zeros_like(weights))
    assert_tree(out, [0, 0], 0)


# ----------------------------------------------------------------------------- under attack

def test_robust_rules_resist_a_large_sign_flipped_client():
    """4 honest clients near (1, 1, 1), one sends -100 x (1, 1, 1)."""
    w = np.array([[1.0, 1.1], [0.9, 1.0], [1.1, 0.9], [1.0, 1.0], [-100, -100]], np.float32)
    b = np.array([1.0, 1.1, 0.9, 1.0, -100], np.float32)
    deltas, weights = {"w": jnp.asarray(w), "b": jnp.asarray(b)}, np.ones(5, np.float32)
    out, _ = run(mean(), deltas, weights)
    assert_tree(out, [-19.2, -19.2], -19.2, atol=1e-5)            # (4 - 100) / 5
    out, _ = run(coordinate_median(), deltas, weights)
    assert_tree(out, [1.0, 1.0], 1.0)
    out, _ = run(trimmed_mean(0.2), deltas, weights)              # drops -100 and 1.1
    assert_tree(out, [2.9 / 3, 2.9 / 3], 2.9 / 3)
    # Honest distances: d03=.01 d13=.02 d23=.03 d01=.03 d02=.06 d12=.09, k=2:
    # s3=.03 < s0=.04 < s1=.05 < s2=.09: client 3 = (1, 1, 1).
    out, metrics = run(krum(1), deltas, weights)
    assert_tree(out, [1.0, 1.0], 1.0)
    assert metrics["aggregate/krum_selected"] == 3


# ----------------------------------------------------------------------------- against numpy

def np_median(x):
    return np.median(x, axis=0)


def np_trimmed(beta):
    def f(x):
        m = len(x)
        b = int(np.floor(beta * m + 1e-9))
        return np.sort(x, axis=0)[b:m - b].mean(axis=0)
    return f


def np_krum(f, multi):
    def agg(x):
        m = len(x)
        k = max(m - f - 2, 1)
        scores = []
        for i in range(m):
            d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(m) if j != i)
            scores.append(sum(d[:k]))
        order = sorted(range(m), key=lambda i: (scores[i], i))
        count = min(max(m - f if multi is None else multi, 1), m)
        return x[order[:count]].mean(axis=0)
    return agg


def flat_stack(tree):
    """`[clients, coordinates]` from a stacked {"w": [clients, 2, 2], "b": [clients]}."""
    return np.concatenate([np.asarray(tree["w"]).reshape(len(tree["b"]), -1),
                           np.asarray(tree["b"])[:, None]], axis=1)


def flat(tree):
    return np.concatenate([np.asarray(tree["w"]).reshape(-1), np.asarray(tree["b"]).reshape(-1)])


@pytest.mark.parametrize("agg, ref", [
    (coordinate_median(), np_median),
    (trimmed_mean(0.2), np_trimmed(0.2)),
    (trimmed_mean(0.34), np_trimmed(0.34)),
    (krum(1), np_krum(1, 1)),
    (krum(2, multi=2), np_krum(2, 2)),
    (krum(1, multi=None), np_krum(1, None)),
])
def test_matches_numpy_for_every_real_count_under_one_compilation(agg, ref):
    rng = np.random.default_rng(0)
    slots = 7
    deltas = {"w": jnp.asarray(rng.normal(size=(slots, 2, 2)).astype(np.float32)),
              "b": jnp.asarray(rng.normal(size=(slots,)).astype(np.float32))}
    x = flat_stack(deltas)
    traces = []

    def counted(*args):
        traces.append(1)
        return agg.apply(*args)

    apply = jax.jit(counted)
    for real in itertools.chain.from_iterable(
            itertools.combinations(range(slots), r) for r in (1, 2, 3, 4, 6, 7)):
        weights = np.zeros(slots, np.float32)
        weights[list(real)] = rng.integers(1, 9, size=len(real))
        out, _, _ = apply(deltas, jnp.asarray(weights), agg.init(None), KEY, None)
        np.testing.assert_allclose(flat(out), ref(x[list(real)]), atol=1e-5, rtol=1e-5)
    assert len(traces) == 1


@pytest.mark.parametrize("agg", [coordinate_median(), trimmed_mean(0.2), krum(1),
                                 krum(1, None), norm_bounding(1.0)])
def test_jit_and_eager_agree(agg):
    deltas, weights = five_clients()
    a, ma = run(agg, deltas, weights, jit=True)
    b, mb = run(agg, deltas, weights, jit=False)
    assert_tree(a, b["w"], b["b"])
    assert ma == mb


def test_bfloat16_deltas_keep_their_dtype():
    deltas, weights = krum_points()
    deltas = jax.tree.map(lambda x: x.astype(jnp.bfloat16), deltas)
    for agg in (coordinate_median(), trimmed_mean(0.2), krum(1), norm_bounding(1.0)):
        out, _, _ = agg.apply(deltas, jnp.asarray(weights), agg.init(None), KEY, None)
        assert out["w"].dtype == jnp.bfloat16 and out["w"].shape == (2,)


def test_entries_build_with_defaults(monkeypatch):
    names = [e.name for e in robust.ENTRIES]
    assert names == ["coordinate_median", "trimmed_mean", "krum", "multi_krum", "norm_bounding"]
    for e in robust.ENTRIES:
        monkeypatch.setitem(registry.AGGREGATORS, e.name, e)
    deltas, weights = five_clients()
    for e in robust.ENTRIES:
        out, _ = run(e.build(), deltas, weights)
        assert out["w"].shape == (2,)
    out, _ = run(registry.get("norm_bounding").build(max_norm=1e9, inner="coordinate_median"),
                 deltas, weights)
    assert_tree(out, [4, 1], 1.0)
    out, _ = run(registry.get("trimmed_mean").build(beta=0.2), deltas, weights)
    assert_tree(out, [13 / 3, 1.0], 3.5 / 3)


# ----------------------------------------------------------------------------- inside FedAvg

def reference_deltas(model, params, cohort, client_opt):
    """Each client's `w_t - w_i` after local training, one client and step at a time."""
    deltas, weights = [], []
    for c in range(cohort.num_clients):
        w = plain_local_train(model, params, cohort, c, client_opt)
        deltas.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, w))
        weights.append(float(cohort.num_examples[c]))
    return deltas, np.array(weights)


def reference_median(deltas, weights):
    real = [d for d, n in zip(deltas, weights) if n > 0]
    return jax.tree.map(lambda *xs: np.median(np.stack(xs), axis=0), *real)


def reference_trimmed(beta):
    def agg(deltas, weights):
        real = [d for d, n in zip(deltas, weights) if n > 0]
        b = int(beta * len(real))
        return jax.tree.map(lambda *xs: np.sort(np.stack(xs), axis=0)[b:len(xs) - b].mean(0), *real)
    return agg


def reference_krum(f):
    def agg(deltas, weights):
        real = [d for d, n in zip(deltas, weights) if n > 0]
        m, k = len(real), len(real) - f - 2
        sq = lambda a, b: sum(float(np.sum((x - y) ** 2))  # noqa: E731
                              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        scores = [sum(sorted(sq(real[i], real[j]) for j in range(m) if j != i)[:k])
                  for i in range(m)]
        return real[int(np.argmin(scores))]
    return agg


def reference_norm_bounding(max_norm):
    def agg(deltas, weights):
        clipped = []
        for d in deltas:
            norm = np.sqrt(sum(float(np.sum(x ** 2)) for x in jax.tree.leaves(d)))
            clipped.append(jax.tree.map(lambda x: x * min(1.0, max_norm / max(norm, 1e-12)), d))
        return jax.tree.map(lambda *xs: sum(n * x for n, x in zip(weights, xs)) / weights.sum(),
                            *clipped)
    return agg


@pytest.mark.parametrize("agg, ref", [
    (coordinate_median(), reference_median),
    (trimmed_mean(0.2), reference_trimmed(0.2)),
    (krum(1), reference_krum(1)),
    (norm_bounding(0.05), reference_norm_bounding(0.05)),
])
def test_one_fedavg_round_matches_python(agg, ref):
    model = tiny_softmax_model()
    data = unequal_clients(sizes=(5, 2, 0, 9, 1, 4))      # client 2 is empty: weight 0
    client_opt = optax.sgd(0.3)
    alg = fedavg(client_opt, optax.sgd(1.0), aggregator=agg)
    params = model.init(jax.random.key(1))
    cohort = pack_cohort(data, [3, 2, 0, 5, 1, 4], batch_size=2, epochs=2, seed=3, round_num=0)
    state, metrics = jit_round(alg, model)(alg.init(params), cohort, jax.random.key(7))
    deltas, weights = reference_deltas(model, params, cohort, client_opt)
    expected = jax.tree.map(lambda p, d: np.asarray(p) - d, params, ref(deltas, weights))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 state.params, expected)
    assert any(k.startswith("aggregate/") for k in metrics)
