"""Stack Overflow LSTM, CIFAR-100 ResNet-18 / logistic, the EMNIST dense net, new metric parts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedjax_core.models import linear, nn
from fedjax_core.models import metrics as M
from fedjax_core.models import resnet as R
from fedjax_core.models.base import Model
from fedjax_core.models.stackoverflow_lstm import BOS, EOS, PAD, stackoverflow_lstm


def _count(model):
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))


def _numpy_params(model, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return jax.tree.map(lambda s: jnp.asarray(
        scale * rng.normal(size=s.shape) / math.sqrt(math.prod(s.shape[:-1]) or 1), s.dtype),
        shapes)


@pytest.mark.parametrize("make, expected", [
    # FedJAX models/stackoverflow_test.py: 4,050,748 and, shared embeddings, 3,090,364.
    # embed 10004*96 + LSTM (96+670)*2680+2680 + proj 670*96+96 + dense 96*10004+10004.
    (lambda: stackoverflow_lstm(), 960_384 + 2_055_560 + 64_416 + 970_388),
    (lambda: stackoverflow_lstm(share_input_output_embeddings=True), 3_090_364),
    # Convs 11,166,912 + dense 51,300 (+ 9,600 group-norm scales and offsets).
    (lambda: R.resnet18(), 11_227_812),
    (lambda: R.resnet18(affine=False), 11_218_212),
    # FedJAX models/cifar100_test.py: 172,900 (24*24*3*100 + 100).
    (lambda: R.cifar100_logistic(), 172_900),
    # FedJAX models/emnist.create_dense_model: Flatten, 200, relu, 200, relu, classes.
    (lambda: linear.mlp((28, 28, 1), (200, 200), num_classes=62), 209_662),
    (lambda: linear.mlp((28, 28, 1), (200, 200), num_classes=10), 199_210),
])
def test_parameter_counts(make, expected):
    model = make()
    assert isinstance(model, Model)
    assert _count(model) == expected


def test_stackoverflow_full_size_shapes():
    model = stackoverflow_lstm()
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((5, 3), jnp.int32)
    out = jax.eval_shape(lambda p, x: model.apply(p, {"x": x, "y": x}), params, x)
    assert out.shape == (5, 3, 10_004)
    loss = jax.eval_shape(lambda o, x: model.loss({"x": x, "y": x}, o), out, x)
    assert loss.shape == (5,)


def _reference_forward(params, x, num_layers, shared):
    # An independent path: one nn.lstm_cell per step in a Python loop.
    h = nn.embedding(params["embed"], x)
    for i in range(num_layers):
        p = params[f"lstm_{i}"]
        state = nn.lstm_initial_state(x.shape[0], p["w"].shape[1] // 4)
        outs = []
        for t in range(x.shape[1]):
            o, state = nn.lstm_cell(p, h[:, t], state)
            outs.append(o)
        h = nn.dense(params[f"proj_{i}"], jnp.tanh(jnp.stack(outs, 1)))
    if shared:
        return h @ params["embed"]["embeddings"].T + params["output_bias"]
    return nn.dense(params["dense"], h)


@pytest.mark.parametrize("num_layers, shared", [(1, False), (2, True)])
def test_stackoverflow_forward_matches_step_loop(num_layers, shared):
    model = stackoverflow_lstm(vocab_size=5, embed_size=3, hidden_size=4,
                               num_layers=num_layers, share_input_output_embeddings=shared)
    params = _numpy_params(model, scale=2.0)
    x = jnp.array([[BOS, 3, 4, 8, 0], [BOS, 7, 7, 5, 6]])
    logits = jax.jit(model.apply)(params, {"x": x, "y": x})
    assert logits.shape == (2, 5, 9)
    np.testing.assert_allclose(logits, _reference_forward(params, x, num_layers, shared),
                               rtol=1e-5, atol=1e-6)


def _hand_ce(logits, targets):
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits).sum(-1))
    return lse - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]


def test_stackoverflow_loss_and_metrics_by_hand():
    # V = 3 words: ids 3, 4, 5; OOV = 6; 7 ids in all.
    model = stackoverflow_lstm(vocab_size=3, embed_size=2, hidden_size=3)
    oov = 6
    y = jnp.array([[3, oov, 4, EOS, PAD],    # 4 tokens, ends with EOS, one OOV
                   [5, 5, 3, 4, oov],        # 5 tokens, truncated (no EOS), one OOV
                   [PAD] * 5])               # empty
    batch = {"x": jnp.zeros_like(y).at[:, 0].set(BOS), "y": y}
    params = _numpy_params(model)
    logits = jax.jit(model.apply)(params, batch)
    ce = _hand_ce(logits, y) * np.asarray(y != PAD)
    np.testing.assert_allclose(model.loss(batch, logits), ce.sum(-1), rtol=1e-5)
    half = stackoverflow_lstm(vocab_size=3, embed_size=2, hidden_size=3, expected_length=2.0)
    np.testing.assert_allclose(half.loss(batch, logits), ce.sum(-1) / 2, rtol=1e-5)

    m = jax.jit(model.metrics)(batch, logits)
    assert set(m) == {"accuracy_in_vocab", "accuracy_no_eos", "sequence_length",
                      "sequence_loss", "token_loss", "token_oov_rate", "truncation_rate",
                      "loss", "accuracy"}
    np.testing.assert_allclose(m["token_loss"][0], ce.sum(-1), rtol=1e-5)
    np.testing.assert_array_equal(m["token_loss"][1], [4, 5, 0])
    np.testing.assert_array_equal(m["sequence_loss"][1], [1, 1, 0])
    np.testing.assert_array_equal(np.stack(m["sequence_length"]), [[4, 5, 0], [1, 1, 0]])
    np.testing.assert_array_equal(np.stack(m["token_oov_rate"]), [[1, 1, 0], [4, 5, 0]])
    np.testing.assert_array_equal(np.stack(m["truncation_rate"]), [[0, 1, 0], [1, 1, 0]])

    # Forced predictions: OOV (logit 5) everywhere, word 4 second (logit 1).
    forced = jnp.zeros((3, 5, 7)).at[..., oov].set(5.0).at[..., 4].set(1.0)
    m = jax.jit(model.metrics)(batch, forced)
    # No EOS / PAD targets counted: row 0 [3, oov, 4] -> OOV right once; row 1 at t4.
    np.testing.assert_array_equal(np.stack(m["accuracy_no_eos"]), [[1, 1, 0], [3, 5, 0]])
    np.testing.assert_array_equal(np.stack(m["accuracy"]), [[1, 1, 0], [3, 5, 0]])
    # In vocab: PAD, BOS, EOS, OOV never predicted, so 4 is: row 0 t2, row 1 t3.
    np.testing.assert_array_equal(np.stack(m["accuracy_in_vocab"]), [[1, 1, 0], [3, 5, 0]])
    forced2 = forced.at[1, 0, 5].set(2.0)  # row 1, t0: 5 beats 4 in vocab, not OOV
    m = jax.jit(model.metrics)(batch, forced2)
    np.testing.assert_array_equal(m["accuracy_in_vocab"][0], [1, 2, 0])
    np.testing.assert_array_equal(m["accuracy_no_eos"][0], [1, 1, 0])


def test_stackoverflow_gradients_custom_vjp_match_autodiff():
    kw = dict(vocab_size=5, embed_size=3, hidden_size=4)
    autodiff = nn.resolve_kernels("auto")._replace(lstm_custom_vjp=False)
    fast, plain = stackoverflow_lstm(**kw), stackoverflow_lstm(**kw, kernels=autodiff)
    params = _numpy_params(fast, scale=2.0)
    batch = {"x": jnp.array([[BOS, 3, 4, 8], [BOS, 7, 5, 0]]),
             "y": jnp.array([[3, 4, 8, EOS], [7, 5, EOS, PAD]])}

    def loss(model, p):
        return jnp.mean(model.loss(batch, model.apply(p, batch, train=True)))

    g1 = jax.jit(jax.grad(lambda p: loss(fast, p)))(params)
    g2 = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
    assert jax.tree.structure(g1) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The PAD target of row 1 gets no gradient through the output bias.
    assert float(jnp.abs(g1["dense"]["b"]).sum()) > 0


# ------------------------------------------------------------------------- ResNet


def test_conv_same_matches_lax_same_padding():
    rng = np.random.default_rng(0)
    for size, k, stride, cin, cout in [(24, 7, 2, 3, 4), (7, 3, 2, 2, 3), (6, 1, 1, 4, 2)]:
        x = jnp.asarray(rng.normal(size=(2, size, size, cin)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
        ref = lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=lax.Precision.HIGHEST)
        assert ref.shape[1] == -(-size // stride)
        for impl in ("lax", "im2col"):
            conv = jax.jit(lambda w, x: R.conv_same(w, x, stride, impl=impl))
            np.testing.assert_allclose(conv(w, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [12, 7])
def test_max_pool_same_matches_reduce_window(size):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, size, size, 3)), jnp.float32)
    ref = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
    got = R.max_pool_same(x, 3, 2)
    assert got.shape == ref.shape == (2, -(-size // 2), -(-size // 2), 3)
    np.testing.assert_array_equal(got, ref)


def test_group_norm_by_hand():
    x = np.random.default_rng(2).normal(size=(2, 3, 3, 4)).astype(np.float32) * 3 + 1
    scale = np.array([1.0, 2.0, 0.5, -1.0], np.float32)
    offset = np.array([0.0, 1.0, -1.0, 2.0], np.float32)
    got = R.group_norm({"scale": scale, "offset": offset}, x, groups=2, epsilon=1e-3)
    want = np.empty_like(x)
    for b in range(2):
        for g in range(2):  # channels (0, 1) and (2, 3)
            part = x[b, :, :, 2 * g:2 * g + 2].astype(np.float64)
            want[b, :, :, 2 * g:2 * g + 2] = (part - part.mean()) / np.sqrt(part.var() + 1e-3)
    np.testing.assert_allclose(got, want * scale + offset, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(R.group_norm({}, x, 2), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        R.group_norm({}, x, groups=3)


def test_resnet18_layout():
    params = jax.eval_shape(R.resnet18().init, jax.random.key(0))
    assert params["stem"]["conv"].shape == (7, 7, 3, 64)
    assert "norm_0" not in params["stage_0_block_0"]  # the first block starts with a conv
    assert "shortcut_conv" not in params["stage_0_block_1"]
    assert params["stage_1_block_0"]["shortcut_conv"].shape == (1, 1, 64, 128)
    assert params["stage_3_block_1"]["conv_1"].shape == (3, 3, 512, 512)
    assert params["dense"]["w"].shape == (512, 100)
    assert params["final_norm"]["scale"].shape == (512,)
    assert len([k for k in params if k.startswith("stage_")]) == 8


def test_thin_resnet_forward_and_gradients_both_conv_paths():
    # Two stages cover every kind of block: no pre-norm (first), identity shortcut,
    # projection shortcut.
    kw = dict(num_classes=5, repetitions=(2, 1), initial_filters=4)
    m_lax, m_col = R.resnet(**kw, conv_impl="lax"), R.resnet(**kw, conv_impl="im2col")
    params = _numpy_params(m_lax, seed=4)
    assert "shortcut_conv" in params["stage_1_block_0"]
    rng = np.random.default_rng(3)
    batch = {"x": jnp.asarray(rng.normal(size=(2, 24, 24, 3)), jnp.float32),
             "y": jnp.array([1, 4])}

    def loss(model, p):
        logits = model.apply(p, batch, train=True)
        return jnp.mean(model.loss(batch, logits)), logits

    def value_and_grad(model):
        return jax.jit(jax.value_and_grad(lambda p: loss(model, p), has_aux=True))(params)

    (l_lax, out), g_lax = value_and_grad(m_lax)
    (l_col, out_col), g_col = value_and_grad(m_col)
    assert out.shape == (2, 5) and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out_col, out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(l_col, l_lax, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_col), jax.tree.leaves(g_lax)):
        assert a.shape == b.shape
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b) + 1e-6
    m = m_lax.metrics(batch, out)
    assert set(m) == {"loss", "accuracy"} and m["loss"][0].shape == (2,)


def test_resnet_init_and_no_affine_on_32x32():
    model = R.resnet(num_classes=3, repetitions=(1, 1), initial_filters=2, affine=False,
                     conv_impl="lax")
    params = jax.jit(model.init)(jax.random.key(1))
    assert params["stem"]["norm"] == {}
    # He-normal kernels (std sqrt(2 / fan_in), truncated at 2 std), N(0, 0.01^2) dense.
    w = np.asarray(params["stage_1_block_0"]["conv_1"])  # fan_in 3*3*4, 144 values
    stddev = math.sqrt(2 / 36) / 0.87962566103423978
    assert 0.6 < w.std() / math.sqrt(2 / 36) < 1.4 and np.abs(w).max() <= 2 * stddev + 1e-6
    assert float(jnp.std(params["dense"]["w"])) < 0.03
    np.testing.assert_array_equal(params["dense"]["b"], 0.0)
    out = jax.jit(model.apply)(params, {"x": jnp.ones((1, 32, 32, 3))})
    assert out.shape == (1, 3)
    affine = jax.eval_shape(R.resnet(num_classes=3, repetitions=(1, 1), initial_filters=2).init,
                            jax.random.key(1))
    assert affine["stem"]["norm"]["scale"].shape == (2,)


def test_cifar100_logistic_shapes():
    model = R.cifar100_logistic()
    out = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0)),
                         {"x": jax.ShapeDtypeStruct((5, 24, 24, 3), jnp.float32)})
    assert out.shape == (5, 100)


# ------------------------------------------------------------------ metric parts


def test_top_k_accuracy_like_fedjax():
    logits = jnp.array([[0.0, 0.5, 0.2]] * 3)
    np.testing.assert_array_equal(M.top_k_accuracy(logits, jnp.array([2, 0, 1]), 2), [1, 0, 1])
    np.testing.assert_array_equal(M.top_k_accuracy(logits, jnp.array([2, 0, 1]), 0), [0, 0, 0])
    np.testing.assert_array_equal(M.top_k_accuracy(logits, jnp.array([2, 0, 1]), 3), [1, 1, 1])
    # Ties go to the lower index: classes 0 and 1 tie, top-1 is class 0.
    tie = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(M.top_k_accuracy(tie, jnp.array([0, 1]), 1), [1, 0])


def test_sequence_token_top_k_like_fedjax():
    # FedJAX SequenceTokenTopKAccuracy docstring example: (3 correct, 5 counted).
    y = jnp.array([[1, 2, 2, 1, 3, 0]])
    logits = jnp.array([[[0, 1, 0.5, 0], [1, 0.5, 0, 0], [0.8, 0, 0.7, 0],
                         [0.5, 1, 0, 0], [0, 0.5, 0, 1], [0.5, 0, 0.9, 0]]])
    mask = jnp.array([0.0, 0.0, 0.0, -jnp.inf])
    np.testing.assert_array_equal(M.sequence_token_top_k_correct(logits, y, 2, (0,), mask), [3])
    np.testing.assert_array_equal(M.sequence_token_count(y, (0,)), [5])
    # k = 1 equals the argmax token accuracy.
    np.testing.assert_array_equal(M.sequence_token_top_k_correct(logits, y, 1, (0,), mask),
                                  M.sequence_token_correct(logits, y, (0,), mask))


def test_sequence_length_truncation_nonempty():
    y = jnp.array([[1, 2, 2, 3, 3, 3, 4], [1, 2, 2, 3, 3, 3, 3], [0, 0, 0, 0, 0, 0, 0],
                   [1, 2, 3, 4, 0, 0, 0]])
    np.testing.assert_array_equal(M.sequence_nonempty(y), [1, 1, 0, 1])
    np.testing.assert_array_equal(np.stack(M.sequence_truncation_rate(y, 4)),
                                  [[0, 1, 0, 0], [1, 1, 0, 1]])
    np.testing.assert_array_equal(np.stack(M.sequence_length(y)), [[7, 7, 0, 4], [1, 1, 0, 1]])
