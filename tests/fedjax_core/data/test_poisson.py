"""Poisson client sampling: cohort sizes follow Binomial(N, q); padding changes nothing."""

import jax
import numpy as np
import optax
import pytest

from fedjax_core import client_state
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.scaffold import scaffold
from fedjax_core.data import pack_cohort
from fedjax_core.data.pack import pad_cohort
from fedjax_core.data.sampling import poisson
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients


def test_cohort_sizes_follow_binomial():
    n, q, rounds = 500, 0.04, 3000
    sizes = np.array([len(poisson(n, q, seed=1, round_num=r)) for r in range(rounds)])
    mean, var = n * q, n * q * (1 - q)
    # Mean within 4 standard errors; variance within 10% (its relative s.e. is ~2.6% here).
    assert abs(sizes.mean() - mean) < 4 * np.sqrt(var / rounds)
    assert abs(sizes.var() - var) / var < 0.1
    # The whole distribution: P(size = k) against the binomial pmf, chi-square-like bound.
    from math import comb
    for k in range(14, 27):
        p = comb(n, k) * q**k * (1 - q) ** (n - k)
        observed = np.mean(sizes == k)
        assert abs(observed - p) < 5 * np.sqrt(p * (1 - p) / rounds), k


def test_each_client_with_probability_q_and_deterministic():
    n, q = 40, 0.25
    hits = np.zeros(n)
    for r in range(2000):
        idx = poisson(n, q, seed=0, round_num=r)
        assert np.all(np.diff(idx) > 0)
        hits[idx] += 1
    np.testing.assert_allclose(hits / 2000, q, atol=5 * np.sqrt(q * (1 - q) / 2000))
    np.testing.assert_array_equal(poisson(n, q, 3, 7), poisson(n, q, 3, 7))
    with pytest.raises(ValueError, match="rate must be in"):
        poisson(n, 0.0, 0, 0)


@pytest.mark.parametrize("make", [
    lambda: fedavg(optax.sgd(0.3), optax.sgd(1.0)),
    lambda: scaffold(optax.sgd(0.3), 1.0, client_learning_rate=0.3, num_clients=5),
])
def test_padding_clients_change_nothing(make):
    model = tiny_softmax_model()
    data = unequal_clients()
    alg = make()
    state0 = alg.init(model.init(jax.random.key(0)))
    cohort = pack_cohort(data, [3, 0, 2], batch_size=2, epochs=1, seed=0, round_num=0)
    padded = pad_cohort(cohort, 6)
    assert padded.client_index.tolist() == [3, 0, 2, -1, -1, -1]
    outs = []
    for c in (cohort, padded):
        state, _ = jit_round(alg, model)(state0, c, jax.random.key(1))
        if client_state.has_stores(state):
            assert int(state.index.size) == 3  # padding is not recorded
        outs.append(state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *outs)
