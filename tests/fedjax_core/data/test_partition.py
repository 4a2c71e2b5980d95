"""Partitioners: exact sizes and label sets on tiny data, each example used once, seeds."""

import numpy as np
import pytest

from fedjax_core.data import partition as P


def _dataset(labels):
    labels = np.asarray(labels)
    n = len(labels)
    return {"idx": np.arange(n), "x": np.arange(n, dtype=np.float32)[:, None] * [1.0, -1.0],
            "y": labels}


def _assert_each_example_once(data, n):
    idx = np.concatenate([data.get_client(i)["idx"] for i in range(len(data))])
    assert np.array_equal(np.sort(idx), np.arange(n))
    for i in range(len(data)):  # features travel together, dataset order kept in a client
        c = data.get_client(i)
        assert np.array_equal(c["x"][:, 0], c["idx"].astype(np.float32))
        assert np.all(np.diff(c["idx"]) > 0)


def _same(a, b):
    return a.client_ids == b.client_ids and all(
        np.array_equal(a.get_client(i)["idx"], b.get_client(i)["idx"]) for i in range(len(a)))


def test_client_ids():
    assert P.client_id(42, 100) == "client_00042"
    assert P.client_id(0, 1) == "client_00000"
    assert P.client_id(7, 123_456) == "client_000007"


# ----------------------------------------------------------------------------- iid

def test_iid_sizes_and_coverage():
    arrays = _dataset(np.arange(10) % 2)
    data = P.iid(arrays, num_clients=3, seed=0)
    assert data.client_ids == ("client_00000", "client_00001", "client_00002")
    assert data.client_sizes.tolist() == [4, 3, 3]
    _assert_each_example_once(data, 10)
    perm = np.random.default_rng(0).permutation(10)  # the rule, by hand
    assert data.get_client(0)["idx"].tolist() == sorted(perm[:4].tolist())
    assert data.get_client(2)["idx"].tolist() == sorted(perm[7:].tolist())


def test_iid_seeds():
    arrays = _dataset(np.zeros(100, int))
    assert _same(P.iid(arrays, 7, seed=3), P.iid(arrays, 7, seed=3))
    assert not _same(P.iid(arrays, 7, seed=3), P.iid(arrays, 7, seed=4))


def test_iid_errors():
    with pytest.raises(ValueError, match="cannot give 11 clients"):
        P.iid(_dataset(np.zeros(10, int)), 11)
    with pytest.raises(ValueError, match="disagree on the number of examples"):
        P.iid({"x": np.zeros(3), "y": np.zeros(4)}, 2)
    with pytest.raises(ValueError, match="positive integer"):
        P.iid(_dataset(np.zeros(10, int)), 0)


# ----------------------------------------------------------------------------- shards

@pytest.mark.parametrize("shuffled", [False, True])
def test_shards_two_labels_per_client(shuffled):
    labels = np.repeat(np.arange(10), 20)  # 200 examples, 20 per label
    if shuffled:
        labels = np.random.default_rng(1).permutation(labels)
    data = P.shards(_dataset(labels), num_clients=5, shards_per_client=2, seed=0)
    _assert_each_example_once(data, 200)
    assert data.client_sizes.tolist() == [40] * 5
    label_sets = [set(data.get_client(k)["y"].tolist()) for k in range(5)]
    assert [len(s) for s in label_sets] == [2] * 5
    assert set().union(*label_sets) == set(range(10))  # each label's 20 examples at one client
    for k in range(5):
        assert np.bincount(data.get_client(k)["y"], minlength=10).max() == 20


def test_shards_follow_the_permutation():
    labels = np.repeat(np.arange(4), 3)  # 12 examples, 4 shards of 3 = one label each
    data = P.shards(_dataset(labels), num_clients=2, shards_per_client=2, seed=5)
    perm = np.random.default_rng(5).permutation(4)
    for k in range(2):
        assert sorted(set(data.get_client(k)["y"].tolist())) == sorted(perm[2 * k:2 * k + 2])


def test_shards_uneven_sizes():
    labels = np.repeat(np.arange(5), 5)[:23]  # 23 examples into 6 shards: 4,4,4,4,4,3
    data = P.shards(_dataset(labels), num_clients=3, shards_per_client=2, seed=0)
    _assert_each_example_once(data, 23)
    assert sorted(data.client_sizes.tolist()) == [7, 8, 8]


def test_shards_errors():
    with pytest.raises(ValueError, match="no label array 'label'"):
        P.shards(_dataset(np.zeros(10, int)), 2, label_key="label")
    with pytest.raises(ValueError, match="cannot give 6 clients 2"):
        P.shards(_dataset(np.zeros(10, int)), 6, shards_per_client=2)


# ----------------------------------------------------------------------------- dirichlet

