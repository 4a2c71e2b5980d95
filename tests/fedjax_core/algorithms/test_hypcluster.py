"""HypCluster against a plain per-client Python loop, FedAvg and hand-checked assignments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import evaluate as evaluate_mod
from fedjax_core import parallel
from fedjax_core.algorithms.base import EvalClients, jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.hypcluster import (
    ENTRY,
    first_epoch_loss,
    hypcluster,
    kmeans_first_center,
)
from fedjax_core.data import InMemoryFederatedData, pack_clients, pack_cohort
from fedjax_core.data.sampling import SHUFFLE_STREAM, host_rng
from tests.fedjax_core.helpers import plain_local_train, tiny_softmax_model

MODEL = tiny_softmax_model()

ATOL = RTOL = 1e-5
CLIENT_OPT, LR, MOMENTUM = optax.sgd(0.3), 0.7, 0.9
ALGS = {K: hypcluster(CLIENT_OPT, optax.sgd(LR, momentum=MOMENTUM), num_clusters=K)
        for K in (1, 2, 3)}
STEPS = 8  # every cohort is padded to 8 steps of 2 examples, so compiled rounds are shared
_compiled = {}


def step_fn(K, chunk_size=1):
    """One jitted round per (K, chunk size) for the whole file: compiling dominates its time."""
    if (K, chunk_size) not in _compiled:
        _compiled[K, chunk_size] = jit_round(ALGS[K], MODEL, parallel.Plan(chunk_size))
    return _compiled[K, chunk_size]


def cohort_of(data, indices, round_num, epochs=2, seed=3):
    return pack_cohort(data, indices, batch_size=2, epochs=epochs, seed=seed, round_num=round_num,
                       steps=STEPS)


def two_groups(sizes_a=(5, 3, 7), sizes_b=(4, 6, 2), seed=0):
    """Clients 0..len(a)-1 only have label 0, the others only label 3."""
    rng = np.random.default_rng(seed)
    clients = {}
    for g, (sizes, label) in enumerate([(sizes_a, 0), (sizes_b, 3)]):
        for i, n in enumerate(sizes):
            clients[f"g{g}c{i}"] = {"x": rng.normal(size=(n, 3)).astype(np.float32),
                                    "y": np.full(n, label, np.int32)}
    return InMemoryFederatedData(clients)


def assert_tree_close(a, b, atol=ATOL):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=RTOL), a, b)


# ---- the reference, written from the paper and FedJAX's hyp_cluster.py, one client at a time

ref_train = plain_local_train


def ref_loss(model, params, arrays):
    """Mean loss over the client's own examples (each once), straight from its data."""
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    return float(jnp.mean(model.loss(batch, model.apply(params, batch))))


def ref_kmeans(model, params, data, indices, cohort, client_opt, key, K):
    """FedJAX's kmeans_init on the cohort (clients already chosen are skipped)."""
    candidates = [ref_train(model, params, cohort, c, client_opt) for c in range(len(indices))]
    real = [int(n) > 0 for n in cohort.num_examples]
    chosen = [int(kmeans_first_center(key, cohort.num_examples))]
    best = [np.inf] * len(indices)
    for _ in range(1, K):
        center = candidates[chosen[-1]]
        best = [min(b, ref_loss(model, center, data.get_client(i)) if r else 0.0)
                for b, i, r in zip(best, indices, real)]
        score = [b if r and c not in chosen else -np.inf
                 for c, (b, r) in enumerate(zip(best, real))]
        chosen.append(int(np.argmax(score)))
    return [candidates[c] for c in chosen]


def ref_round(model, clusters, moms, data, indices, cohort, client_opt, lr, momentum):
    """One HypCluster round: maximization, local training, per-cluster mean, momentum SGD."""
    K = len(clusters)
    sums = [None] * K
    totals = [0.0] * K
    counts = [0] * K
    for c, i in enumerate(indices):
        n = float(cohort.num_examples[c])
        if n == 0:
            continue
        losses = [ref_loss(model, w, data.get_client(i)) for w in clusters]
        k = int(np.argmin(losses))
        counts[k] += 1
        trained = ref_train(model, clusters[k], cohort, c, client_opt)
        delta = jax.tree.map(lambda a, b: n * (np.asarray(a) - np.asarray(b)), clusters[k], trained)
        sums[k] = delta if sums[k] is None else jax.tree.map(np.add, sums[k], delta)
        totals[k] += n
    new_clusters, new_moms = [], []
    for k in range(K):
        if totals[k] == 0:
            new_clusters.append(clusters[k])
            new_moms.append(moms[k])
            continue
        delta = jax.tree.map(lambda d: d / totals[k], sums[k])
        mom = jax.tree.map(lambda m, d: momentum * m + d, moms[k], delta)
        new_clusters.append(jax.tree.map(lambda w, m: w - lr * m, clusters[k], mom))
        new_moms.append(mom)
    return new_clusters, new_moms, counts


