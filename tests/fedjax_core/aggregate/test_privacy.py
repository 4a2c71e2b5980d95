"""DP aggregators: clipping by hand, noise scales over many draws, the adaptive clip, local DP,
tree noise, accounting helpers, the registry entries and one FedAvg round each."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core.aggregate import privacy, registry
from fedjax_core.aggregate.privacy import (
    adaptive_gaussian,
    adaptive_noise_multipliers,
    gaussian,
    local,
    tree_ftrl,
    tree_ftrl_rho,
    tree_node_noise,
    tree_noise,
    zcdp_to_dp,
)
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.data import pack_cohort
from fedjax_core.keys import AGGREGATOR as AGGREGATOR_KEY
from tests.fedjax_core.helpers import (
    plain_local_train,
    tiny_softmax_model,
    unequal_clients,
)

KEY = jax.random.key(0)
GARBAGE = 1e6  # values of padding clients: any leak shows
DRAWS = 4000


def three_clients():
    """Real clients with L2 norms 3, 0.5, 4 (L1 norms 3, 0.7, 4) as (w0, w1, b), padding in slot 2.

    c0 = (3, 0, 0), c1 = (0.3, 0, 0.4), c3 = (0, 0, 4); example counts 2, 5, 1.
    """
    w = np.array([[3, 0], [0.3, 0], [GARBAGE, -GARBAGE], [0, 0]], np.float32)
    b = np.array([0, 0.4, GARBAGE, 4], np.float32)
    return {"w": jnp.asarray(w), "b": jnp.asarray(b)}, np.array([2, 5, 0, 1], np.float32)


def flat(tree):
    return np.concatenate([np.asarray(tree["w"], np.float64).reshape(-1),
                           np.asarray(tree["b"], np.float64).reshape(-1)])


def run(agg, deltas, weights, key=KEY, state=None):
    state = agg.init(None) if state is None else state
    out, state, metrics = jax.jit(agg.apply)(deltas, jnp.asarray(weights, jnp.float32),
                                              state, key, None)
    return flat(out), state, {k: float(v) for k, v in metrics.items()}


def draws(agg, deltas, weights, state=None, n=DRAWS):
    """`n` outputs `[n, d]` (float64) and metrics of `agg.apply` under n independent keys."""
    state = agg.init(None) if state is None else state
    keys = jax.random.split(jax.random.key(123), n)
    out, _, metrics = jax.jit(jax.vmap(
        lambda k: agg.apply(deltas, jnp.asarray(weights, jnp.float32), state, k, None)))(keys)
    x = np.concatenate([np.asarray(out["w"], np.float64).reshape(n, -1),
                        np.asarray(out["b"], np.float64).reshape(n, -1)], axis=1)
    return x, {k: np.asarray(v, np.float64) for k, v in metrics.items()}


def assert_noise(noise, std, mean=0.0):
    """Sample std within 5% of `std`, sample mean within 4 standard errors of `mean`."""
    noise = np.asarray(noise, np.float64).reshape(-1)
    assert abs(noise.std() / std - 1) < 0.05, (noise.std(), std)
    assert abs(noise.mean() - mean) < 4 * std / math.sqrt(noise.size), (noise.mean(), mean)


# ----------------------------------------------------------------------------- gaussian

def test_gaussian_clips_sums_and_divides_by_the_fixed_denominator():
    deltas, weights = three_clients()
    # Clipped at C = 1: (1, 0, 0) + (0.3, 0, 0.4) + (0, 0, 1) = (1.3, 0, 1.4); counts ignored.
    out, _, metrics = run(gaussian(1.0, noise_multiplier=0.0), deltas, weights)
    np.testing.assert_allclose(out, np.array([1.3, 0, 1.4]) / 4, rtol=1e-6)  # 4 slots
    assert metrics == pytest.approx({"privacy/clip_norm": 1.0, "privacy/clipped_fraction": 2 / 3,
                                     "privacy/noise_std": 0.0, "privacy/num_clients": 3.0})
    out, _, _ = run(gaussian(1.0, 0.0, expected_clients=10), deltas, weights)
    np.testing.assert_allclose(out, [0.13, 0, 0.14], rtol=1e-6)
    weights[3] = 0                                   # drop c3: the denominator stays 10
    out, _, metrics = run(gaussian(1.0, 0.0, expected_clients=10), deltas, weights)
    np.testing.assert_allclose(out, [0.13, 0, 0.04], rtol=1e-6)
    assert metrics["privacy/clipped_fraction"] == 0.5
    out, _, metrics = run(gaussian(0.5, 0.0, expected_clients=2), deltas, weights)
    np.testing.assert_allclose(out, [0.4, 0, 0.2], rtol=1e-6)   # (0.5 + 0.3, 0, 0.4) / 2
    assert metrics["privacy/clipped_fraction"] == 0.5           # norm 0.5 = C: not clipped
    out, _, _ = run(gaussian(1.0, 0.0, 10), deltas, np.zeros(4))
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("expected, cohort, std_on_mean", [
    (10, None, 2 * 0.5 / 10),          # z C / m
    (10, 1000, 2 * 0.5 / 1000),        # noise of a 1000-client cohort: z C / m_noise
    (None, None, 2 * 0.5 / 4),         # m = the padded size, 4 slots
])
def test_gaussian_noise_std_and_noise_cohort_size(expected, cohort, std_on_mean):
    deltas, weights = three_clients()
    agg = gaussian(0.5, 2.0, expected_clients=expected, noise_cohort_size=cohort)
    x, metrics = draws(agg, deltas, weights)
    m = expected or 4
    clean = np.array([0.5 + 0.3, 0, 0.4 + 0.5]) / m        # clipped at 0.5
    assert_noise(x - clean, std_on_mean)
    np.testing.assert_allclose(metrics["privacy/noise_std"], std_on_mean, rtol=1e-6)
    # Coordinates and keys are independent: no correlation between coordinates 0 and 2.
    assert abs(np.corrcoef(x[:, 0], x[:, 2])[0, 1]) < 4 / math.sqrt(DRAWS)


def test_gaussian_is_reproducible_and_validates():
    deltas, weights = three_clients()
    a, _, _ = run(gaussian(1.0, 1.0), deltas, weights, key=jax.random.key(5))
    b, _, _ = run(gaussian(1.0, 1.0), deltas, weights, key=jax.random.key(5))
    c, _, _ = run(gaussian(1.0, 1.0), deltas, weights, key=jax.random.key(6))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    for bad in ({"clip_norm": 0.0}, {"noise_multiplier": -1.0}, {"expected_clients": 0},
                {"noise_cohort_size": -5}, {"clip_norm": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            gaussian(**bad)
    agg = gaussian(1.0, 1.0)
    with pytest.raises(ValueError, match="PRNG key"):
        agg.apply(deltas, jnp.asarray(weights), agg.init(None), None, None)


# ----------------------------------------------------------------------------- adaptive

def test_adaptive_noise_multipliers_formula_and_errors():
    sd, sb = adaptive_noise_multipliers(1.0, 5.0)
    assert sb == 5.0 and sd == pytest.approx((1.0 - 1 / 100) ** -0.5)
    sd, sb = adaptive_noise_multipliers(2.0, 3.0)
    assert sd == pytest.approx((1 / 4 - 1 / 36) ** -0.5)          # = 2.1213...
    assert 1 / sd ** 2 + 1 / (2 * sb) ** 2 == pytest.approx(1 / 2.0 ** 2)
    assert adaptive_noise_multipliers(1.0, None, expected_clients=100) == \
        adaptive_noise_multipliers(1.0, 5.0)                       # paper default m / 20
    assert adaptive_noise_multipliers(0.0, None) == (0.0, 0.0)
    assert adaptive_noise_multipliers(0.0, 2.0) == (0.0, 2.0)
    with pytest.raises(ValueError, match="clip_count_stddev"):
        adaptive_noise_multipliers(1.0, 0.5)                       # 2 sigma_b = z
    with pytest.raises(ValueError, match="clip_count_stddev"):
        adaptive_noise_multipliers(1.0, 0.0)
    with pytest.raises(ValueError, match="clip_count_stddev"):
        adaptive_gaussian(noise_multiplier=1.0, expected_clients=10)   # sigma_b = 0.5
    adaptive_gaussian(noise_multiplier=1.0, expected_clients=10, noise_cohort_size=100)
    agg = adaptive_gaussian(noise_multiplier=1.0)                  # m from the cohort: at trace
    deltas, weights = three_clients()
    with pytest.raises(ValueError, match="clip_count_stddev"):
        run(agg, deltas, weights)
    for bad in ({"target_quantile": 1.5}, {"initial_clip_norm": 0.0},
                {"clip_learning_rate": -0.1}, {"clip_count_stddev": -1.0}):
        with pytest.raises(ValueError):
            adaptive_gaussian(**bad)


def test_adaptive_geometric_update_by_hand():
    deltas, weights = three_clients()
    agg = adaptive_gaussian(initial_clip_norm=1.0, noise_multiplier=0.0, target_quantile=0.5,
                            clip_learning_rate=0.2, expected_clients=3)
    state = agg.init(None)
    assert float(state.clip_norm) == 1.0
    out, state, metrics = run(agg, deltas, weights, state=state)
    # Norms 3, 0.5, 4 vs C = 1: one unclipped of 3 -> btilde = 1/3.
    np.testing.assert_allclose(out, np.array([1.3, 0, 1.4]) / 3, rtol=1e-6)
    c1 = math.exp(-0.2 * (1 / 3 - 0.5))
    assert float(state.clip_norm) == pytest.approx(c1, rel=1e-6)
    assert metrics["privacy/unclipped_fraction_estimate"] == pytest.approx(1 / 3)
    assert metrics["privacy/clip_norm"] == 1.0
    assert metrics["privacy/clipped_fraction"] == pytest.approx(2 / 3)
    assert metrics["privacy/noise_std"] == 0.0
    # Round 2 clips at c1: (c1, 0, 0) + (0.3, 0, 0.4) + (0, 0, c1); same fraction below.
    out, state, metrics = run(agg, deltas, weights, state=state)
    np.testing.assert_allclose(out, np.array([c1 + 0.3, 0, 0.4 + c1]) / 3, rtol=1e-6)
    assert float(state.clip_norm) == pytest.approx(c1 * c1, rel=1e-6)
    assert metrics["privacy/clip_norm"] == pytest.approx(c1, rel=1e-6)
    # All clients unclipped at C = 5: btilde = 1 -> C <- 5 exp(-0.2 * 0.5).
    _, state, metrics = run(agg, deltas, weights, state=privacy.AdaptiveClipState(jnp.float32(5)))
    assert float(state.clip_norm) == pytest.approx(5 * math.exp(-0.1), rel=1e-6)
    # The bits are centered (b_i - 1/2): with a fixed m = 4 > 3 real clients, btilde =
    # (1 - 3/2) / 4 + 1/2 = 0.375.
    agg4 = adaptive_gaussian(1.0, 0.0, 0.5, 0.2, expected_clients=4)
    _, state, metrics = run(agg4, deltas, weights)
    assert metrics["privacy/unclipped_fraction_estimate"] == pytest.approx(0.375)
    assert float(state.clip_norm) == pytest.approx(math.exp(-0.2 * (0.375 - 0.5)), rel=1e-6)


@pytest.mark.parametrize("expected, cohort", [(100, None), (10, 100)])
def test_adaptive_noise_on_deltas_and_count(expected, cohort):
    deltas, weights = three_clients()
    agg = adaptive_gaussian(initial_clip_norm=0.5, noise_multiplier=1.0,
                            expected_clients=expected, noise_cohort_size=cohort)
    m, m_noise = expected, cohort or expected
    sigma_delta, sigma_b = adaptive_noise_multipliers(1.0, None, m_noise)   # sigma_b = 5
    x, metrics = draws(agg, deltas, weights)
    clean = np.array([0.8, 0, 0.9]) / m
    assert_noise(x - clean, sigma_delta * 0.5 / m_noise)
    np.testing.assert_allclose(metrics["privacy/noise_std"], sigma_delta * 0.5 / m_noise,
                               rtol=1e-6)
    # btilde = (1 - 3/2) / m + 1/2 + noise of std sigma_b / m_noise = 0.05 (far from the clamp).
    b = metrics["privacy/unclipped_fraction_estimate"]
    assert_noise(b, sigma_b / m_noise, mean=0.5 - 0.5 / m)
    # The count's noise is independent of the deltas' noise.
    assert abs(np.corrcoef(b, x[:, 1])[0, 1]) < 4 / math.sqrt(DRAWS)


# ----------------------------------------------------------------------------- local

def test_local_clipping_by_hand():
    deltas, weights = three_clients()
    out, _, metrics = run(local("gaussian", clip_norm=1.0, noise_multiplier=0.0), deltas, weights)
    # L2-clipped (1, 0, 0) x2, (0.3, 0, 0.4) x5, (0, 0, 1) x1, example-weighted.
    np.testing.assert_allclose(out, [3.5 / 8, 0, 3 / 8], rtol=1e-6)
    assert metrics["privacy/clipped_fraction"] == pytest.approx(2 / 3)
    assert metrics["privacy/noise_std"] == 0.0
    # Laplace clips in L1 (norms 3, 0.7, 4); epsilon huge: noise scale 2e-9.
    out, _, metrics = run(local("laplace", clip_norm=0.5, epsilon=1e9), deltas, weights)
    c1 = np.array([0.3, 0, 0.4]) * 0.5 / 0.7
    np.testing.assert_allclose(out, (2 * np.array([0.5, 0, 0]) + 5 * c1 + [0, 0, 0.5]) / 8,
                               rtol=1e-5, atol=1e-8)
    assert metrics["privacy/clipped_fraction"] == 1.0
    out, _, _ = run(local("gaussian", 1.0, 0.0), deltas, np.zeros(4))
    np.testing.assert_array_equal(out, 0.0)


def test_local_gaussian_noise_per_client():
    deltas, weights = three_clients()
    weights = np.array([1, 0, 0, 3], np.float32)       # c0 and c3, weights 1 and 3
    x, metrics = draws(local("gaussian", clip_norm=0.5, noise_multiplier=2.0), deltas, weights)
    clean = (np.array([0.5, 0, 0]) + 3 * np.array([0, 0, 0.5])) / 4
    # Independent noise of std z C = 1 per client: the weighted mean has sqrt(1 + 9) / 4.
    assert_noise(x - clean, math.sqrt(10) / 4)
    np.testing.assert_allclose(metrics["privacy/noise_std"], 1.0)


def test_local_laplace_scale():
    deltas, weights = three_clients()
    weights = np.array([0, 0, 0, 1], np.float32)       # one client: its own noise
    agg = local("laplace", clip_norm=0.5, epsilon=2.0)
    x, metrics = draws(agg, deltas, weights)
    noise = (x - [0, 0, 0.5]).reshape(-1)
    b = 2 * 0.5 / 2.0                                  # 2 C / epsilon (L1 sensitivity 2C)
    mad = np.abs(noise).mean()                          # E|X| = b, sd(|X|) = b
    assert abs(mad / b - 1) < 0.05
    assert abs(noise.mean()) < 4 * math.sqrt(2) * b / math.sqrt(noise.size)
    assert abs(noise.std() / (math.sqrt(2) * b) - 1) < 0.05
    np.testing.assert_allclose(metrics["privacy/noise_std"], math.sqrt(2) * b, rtol=1e-6)


def test_local_validates():
    with pytest.raises(ValueError, match="epsilon"):
        local("laplace")
    with pytest.raises(ValueError, match="epsilon"):
        local("gaussian", epsilon=1.0)
    with pytest.raises(ValueError, match="mechanism"):
        local("uniform")
    with pytest.raises(ValueError, match="epsilon"):
        local("laplace", epsilon=0.0)


# ----------------------------------------------------------------------------- tree

LIKE = {"w": jnp.zeros((2,)), "b": jnp.zeros(())}


def node(key, level, index, std=1.0):
    return flat(tree_node_noise(key, level, index, LIKE, std))


def test_tree_noise_decomposition_reuses_nodes():
    k = jax.random.key(9)
    prefix = jax.jit(lambda t: tree_noise(k, t, LIKE, 1.0))     # t traced: one compilation
    z = {t: flat(prefix(t)) for t in range(9)}
    np.testing.assert_array_equal(z[0], 0.0)
    np.testing.assert_array_equal(z[1], node(k, 0, 0))                       # [1]
    np.testing.assert_array_equal(z[2], node(k, 1, 0))                       # [1..2]
    np.testing.assert_allclose(z[3], node(k, 1, 0) + node(k, 0, 2), rtol=1e-6)   # [1..2] + [3]
    np.testing.assert_array_equal(z[4], node(k, 2, 0))                       # [1..4]
    np.testing.assert_allclose(z[7], node(k, 2, 0) + node(k, 1, 2) + node(k, 0, 6), rtol=1e-6)
    np.testing.assert_array_equal(z[8], node(k, 3, 0))
    np.testing.assert_allclose(z[6] + node(k, 0, 6), z[7], rtol=1e-6)       # (1, 2) reused
    assert not np.allclose(node(k, 0, 1), node(k, 1, 0))                     # distinct nodes
    np.testing.assert_allclose(node(k, 1, 2, std=3.0), 3.0 * node(k, 1, 2), rtol=1e-6)


def test_tree_ftrl_prefix_sums_equal_clipped_sums_plus_tree_noise():
    deltas, _ = three_clients()
    agg = tree_ftrl(clip_norm=1.0, noise_multiplier=2.0, expected_clients=5)
    keys = [jax.random.key(100 + t) for t in range(7)]       # a new key every round
    tree_key = keys[0]                                       # the tree's: round 1's
    state, total, g_sum = agg.init(None), np.zeros(3), np.zeros(3)
    rng = np.random.default_rng(0)
    for t in range(1, 8):
        w = np.array([1, 1, 0, 1], np.float32) * rng.integers(0, 2, size=4)   # who takes part
        scaled = jax.tree.map(lambda x, s=0.2 * t: x * s, deltas)             # norms change
        out, state, metrics = run(agg, scaled, w, key=keys[t - 1], state=state)
        total += out
        norms = np.array([3, 0.5, 0, 4]) * 0.2 * t
        vecs = np.array([[3, 0, 0], [0.3, 0, 0.4], [0, 0, 0], [0, 0, 4]]) * 0.2 * t
        g_sum += sum(v * min(1, 1 / n) for v, n, wi in zip(vecs, norms, w) if wi > 0)
        assert int(state.round) == t and metrics["privacy/round"] == t
        assert metrics["privacy/noise_std"] == pytest.approx(2 * math.sqrt(t.bit_count()) / 5)
        if t == 5:   # [1..4] + [5]
            hand = node(tree_key, 2, 0, 2.0) + node(tree_key, 0, 4, 2.0)
            np.testing.assert_allclose(total, (g_sum + hand) / 5, rtol=1e-5, atol=1e-6)
    hand = node(tree_key, 2, 0, 2.0) + node(tree_key, 1, 2, 2.0) + node(tree_key, 0, 6, 2.0)
    np.testing.assert_allclose(total, (g_sum + hand) / 5, rtol=1e-5, atol=1e-6)


def test_tree_ftrl_node_noise_std_and_noise_free_sum():
    deltas, weights = three_clients()
    x, _ = draws(tree_ftrl(0.5, 3.0, expected_clients=10), deltas, weights)
    assert_noise(x - np.array([0.8, 0, 0.9]) / 10, 3.0 * 0.5 / 10)     # round 1: one node
    out, _, _ = run(tree_ftrl(1.0, 0.0, expected_clients=10), deltas, weights, key=None)
    np.testing.assert_allclose(out, [0.13, 0, 0.14], rtol=1e-6)
    with pytest.raises(ValueError, match="PRNG key"):
        run(tree_ftrl(1.0, 1.0), deltas, weights, key=None)


def test_tree_ftrl_rho_and_zcdp_conversion():
    assert tree_ftrl_rho(1.0, 1) == 0.5                     # ceil(log2 2) = 1
    assert tree_ftrl_rho(2.0, 7) == 3 / 8                   # ceil(log2 8) = 3
    assert tree_ftrl_rho(2.0, 8) == 4 / 8                   # ceil(log2 9) = 4
    assert tree_ftrl_rho(2.0, 1000) == 10 / 8
    assert tree_ftrl_rho(2.0, 7, participations=2) == 4 * 3 / 8
    assert tree_ftrl_rho(2.0, 0) == 0.0
    assert tree_ftrl_rho(0.0, 3) == math.inf
    assert zcdp_to_dp(0.5, 1e-5) == pytest.approx(0.5 + 2 * math.sqrt(0.5 * math.log(1e5)))
    assert zcdp_to_dp(0.0, 1e-5) == 0.0
    with pytest.raises(ValueError):
        tree_ftrl_rho(1.0, -1)
    with pytest.raises(ValueError):
        zcdp_to_dp(0.1, 1.0)


# ----------------------------------------------------------------------------- common

AGGS = [gaussian(1.0, 1.0, 5), adaptive_gaussian(0.5, 1.0, expected_clients=100),
        local("gaussian", 1.0, 1.0), local("laplace", 1.0, epsilon=1.0), tree_ftrl(1.0, 1.0, 5)]


@pytest.mark.parametrize("agg", AGGS)
def test_jit_eager_and_dtype(agg):
    deltas, weights = three_clients()
    a, _, ma = run(agg, deltas, weights)
    b, _, mb = agg.apply(deltas, jnp.asarray(weights), agg.init(None), KEY, None)
    np.testing.assert_allclose(a, flat(b), rtol=1e-5, atol=1e-6)
    assert ma == pytest.approx({k: float(v) for k, v in mb.items()})
    assert all(v.dtype == jnp.float32 and v.shape == () for v in mb.values())
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), deltas)
    out, _, _ = jax.jit(agg.apply)(half, jnp.asarray(weights), agg.init(None), KEY, None)
    assert out["w"].dtype == jnp.bfloat16 and out["w"].shape == (2,)


def test_entries_build_with_defaults(monkeypatch):
    assert [e.name for e in privacy.ENTRIES] == ["dp_gaussian", "dp_adaptive", "local_dp",
                                                 "dp_ftrl"]
    for e in privacy.ENTRIES:
        monkeypatch.setitem(registry.AGGREGATORS, e.name, e)
    deltas, weights = three_clients()
    for e in privacy.ENTRIES:
        agg = e.build() if e.name != "dp_adaptive" else e.build(expected_clients=100)
        out, _, metrics = run(agg, deltas, weights)
        assert np.all(np.isfinite(out)) and "privacy/noise_std" in metrics
    assert registry.options("dp_adaptive")["target_quantile"] == 0.5
    out, _, _ = run(registry.build("dp_gaussian", noise_multiplier=0.0, expected_clients=10),
                    deltas, weights)
    np.testing.assert_allclose(out, [0.13, 0, 0.14], rtol=1e-6)
    agg = registry.build("local_dp", mechanism="laplace", epsilon=1.0)
    assert run(agg, deltas, weights)[2]["privacy/noise_std"] == pytest.approx(2 * math.sqrt(2))


# ----------------------------------------------------------------------------- inside FedAvg

def reference_deltas(model, params, cohort, client_opt):
    deltas, weights = [], []
    for c in range(cohort.num_clients):
        w = plain_local_train(model, params, cohort, c, client_opt)
        deltas.append(jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b), params, w))
        weights.append(float(cohort.num_examples[c]))
    return deltas, np.array(weights)


def clipped(d, c):
    norm = math.sqrt(sum(float(np.sum(x ** 2)) for x in jax.tree.leaves(d)))
    return jax.tree.map(lambda x: x * min(1.0, c / max(norm, 1e-12)), d)


def reference_sum(c, m):
    def agg(deltas, weights):
        real = [clipped(d, c) for d, n in zip(deltas, weights) if n > 0]
        return jax.tree.map(lambda *xs: sum(xs) / m, *real)
    return agg


def reference_local(c):
    def agg(deltas, weights):
        return jax.tree.map(lambda *xs: sum(n * x for n, x in zip(weights, xs)) / weights.sum(),
                            *[clipped(d, c) for d in deltas])
    return agg


C = 0.05
ROUND_KEY = jax.random.key(7)


def tree_round1_noise(params, std, m):
    k = jax.random.fold_in(ROUND_KEY, AGGREGATOR_KEY)     # round 1's key is the tree's
    return jax.tree.map(lambda z: np.asarray(z) / m, tree_node_noise(k, 0, 0, params, std))


@pytest.mark.parametrize("name, agg, ref, noise", [
    ("gaussian", gaussian(C, 0.0, expected_clients=8), reference_sum(C, 8), None),
    ("adaptive", adaptive_gaussian(C, 0.0, expected_clients=8), reference_sum(C, 8), None),
    ("local", local("gaussian", C, 0.0), reference_local(C), None),
    ("tree", tree_ftrl(C, 0.0, expected_clients=8), reference_sum(C, 8), None),
    ("tree_noisy", tree_ftrl(C, 2.0, expected_clients=8), reference_sum(C, 8), (2.0 * C, 8)),
])
def test_one_fedavg_round_matches_python(name, agg, ref, noise):
    model = tiny_softmax_model()
    data = unequal_clients(sizes=(5, 2, 0, 9, 1, 4))      # client 2 is empty: weight 0
    client_opt = optax.sgd(0.3)
    alg = fedavg(client_opt, optax.sgd(1.0), aggregator=agg)
    params = model.init(jax.random.key(1))
    cohort = pack_cohort(data, [3, 2, 0, 5, 1, 4], batch_size=2, epochs=2, seed=3, round_num=0)
    state, metrics = jit_round(alg, model)(alg.init(params), cohort, ROUND_KEY)
    deltas, weights = reference_deltas(model, params, cohort, client_opt)
    delta = ref(deltas, weights)
    if noise is not None:
        delta = jax.tree.map(np.add, delta, tree_round1_noise(params, *noise))
    expected = jax.tree.map(lambda p, d: np.asarray(p) - d, params, delta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 state.params, expected)
    assert metrics["privacy/num_clients"] == 5
    assert 0 < metrics["privacy/clipped_fraction"] <= 1      # C = 0.05 bites


@pytest.mark.parametrize("agg", [AGGS[1], AGGS[3]])
def test_noisy_fedavg_round_runs(agg):
    model = tiny_softmax_model()
    data = unequal_clients(sizes=(5, 2, 0, 9, 1, 4))
    alg = fedavg(optax.sgd(0.3), optax.sgd(1.0), aggregator=agg)
    params = model.init(jax.random.key(1))
    cohort = pack_cohort(data, [3, 2, 0, 5, 1, 4], batch_size=2, epochs=2, seed=3, round_num=0)
    state, metrics = jit_round(alg, model)(alg.init(params), cohort, ROUND_KEY)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))
    assert metrics["privacy/noise_std"] > 0


@pytest.mark.parametrize("expected, noise", [(None, 0.0), (5.0, 0.7), (None, 1.3)])
def test_gaussian_stream_equals_its_stacked_apply(expected, noise):
    """Clip-and-sum one client at a time, then finalize == apply on the stacked deltas."""
    agg = privacy.gaussian(clip_norm=0.5, noise_multiplier=noise, expected_clients=expected)
    rng = np.random.default_rng(3)
    deltas = {"w": jnp.asarray(rng.normal(size=(4, 3, 2)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
    weights = jnp.array([3.0, 0.0, 1.0, 5.0])                  # slot 1 is padding
    key = jax.random.key(9)
    want, _, want_metrics = agg.apply(deltas, weights, agg.init(None), key, None)
    parts = [agg.stream.contribution(jax.tree.map(lambda x: x[i], deltas), weights[i])
             for i in range(4)]
    total = jax.tree.map(lambda *xs: sum(xs), *parts)
    params = jax.tree.map(lambda x: x[0], deltas)
    got, _, got_metrics = agg.stream.finalize(total, params, agg.init(None), key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(got_metrics[name], value, rtol=1e-6)