def _reference_dirichlet(labels, num_clients, alpha, seed, min_size):
    """The rule written as a plain loop over Python lists."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    while True:
        batches = [[] for _ in range(num_clients)]
        for c in sorted(set(labels.tolist())):
            idx = rng.permutation([i for i in range(n) if labels[i] == c])
            p = rng.dirichlet([alpha] * num_clients)
            p = np.array([pk if len(b) < n / num_clients else 0.0 for pk, b in zip(p, batches)])
            p = p / p.sum()
            cuts = [int(v) for v in np.cumsum(p) * len(idx)][:-1]
            for k, part in enumerate(np.split(idx, cuts)):
                batches[k] += part.tolist()
        if min(len(b) for b in batches) >= min_size:
            return [sorted(b) for b in batches]


@pytest.mark.parametrize("alpha, min_size", [(0.3, 5), (1.0, 10), (100.0, 0)])
def test_dirichlet_matches_reference_loop(alpha, min_size):
    labels = np.random.default_rng(7).integers(0, 4, 120)
    data = P.dirichlet_label_skew(_dataset(labels), 6, alpha, seed=11, min_size=min_size)
    _assert_each_example_once(data, 120)
    expected = _reference_dirichlet(labels, 6, alpha, 11, min_size)
    assert [data.get_client(k)["idx"].tolist() for k in range(6)] == expected
    assert data.client_sizes.min() >= min_size


def test_dirichlet_small_alpha_skews_labels_large_alpha_does_not():
    labels = np.repeat(np.arange(10), 100)
    skewed = P.dirichlet_label_skew(_dataset(labels), 10, 0.05, seed=0, min_size=1)
    even = P.dirichlet_label_skew(_dataset(labels), 10, 1e4, seed=0)
    def hist(d, k):
        return np.bincount(d.get_client(k)["y"], minlength=10) / d.client_sizes[k]

    # A client's largest class share: near 1 with alpha=0.05, near 1/10 with alpha=1e4.
    assert np.mean([hist(skewed, k).max() for k in range(10)]) > 0.6
    assert max(hist(even, k).max() for k in range(10)) < 0.13
    assert abs(even.client_sizes - 100).max() <= 10  # near-equal sizes too


def test_dirichlet_seeds_and_errors():
    arrays = _dataset(np.arange(200) % 5)
    assert _same(P.dirichlet_label_skew(arrays, 4, 0.5, seed=1),
                 P.dirichlet_label_skew(arrays, 4, 0.5, seed=1))
    assert not _same(P.dirichlet_label_skew(arrays, 4, 0.5, seed=1),
                     P.dirichlet_label_skew(arrays, 4, 0.5, seed=2))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        P.dirichlet_label_skew(arrays, 4, 0.0)
    with pytest.raises(ValueError, match="cannot give 30 clients 10"):
        P.dirichlet_label_skew(arrays, 30, 0.5)
    with pytest.raises(ValueError, match="no draw in 3 gave every client"):
        P.dirichlet_label_skew(arrays, 20, 0.01, min_size=10, max_tries=3)


# ----------------------------------------------------------------------------- quantity skew

def test_quantity_skew_sigma_zero_is_balanced():
    data = P.quantity_skew(_dataset(np.zeros(53, int)), 10, sigma=0.0, seed=0)
    assert data.client_sizes.tolist() == [6, 6, 6, 5, 5, 5, 5, 5, 5, 5]
    _assert_each_example_once(data, 53)


def test_quantity_skew_sizes_follow_the_rule():
    n, k, seed = 1000, 8, 3
    data = P.quantity_skew(_dataset(np.arange(n) % 10), k, sigma=1.5, seed=seed, min_size=5)
    _assert_each_example_once(data, n)
    rng = np.random.default_rng(seed)
    w = rng.lognormal(0.0, 1.5, k)
    quota = w / w.sum() * (n - k * 5)
    sizes = data.client_sizes
    assert int(sizes.sum()) == n and sizes.min() >= 5
    assert np.all(np.abs(sizes - 5 - quota) < 1)  # largest remainder: within one of the quota
    perm = rng.permutation(n)
    assert data.get_client(0)["idx"].tolist() == sorted(perm[:sizes[0]].tolist())
    assert sizes.max() > 3 * sizes.min()  # skewed


def test_quantity_skew_errors():
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        P.quantity_skew(_dataset(np.zeros(10, int)), 2, sigma=-1)
    with pytest.raises(ValueError, match="cannot give 4 clients 3"):
        P.quantity_skew(_dataset(np.zeros(10, int)), 4, sigma=1, min_size=3)


# ----------------------------------------------------------------------------- by column

def test_by_column_strings():
    arrays = {"x": np.arange(5), "writer": np.array(["b", "a", "b", "c", "a"])}
    data = P.by_column(arrays, "writer")
    assert data.client_ids == ("a", "b", "c")
    assert [data.get_client(i)["x"].tolist() for i in range(3)] == [[1, 4], [0, 2], [3]]
    assert data.features == ("x",)
    kept = P.by_column(arrays, "writer", keep_column=True)
    assert kept.get_client(1)["writer"].tolist() == ["b", "b"]


def test_by_column_ints_and_bytes():
    data = P.by_column({"y": np.arange(4), "id": np.array([10, 2, 10, 2])}, "id")
    assert data.client_ids == ("2", "10")
    assert data.client_sizes.tolist() == [2, 2]
    data = P.by_column({"y": np.arange(3), "id": np.array([b"f1", b"f0", b"f1"])}, "id")
    assert data.client_ids == ("f0", "f1")
    assert data.get_client(1)["y"].tolist() == [0, 2]


def test_by_column_errors():
    with pytest.raises(ValueError, match="no column 'w'"):
        P.by_column({"x": np.arange(3)}, "w")
    with pytest.raises(ValueError, match="must be 1-D"):
        P.by_column({"x": np.arange(3), "w": np.zeros((3, 2))}, "w")