def stacked(state, k):
    return jax.tree.map(lambda x: x[k], state.server.cluster_params)


# ---- tests

@pytest.mark.parametrize("K", [2, 3])
def test_matches_plain_loop(K):
    """Round 0 is the k-means++ initialisation, rounds 1-2 HypCluster rounds."""
    model, data = MODEL, two_groups()
    params = model.init(jax.random.key(1))
    state = ALGS[K].init(params)
    cohorts = [[0, 3, 4, 1], [5, 2, 3, 0], [1, 4, 2, 5]]
    for r, indices in enumerate(cohorts):
        key = jax.random.key(10 + r)
        cohort = cohort_of(data, indices, r)
        state, metrics = step_fn(K)(state, cohort, key)
        if r == 0:
            ref = ref_kmeans(model, params, data, indices, cohort, CLIENT_OPT, key, K)
            moms = [jax.tree.map(np.zeros_like, params) for _ in range(K)]
            assert bool(state.server.initialized)
        else:
            ref, moms, counts = ref_round(model, ref, moms, data, indices, cohort, CLIENT_OPT,
                                          LR, MOMENTUM)
            assert [float(metrics[f"hypcluster/cluster_{k}_clients"]) for k in range(K)] == counts
        for k in range(K):
            assert_tree_close(stacked(state, k), ref[k])
        assert_tree_close(state.params, ref[0])
    assert float(metrics["train/num_examples"]) == sum(data.client_sizes[i] for i in cohorts[-1])


def test_kmeans_round_picks_one_center_per_group():
    """Two groups with opposite labels: the second center comes from the other group."""
    model, data = MODEL, two_groups()
    params = model.init(jax.random.key(0))
    indices = [0, 1, 3, 4]  # two label-0 clients, then two label-3 clients
    cohort = cohort_of(data, indices, 0)
    firsts = set()
    for seed in range(4):
        key = jax.random.key(seed)
        state, metrics = step_fn(2)(ALGS[2].init(params), cohort, key)
        first = int(kmeans_first_center(key, cohort.num_examples))
        firsts.add(first)
        group = int(first >= 2)
        # Cluster 0 prefers the first center's group label, cluster 1 the other one.
        for k, g in [(0, group), (1, 1 - group)]:
            b = np.asarray(stacked(state, k)["b"])
            assert b[[0, 3][g]] > b[[0, 3][1 - g]]
        assert float(metrics["hypcluster/cluster_0_clients"]) == 2
        assert float(metrics["hypcluster/cluster_1_clients"]) == 2
    assert len(firsts) > 1  # the first center is random


def test_one_cluster_is_fedavg():
    model, data = MODEL, two_groups(sizes_a=(5, 2, 7), sizes_b=(1, 4, 3), seed=4)
    f = fedavg(CLIENT_OPT, optax.sgd(LR, momentum=MOMENTUM))
    params = model.init(jax.random.key(2))
    sh, sf = ALGS[1].init(params), f.init(params)
    step_f = jit_round(f, model)
    for r in range(3):
        cohort = cohort_of(data, [3, 0, 2, 1], r, seed=1)
        sh, mh = step_fn(1)(sh, cohort, jax.random.key(r))
        sf, mf = step_f(sf, cohort, jax.random.key(r))
        assert_tree_close(sh.params, sf.params)
        assert_tree_close(stacked(sh, 0), sf.params)
        for name in ("train/loss", "train/num_examples", "train/delta_norm"):
            np.testing.assert_allclose(mh[name], mf[name], rtol=1e-5)
        assert float(mh["hypcluster/cluster_0_clients"]) == 4


def hand_state(alg, model):
    """Cluster 0 predicts label 0, cluster 1 label 3; already initialised."""
    state = alg.init(model.init(jax.random.key(0)))
    w = jnp.zeros((3, 4))
    c0 = {"b": jnp.array([2.0, 0.0, 0.0, 0.0]), "w": w}
    c1 = {"b": jnp.array([0.0, 0.0, 0.0, 2.0]), "w": w}
    clusters = jax.tree.map(lambda a, b: jnp.stack([a, b]), c0, c1)
    server = state.server._replace(cluster_params=clusters, initialized=jnp.asarray(True))
    return state._replace(params=c0, server=server), c0, c1


