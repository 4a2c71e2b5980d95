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
        np.testing.assert_allclose(per["accuracy"][i], np.mean(logits[start:start + n].argmax(-1) == ys[start:start + n]))
        start += n


def test_per_client_nan_for_empty_client():
    model = tiny_softmax_model()
    data = InMemoryFederatedData({
        "a": {"x": np.ones((2, 3), np.float32), "y": np.zeros(2, np.int32)},
        "b": {"x": np.ones((0, 3), np.float32), "y": np.zeros(0, np.int32)}})
    per = evaluate.evaluate_per_client(model, model.init(jax.random.key(0)), data)
    assert np.isnan(per["accuracy"][1]) and not np.isnan(per["accuracy"][0])
