import jax
import numpy as np

from fedjax_core import evaluate
from fedjax_core.data import InMemoryFederatedData
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients


def test_evaluate_matches_direct_computation_with_padding(monkeypatch):
    model = tiny_softmax_model()
    data = unequal_clients(sizes=(5, 2, 9, 1, 4))
    params = model.init(jax.random.key(0))
    xs = np.concatenate([data.get_client(i)["x"] for i in range(5)])
    ys = np.concatenate([data.get_client(i)["y"] for i in range(5)])
    logits = np.asarray(model.apply(params, {"x": xs}))
    acc = np.mean(logits.argmax(-1) == ys)
    loss = np.mean(np.asarray(model.loss({"y": ys}, logits)))
    monkeypatch.setattr(evaluate, "GROUP_BATCHES", 2)  # several groups, padded last one
    out = evaluate.evaluate(model, params, data, batch_size=3)
    np.testing.assert_allclose(out["accuracy"], acc, rtol=1e-6)
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-5)
    assert out["num_examples"] == 21
    per = evaluate.evaluate_per_client(model, params, data, batch_size=4)
    start = 0
    for i, n in enumerate((5, 2, 9, 1, 4)):
        expected = np.mean(logits[start:start + n].argmax(-1) == ys[start:start + n])
        np.testing.assert_allclose(per["accuracy"][i], expected)
        start += n


def test_per_client_nan_for_empty_client():
    model = tiny_softmax_model()
    data = InMemoryFederatedData({
        "a": {"x": np.ones((2, 3), np.float32), "y": np.zeros(2, np.int32)},
        "b": {"x": np.ones((0, 3), np.float32), "y": np.zeros(0, np.int32)}})
    per = evaluate.evaluate_per_client(model, model.init(jax.random.key(0)), data)
    assert np.isnan(per["accuracy"][1]) and not np.isnan(per["accuracy"][0])


def test_groups_cover_every_example_once_and_pad_the_last_to_a_power_of_two():
    # 5 clients, 21 examples, batch 2, groups of 4 batches (8 examples): two full
    # groups (16), then 5 examples = 3 batches -> one group of 4 batches.
    data = unequal_clients(sizes=(5, 2, 9, 1, 4))
    groups = list(evaluate._groups(data, batch_size=2, group=4))
    assert [g[1].shape for g in groups] == [(4, 2), (4, 2), (4, 2)]
    groups = list(evaluate._groups(data, batch_size=3, group=16))  # 7 batches -> 8
    assert [g[1].shape for g in groups] == [(8, 3)]
    groups = list(evaluate._groups(data, batch_size=2, group=8))  # 11 batches: 8, then 3 -> 4
    assert [g[1].shape for g in groups] == [(8, 2), (4, 2)]
    segments = np.concatenate([s.ravel() for _, s in groups])
    assert (segments == -1).sum() == 24 - 21
    expected = np.repeat(np.arange(5), (5, 2, 9, 1, 4))
    np.testing.assert_array_equal(segments[segments >= 0], expected)
    xs = np.concatenate([g[0]["x"].reshape(-1, 3) for g in groups])[segments >= 0]
    np.testing.assert_array_equal(xs, np.concatenate([data.get_client(i)["x"] for i in range(5)]))


def test_groups_split_over_eight_devices_equal_one_device(monkeypatch):
    from fedjax_core import parallel

    model = tiny_softmax_model()
    data = unequal_clients(sizes=(5, 2, 9, 1, 4, 30, 7, 11))  # 69 examples
    params = model.init(jax.random.key(0))
    monkeypatch.setattr(evaluate, "GROUP_BATCHES", 2)  # groups of 16 batches on 8 devices
    one = evaluate.metric_totals(model, params, data, batch_size=3)
    plan = parallel.Plan(mesh=parallel.client_mesh(8))
    eight = evaluate.metric_totals(model, params, data, batch_size=3, plan=plan)
    for name in one:
        for a, b in zip(one[name], eight[name]):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    assert evaluate.evaluate(model, params, data, 3, plan=plan)["accuracy"] == \
        evaluate.evaluate(model, params, data, 3)["accuracy"]


def test_progress_counts_every_example_once_in_order(monkeypatch):
    model = tiny_softmax_model()
    data = unequal_clients(sizes=(5, 2, 9, 1, 4))  # 21 examples; batch 2, 2 per group: 6 groups
    monkeypatch.setattr(evaluate, "GROUP_BATCHES", 2)
    seen = []
    out = evaluate.evaluate(model, model.init(jax.random.key(0)), data, 2,
                            progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 21), (4, 21), (8, 21), (12, 21), (16, 21), (20, 21), (21, 21)]
    assert out == evaluate.evaluate(model, model.init(jax.random.key(0)), data, 2)