def test_assignment_by_hand_and_per_cluster_mean():
    """Label-0 clients pick cluster 0 and label-3 clients cluster 1 (whatever the data's
    features, since w = 0); each cluster averages its own clients' deltas only."""
    model, data = MODEL, two_groups()
    state, c0, c1 = hand_state(ALGS[2], model)
    indices = [4, 0, 5, 2]
    cohort = cohort_of(data, indices, 0)
    new, metrics = step_fn(2)(state, cohort, jax.random.key(0))
    assert float(metrics["hypcluster/cluster_0_clients"]) == 2
    assert float(metrics["hypcluster/cluster_1_clients"]) == 2
    zeros = [jax.tree.map(np.zeros_like, c0)] * 2
    ref, _, counts = ref_round(model, [c0, c1], zeros, data, indices, cohort, CLIENT_OPT, LR,
                               MOMENTUM)
    assert counts == [2, 2]
    for k in range(2):
        assert_tree_close(stacked(new, k), ref[k])
    # Cluster 1 moved only by the label-3 clients: its label-3 bias grew, cluster 0's did not.
    assert float(stacked(new, 1)["b"][3]) > 2.0 and float(stacked(new, 0)["b"][3]) < 0.0


def test_cluster_without_clients_is_unchanged():
    model, data = MODEL, two_groups()
    state, c0, c1 = hand_state(ALGS[2], model)
    # Give both clusters some momentum, then train label-0 clients only.
    state = state._replace(server=state.server._replace(
        opt_state=jax.tree.map(lambda x: x + 0.25, state.server.opt_state)))
    cohort = cohort_of(data, [0, 1, 2, 0], 0)
    new, metrics = step_fn(2)(state, cohort, jax.random.key(0))
    assert float(metrics["hypcluster/cluster_1_clients"]) == 0
    assert_tree_close(stacked(new, 1), c1, atol=0)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[1], b[1]),
                 new.server.opt_state, state.server.opt_state)
    assert not np.allclose(stacked(new, 0)["b"], c0["b"])


def test_result_does_not_depend_on_chunk_size():
    model, data = MODEL, two_groups()
    s1 = s3 = ALGS[2].init(model.init(jax.random.key(0)))
    for r in range(2):  # the k-means round, then a HypCluster round
        cohort = cohort_of(data, [0, 4, 2, 5], r)
        s1, m1 = step_fn(2, 1)(s1, cohort, jax.random.key(r))
        s3, m3 = step_fn(2, 3)(s3, cohort, jax.random.key(r))
        assert_tree_close(s1.server.cluster_params, s3.server.cluster_params, atol=1e-6)
        for name in m1:
            np.testing.assert_allclose(m1[name], m3[name], rtol=1e-5, atol=1e-6)


def test_padding_client_changes_nothing():
    model, data = MODEL, two_groups()
    clients = [data.get_client(i) for i in (0, 4, 2)]
    empty = {k: v[:0] for k, v in clients[0].items()}
    rngs = lambda: [host_rng(0, 0, SHUFFLE_STREAM, s) for s in range(3)]  # noqa: E731
    padded = pack_clients(clients + [empty], batch_size=2, epochs=2, rngs=rngs() + [None],
                          steps=STEPS)
    tight = pack_clients(clients, batch_size=2, epochs=2, rngs=rngs(), bucket=False)
    a = b = ALGS[2].init(model.init(jax.random.key(0)))
    step_tight = jit_round(ALGS[2], model)
    for r in range(2):  # the k-means round, then a HypCluster round
        a, ma = step_tight(a, tight, jax.random.key(r))
        b, mb = step_fn(2)(b, padded, jax.random.key(r))
        assert_tree_close(a.server.cluster_params, b.server.cluster_params, atol=1e-6)
        for name in ma:
            np.testing.assert_allclose(ma[name], mb[name], rtol=1e-5, atol=1e-6)


def test_all_padding_first_round_does_not_initialise():
    empty = {"x": np.zeros((0, 3), np.float32), "y": np.zeros(0, np.int32)}
    cohort = pack_clients([empty] * 4, batch_size=2, steps=STEPS)
    state = ALGS[2].init(MODEL.init(jax.random.key(0)))
    new, _ = step_fn(2)(state, cohort, jax.random.key(0))
    assert not bool(new.server.initialized)
    assert_tree_close(new.server.cluster_params, state.server.cluster_params, atol=0)


