"""Synthetic(alpha, beta) of FedProx: shapes, seeds, the generative rule and its statistics."""

import numpy as np
import pytest

from fedjax_core.data.synthetic import covariance_diagonal, synthetic, synthetic_params


def _equal(a, b):
    return a.client_ids == b.client_ids and all(
        np.array_equal(a.get_client(i)[k], b.get_client(i)[k])
        for i in range(len(a)) for k in ("x", "y"))


def test_shapes_dtypes_and_split():
    train, test = synthetic(1.0, 1.0, seed=0)
    params = synthetic_params(1.0, 1.0, seed=0)
    assert len(train) == len(test) == 30
    assert train.client_ids == test.client_ids
    assert train.client_ids[0] == "client_00000"
    n = params.sizes
    assert n.min() >= 50
    assert train.client_sizes.tolist() == [int(0.9 * k) for k in n.tolist()]
    assert (train.client_sizes + test.client_sizes).tolist() == n.tolist()
    for data in (train, test):
        c = data.get_client(3)
        assert c["x"].dtype == np.float32 and c["x"].shape == (len(c["y"]), 60)
        assert c["y"].dtype == np.int32 and c["y"].min() >= 0 and c["y"].max() < 10
    assert params.w.shape == (30, 60, 10) and params.b.shape == (30, 10)
    assert params.v.shape == (30, 60)


def test_other_sizes():
    train, test = synthetic(0.5, 0.5, num_clients=4, dim=7, classes=3, seed=2,
                            samples_per_client=20, train_fraction=0.75)
    assert train.client_sizes.tolist() == [15] * 4 and test.client_sizes.tolist() == [5] * 4
    assert train.get_client(0)["x"].shape == (15, 7)
    assert set(np.concatenate([train.get_client(i)["y"] for i in range(4)]).tolist()) <= {0, 1, 2}


def test_deterministic_and_seeded():
    a, b = synthetic(0.5, 0.5, seed=4), synthetic(0.5, 0.5, seed=4)
    assert _equal(a[0], b[0]) and _equal(a[1], b[1])
    c = synthetic(0.5, 0.5, seed=5)
    assert not np.array_equal(a[0].get_client(0)["x"][:10], c[0].get_client(0)["x"][:10])


def test_client_does_not_depend_on_num_clients():
    few, _ = synthetic(1.0, 1.0, num_clients=3, seed=9)
    many, _ = synthetic(1.0, 1.0, num_clients=30, seed=9)
    for i in range(3):
        assert np.array_equal(few.get_client(i)["x"], many.get_client(i)["x"])
        assert np.array_equal(few.get_client(i)["y"], many.get_client(i)["y"])


def test_labels_follow_the_argmax_rule():
    params = synthetic_params(1.0, 1.0, num_clients=5, seed=1)
    train, test = synthetic(1.0, 1.0, num_clients=5, seed=1)
    for data in (train, test):
        for k in range(5):
            c = data.get_client(k)
            logits = c["x"].astype(np.float64) @ params.w[k] + params.b[k]
            softmax = np.exp(logits - logits.max(1, keepdims=True))
            softmax /= softmax.sum(1, keepdims=True)
            assert np.array_equal(np.argmax(softmax, 1), c["y"])


def test_alpha_beta_zero_clients_still_differ():
    params = synthetic_params(0.0, 0.0, num_clients=4, seed=0)
    assert np.all(params.u == 0) and np.all(params.big_b == 0)
    # W_k ~ N(0, 1), b_k ~ N(0, 1), v_k ~ N(0, 1) are drawn per client: all distinct.
    for i in range(4):
        for j in range(i):
            assert not np.allclose(params.w[i], params.w[j])
            assert not np.allclose(params.v[i], params.v[j])
    # ... with the prior's statistics: mean 0, variance 1 over the 4 * 600 entries of W.
    assert abs(params.w.mean()) < 0.1 and abs(params.w.var() - 1) < 0.15
    assert abs(params.v.mean()) < 0.2 and abs(params.v.var() - 1) < 0.25


def test_alpha_beta_scale_the_priors():
    params = synthetic_params(3.0, 2.0, num_clients=3000, seed=0, samples_per_client=1)
    assert abs(params.u.std() - 3.0) < 0.15 and abs(params.big_b.std() - 2.0) < 0.1
    # W_k entries scatter around u_k with unit variance; v_k entries around B_k.
    assert abs((params.w - params.u[:, None, None]).std() - 1) < 0.02
    assert abs((params.v - params.big_b[:, None]).std() - 1) < 0.02
    assert abs((params.b - params.u[:, None]).mean()) < 0.02


def test_iid_variant_shares_the_model():
    params = synthetic_params(0.0, 0.0, num_clients=5, seed=3, iid=True)
    assert all(np.array_equal(params.w[0], params.w[k]) for k in range(5))
    assert all(np.array_equal(params.b[0], params.b[k]) for k in range(5))
    assert np.all(params.v == 0)
    # alpha and beta are ignored for Synthetic-IID.
    a, b = synthetic(0, 0, num_clients=5, seed=3, iid=True), synthetic(1, 1, num_clients=5,
                                                                          seed=3, iid=True)
    assert _equal(a[0], b[0])
    # Same sizes as the non-IID data of the same seed.
    assert np.array_equal(params.sizes, synthetic_params(1.0, 1.0, num_clients=5, seed=3).sizes)


def test_input_covariance_is_the_diagonal_sigma():
    n = 100_000
    params = synthetic_params(1.0, 1.0, num_clients=1, seed=0, samples_per_client=n)
    train, _ = synthetic(1.0, 1.0, num_clients=1, seed=0, samples_per_client=n,
                         train_fraction=1.0)
    x = train.get_client(0)["x"].astype(np.float64)
    assert x.shape == (n, 60)
    sigma = covariance_diagonal(60)
    assert sigma[0] == 1.0 and np.isclose(sigma[1], 2 ** -1.2) and np.isclose(sigma[59], 60 ** -1.2)
    # Means: v within 5 standard errors; variances: j^-1.2 within 3% (sd of the estimate 0.45%).
    assert np.all(np.abs(x.mean(0) - params.v[0]) < 5 * np.sqrt(sigma / n))
    assert np.allclose(x.var(0), sigma, rtol=0.03)
    corr = np.corrcoef(x, rowvar=False)
    off = corr[~np.eye(60, dtype=bool)]
    assert np.abs(off).max() < 0.02  # uncorrelated (sd of a correlation estimate 0.003)


def test_client_sizes_follow_lognormal_plus_50():
    sizes = synthetic_params(0.0, 0.0, num_clients=4000, seed=0).sizes
    assert sizes.min() >= 50
    extra = sizes - 50  # floor(LogNormal(4, 2))
    assert 45 <= np.median(extra) <= 65  # median e^4 = 54.6
    assert abs(np.mean(extra >= int(np.exp(6))) - 0.1587) < 0.02  # P(z > 1)


def test_argument_errors():
    with pytest.raises(ValueError, match="standard deviations"):
        synthetic(-1.0, 0.0)
    with pytest.raises(ValueError, match="train_fraction"):
        synthetic(0.0, 0.0, train_fraction=0.0)
    with pytest.raises(ValueError, match="samples_per_client"):
        synthetic(0.0, 0.0, samples_per_client=0)
