"""Per-client fine-tuning evaluation against a plain per-client loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core.data import AlignedFederatedData
from fedjax_core.data.sampling import FINETUNE_STREAM, host_rng
from fedjax_core.evaluate import evaluate_per_client
from fedjax_core.personalization import client_distribution, finetune_evaluate
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients


def reference(model, params, lr, steps, train, test, batch_size, seed, round_num):
    out = []
    for c in range(len(test.client_ids)):
        w = params
        arrays = train.get_client(c)
        n = len(arrays["y"])
        if n and steps:
            rng = host_rng(seed, round_num, FINETUNE_STREAM, c)
            order = np.concatenate([rng.permutation(n) for _ in range(steps * batch_size // n + 1)])
            order = order[:steps * batch_size]
            for s in range(steps):
                idx = order[s * batch_size:(s + 1) * batch_size]
                batch = {k: jnp.asarray(v[idx]) for k, v in arrays.items()}
                g = jax.grad(lambda p: jnp.mean(model.loss(batch, model.apply(p, batch))))(w)
                w = jax.tree.map(lambda p, gi: p - lr * gi, w, g)
        t = test.get_client(c)
        logits = model.apply(w, {k: jnp.asarray(v) for k, v in t.items()})
        out.append(float(jnp.mean(jnp.argmax(logits, -1) == t["y"])) if len(t["y"]) else np.nan)
    return np.array(out)


@pytest.mark.parametrize("group_size", [2, 16])
def test_finetune_matches_plain_loop(group_size):
    model = tiny_softmax_model()
    train_all = unequal_clients(sizes=(5, 2, 9, 1), seed=0)
    test = unequal_clients(sizes=(4, 6, 3, 5), seed=1)
    # Client "c1" has no training data in this split: it keeps the global model.
    from fedjax_core.data import InMemoryFederatedData
    train_split = InMemoryFederatedData({cid: train_all.get_client(i)
                                         for i, cid in enumerate(train_all.client_ids)
                                         if cid != "c1"})
    train = AlignedFederatedData(train_split, test.client_ids)
    assert train.positions.tolist() == [0, -1, 1, 2]
    assert train.client_sizes.tolist() == [5, 0, 9, 1]
    params = model.init(jax.random.key(2))
    got = finetune_evaluate(model, params, optax.sgd(0.5), 3, train, test, batch_size=2,
                            eval_batch_size=4, seed=7, round_num=2, group_size=group_size)
    want = reference(model, params, 0.5, 3, train, test, 2, 7, 2)
    np.testing.assert_allclose(got["accuracy"], want, atol=1e-6)
    np.testing.assert_array_equal(got["num_examples"], [4, 6, 3, 5])
    # Without fine-tuning it is the plain per-client evaluation.
    zero = finetune_evaluate(model, params, optax.sgd(0.5), 0, train, test, 2, seed=7)
    np.testing.assert_allclose(zero["accuracy"], evaluate_per_client(model, params, test)["accuracy"],
                               atol=1e-6)
    assert not np.allclose(got["accuracy"], zero["accuracy"])


def test_unaligned_data_is_refused():
    model = tiny_softmax_model()
    data = unequal_clients()
    other = unequal_clients(sizes=(1, 2))
    with pytest.raises(ValueError, match="AlignedFederatedData"):
        finetune_evaluate(model, model.init(jax.random.key(0)), optax.sgd(0.1), 1, other, data, 2)


def test_client_distribution_by_hand():
    d = client_distribution(np.array([0.2, 0.9, np.nan, 0.5, 0.4]), "accuracy_")
    assert d["accuracy_clients_mean"] == pytest.approx(0.5)
    # 10th percentile of [0.2, 0.4, 0.5, 0.9]: position 0.3 -> 0.2 + 0.3 * 0.2.
    assert d["accuracy_clients_p10"] == pytest.approx(0.26)
    assert d["accuracy_clients_worst"] == pytest.approx(0.2)
    assert np.isnan(client_distribution(np.array([np.nan]))["clients_mean"])