def test_evaluate_uses_each_clients_cluster():
    model, alg = MODEL, ALGS[2]
    state, c0, c1 = hand_state(alg, model)
    test = two_groups(sizes_a=(3, 2), sizes_b=(4, 1), seed=5)

    def expected(assign):
        num = {"loss": 0.0, "accuracy": 0.0}
        for c, k in enumerate(assign):
            arrays = test.get_client(c)
            logits = model.apply([c0, c1][k], arrays)
            num["loss"] += float(jnp.sum(model.loss(arrays, logits)))
            num["accuracy"] += float(np.sum(np.argmax(logits, -1) == arrays["y"]))
        total = float(np.sum(test.client_sizes))
        return {"loss": num["loss"] / total, "accuracy": num["accuracy"] / total,
                "num_examples": total}

    # On the evaluated data itself: label-0 clients pick cluster 0, label-3 cluster 1.
    got = alg.evaluate(model, state, test, 3)
    for name, value in expected([0, 0, 1, 1]).items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5)
    assert got["accuracy"] == 1.0
    # Chosen on training data: clients 0 and 2 trained on the other group's labels, client 3
    # has no training examples (cluster 0).
    src = two_groups(sizes_a=(2, 2), sizes_b=(3, 1), seed=6)
    train = InMemoryFederatedData({
        "a": src.get_client(2), "b": src.get_client(1), "c": src.get_client(0),
        "d": {k: v[:0] for k, v in src.get_client(3).items()}})
    got = alg.evaluate(model, state, test, 3, EvalClients(rows=None, train=train))
    for name, value in expected([1, 0, 0, 0]).items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5)


def test_evaluate_compiles_one_kernel_for_all_clusters():
    test = two_groups()
    for K in (2, 3):
        state = ALGS[K].init(MODEL.init(jax.random.key(K)))
        before = evaluate_mod._accumulate._cache_size()
        ALGS[K].evaluate(MODEL, state, test, 4, EvalClients(rows=None, train=test))
        ALGS[K].evaluate(MODEL, state, test, 4)
        # At most one kernel for the model's metrics and one for the selection loss.
        assert evaluate_mod._accumulate._cache_size() - before <= 2
        if K == 3:
            assert evaluate_mod._accumulate._cache_size() == before


def test_entry_builds_with_defaults():
    alg = ENTRY.build(optax.sgd(0.1), 1.0)
    state = alg.init(MODEL.init(jax.random.key(0)))
    assert jax.tree.leaves(state.server.cluster_params)[0].shape[0] == 2
    with pytest.raises(ValueError, match="num_clusters"):
        hypcluster(num_clusters=0)


def test_cluster_choice_counts_each_example_once():
    """With 3 epochs cut by max_steps, some examples appear twice in the packed stream
    (the first epoch in full, then part of the second); the assignment loss still weighs
    each example once."""
    data = two_groups(sizes_a=(5, 3), sizes_b=(7,), seed=2)
    params = MODEL.init(jax.random.key(3))
    cohort = pack_cohort(data, [0, 1, 2], batch_size=2, epochs=3, seed=0, round_num=0, max_steps=4)
    assert cohort.mask.sum(axis=(1, 2)).tolist() == [8, 8, 8]
    for c in range(3):
        got = first_epoch_loss(MODEL, params, {k: v[c] for k, v in cohort.batches.items()},
                               cohort.mask[c], cohort.num_examples[c])
        np.testing.assert_allclose(got, ref_loss(MODEL, params, data.get_client(c)), rtol=1e-5)


def test_per_client_reports_the_assignment():
    """`per_client=True` reports each client's cluster: the hand-checked assignment in a
    HypCluster round, the nearest center in the k-means++ round (matching the counts)."""
    model, data = MODEL, two_groups()
    step = jit_round(ALGS[2], model, per_client=True)
    state, c0, c1 = hand_state(ALGS[2], model)
    cohort = cohort_of(data, [4, 0, 5, 2], 0)
    _, metrics, per = step(state, cohort, jax.random.key(0))
    assert per["cluster"].tolist() == [1, 0, 1, 0]
    losses = [ref_loss(model, [c0, c1][k], data.get_client(i)) for k, i in zip([1, 0, 1, 0],
                                                                                 [4, 0, 5, 2])]
    np.testing.assert_allclose(per["cluster_loss"], losses, rtol=1e-5)
    np.testing.assert_allclose(per["num_examples"], [data.client_sizes[i] for i in (4, 0, 5, 2)])
    _, metrics, per = step(ALGS[2].init(model.init(jax.random.key(0))), cohort,
                           jax.random.key(1))
    a = per["cluster"].tolist()  # one center per group: the label-3 pair, the label-0 pair
    assert a[0] == a[2] != a[1] == a[3]
    assert [a.count(k) for k in range(2)] == [
        int(metrics[f"hypcluster/cluster_{k}_clients"]) for k in range(2)]
