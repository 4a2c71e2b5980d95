"""Tests for the task models: parameter counts, shapes, losses and metrics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_core.models import Model, logistic_regression, mlp, nn
from fedjax_core.models.emnist_cnn import emnist_cnn
from fedjax_core.models.shakespeare_lstm import BOS, EOS, OOV, PAD, shakespeare_lstm


def _count(model):
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))


@pytest.mark.parametrize("model,expected", [
    (lambda: emnist_cnn(62), 1_206_590),
    (lambda: shakespeare_lstm(), 820_522),
    (lambda: logistic_regression((28, 28, 1), 62), 48_670),
    (lambda: mlp((28, 28, 1), num_classes=62), 784 * 200 + 200 + 200 * 200 + 200 + 200 * 62 + 62),
])
def test_parameter_counts(model, expected):
    m = model()
    assert isinstance(m, Model)
    assert _count(m) == expected


def test_constants():
    assert (PAD, BOS, EOS, OOV) == (0, 1, 2, 89)


def test_logistic_regression_values_and_metrics():
    model = logistic_regression((2, 1), 3)
    params = {"dense_0": {"w": jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]),
                          "b": jnp.array([0.0, 0.0, 0.5])}}
    batch = {"x": jnp.array([[[1.0], [0.0]], [[0.0], [1.0]]]), "y": jnp.array([0, 0])}
    logits = model.apply(params, batch)
    np.testing.assert_allclose(logits, [[1.0, 0.0, 0.5], [0.0, 2.0, 0.5]])
    m = model.metrics(batch, logits)
    np.testing.assert_array_equal(m["accuracy"][0], [1.0, 0.0])
    np.testing.assert_array_equal(m["accuracy"][1], [1.0, 1.0])
    np.testing.assert_allclose(m["loss"][0], model.loss(batch, logits))
    np.testing.assert_allclose(
        m["loss"][0][0], math.log(math.e + 1 + math.exp(0.5)) - 1.0, rtol=1e-6)


def test_mlp_rejects_positional_num_classes():
    with pytest.raises(TypeError):
        mlp((4,), 10)


def _numpy_params(model, seed=0):
    # Random params of the right shapes without running the (slow to compile) init.
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return jax.tree.map(lambda s: jnp.asarray(
        rng.normal(size=s.shape) / math.sqrt(math.prod(s.shape[:-1]) or 1), s.dtype), shapes)


def test_emnist_cnn_train_and_eval_paths():
    rng = np.random.default_rng(1)
    batch = {"x": jnp.asarray(rng.uniform(size=(2, 28, 28, 1)), jnp.float32),
             "y": jnp.array([3, 7])}
    m_lax, m_col = emnist_cnn(conv_impl="lax"), emnist_cnn(conv_impl="im2col")
    params = _numpy_params(m_lax)
    ev = jax.jit(m_lax.apply)(params, batch)
    assert ev.shape == (2, 62)
    np.testing.assert_allclose(jax.jit(m_col.apply)(params, batch), ev, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        m_lax.apply(params, batch, train=True)
    k = jax.random.key(2)
    train_apply = jax.jit(lambda p, key: m_lax.apply(p, batch, key=key, train=True))
    tr = train_apply(params, k)
    assert not np.allclose(tr, ev)  # dropout is on
    np.testing.assert_array_equal(tr, train_apply(params, k))

    def loss(model, p):
        return jnp.mean(model.loss(batch, model.apply(p, batch, key=k, train=True)))

    g_lax = jax.jit(jax.grad(lambda p: loss(m_lax, p)))(params)
    g_col = jax.jit(jax.grad(lambda p: loss(m_col, p)))(params)
    for a, b in zip(jax.tree.leaves(g_col), jax.tree.leaves(g_lax)):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) + 1e-7
    metrics = m_lax.metrics(batch, ev)
    assert set(metrics) == {"loss", "accuracy"}
    assert metrics["loss"][0].shape == (2,)


def test_shakespeare_lstm_shapes_and_one_scan_per_layer():
    model = shakespeare_lstm()
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((4, 80), jnp.int32)
    out = jax.eval_shape(lambda p, x: model.apply(p, {"x": x, "y": x}), params, x)
    assert out.shape == (4, 80, 90)
    jaxpr = str(jax.make_jaxpr(lambda p, x: model.apply(p, {"x": x, "y": x}))(params, x))
    # One scan per layer, or one native recurrence call per layer with the native kernels.
    if nn.resolve_kernels("auto").native_lstm:
        assert jaxpr.count("fedjax_lstm_forward") == 2 and "scan[" not in jaxpr
    else:
        assert jaxpr.count("scan[") == 2
    pure = shakespeare_lstm(kernels=nn.Kernels.cpu(native_lstm=False))
    jaxpr = str(jax.make_jaxpr(lambda p, x: pure.apply(p, {"x": x, "y": x}))(params, x))
    assert jaxpr.count("scan[") == 2


def _hand_ce(logits, targets):
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits).sum(-1))
    return lse - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]


def test_shakespeare_lstm_loss_and_metrics():
    model = shakespeare_lstm(hidden_size=4)
    params = _numpy_params(model)
    x = jnp.array([[BOS, 5, 6, 7, 8, PAD], [BOS, 9, 10, 11, 12, 13]])
    y = jnp.array([[5, 6, OOV, 8, EOS, PAD], [9, 10, 11, 12, 13, EOS]])
    batch = {"x": x, "y": y}
    logits = jax.jit(model.apply)(params, batch)
    assert logits.shape == (2, 6, 90)
    ce = _hand_ce(logits, y)
    not_pad = np.asarray(y != PAD)
    # FedJAX's train_loss: mean over all T steps of ce * [y != PAD].
    np.testing.assert_allclose(model.loss(batch, logits), (ce * not_pad).mean(-1), rtol=1e-5)
    metrics = jax.jit(model.metrics)
    m = metrics(batch, logits)
    assert set(m) == {"loss", "accuracy", "accuracy_in_vocab", "oov_rate"}
    np.testing.assert_allclose(m["loss"][0], (ce * not_pad).sum(-1), rtol=1e-5)
    np.testing.assert_array_equal(m["loss"][1], [5.0, 6.0])
    np.testing.assert_array_equal(m["accuracy"][1], [4.0, 5.0])
    np.testing.assert_array_equal(m["accuracy_in_vocab"][1], [4.0, 5.0])
    np.testing.assert_array_equal(m["oov_rate"][0], [1.0, 0.0])
    np.testing.assert_array_equal(m["oov_rate"][1], [5.0, 6.0])
    # Force predictions: in-vocab accuracy never predicts PAD/BOS/EOS/OOV.
    forced = jnp.zeros((2, 6, 90)).at[..., 7].set(1.0).at[..., OOV].set(5.0)
    forced = forced.at[0, 3, 8].set(6.0)  # row 0, t3: predicts 8 (correct) above OOV
    m = metrics(batch, forced)
    # accuracy: row 0 predicts OOV except t3 -> t2 (OOV target) and t3 correct = 2.
    np.testing.assert_array_equal(m["accuracy"][0], [2.0, 0.0])
    # in vocab: OOV masked, so 7 is predicted except t3: row 0 only t3; row 1 none.
    np.testing.assert_array_equal(m["accuracy_in_vocab"][0], [1.0, 0.0])
