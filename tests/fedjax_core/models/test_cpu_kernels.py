"""Tests for fedjax_core.models.cpu_kernels and the build-time kernel choice (nn.Kernels)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_core.models import cpu_kernels, native, nn
from fedjax_core.models.base import masked_mean_loss
from fedjax_core.models.emnist_cnn import emnist_cnn
from fedjax_core.models.linear import mlp
from fedjax_core.models.shakespeare_lstm import shakespeare_lstm


def _numpy_params(model, seed=0):
    # Random params of the right shapes without running the (slow to compile) init.
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return jax.tree.map(lambda s: jnp.asarray(
        rng.normal(size=s.shape) / math.sqrt(math.prod(s.shape[:-1]) or 1), s.dtype), shapes)


def _tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------ the kernel choice


def test_resolve_kernels_names_and_auto_by_backend():
    assert nn.Kernels.plain() == (jnp.dot, jax.random.bernoulli, False, False, False)
    # The native convolution and LSTM are on exactly when the library loads
    # (FEDJAX_NATIVE=0 turns them off).
    assert nn.Kernels.cpu() == (cpu_kernels.matmul, cpu_kernels.bernoulli, True,
                                native.available(), native.available())
    assert nn.Kernels.cpu(native_conv=False).native_conv is False
    assert nn.Kernels.cpu(native_lstm=False).native_lstm is False
    assert nn.Kernels.cpu(lstm_custom_vjp=False).native_lstm is False
    assert nn.resolve_kernels("plain") == nn.Kernels.plain()
    assert nn.resolve_kernels("cpu") == nn.Kernels.cpu()
    assert nn.resolve_kernels("auto", backend="cpu") == nn.Kernels.cpu()
    # Elsewhere: jax's own dot and bernoulli, the LSTM's hand-written gradient (as before).
    assert nn.resolve_kernels("auto", backend="gpu") == nn.Kernels.plain(lstm_custom_vjp=True)
    assert nn.resolve_kernels("auto") == nn.resolve_kernels("auto", jax.default_backend())
    custom = nn.Kernels.cpu(lstm_custom_vjp=False)
    assert nn.resolve_kernels(custom) is custom
    with pytest.raises(ValueError, match="kernels must be 'auto', 'plain', 'cpu'"):
        nn.resolve_kernels("fast")
    with pytest.raises(TypeError, match="resolve_kernels"):
        nn.dense({"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}, jnp.ones((1, 2)), kernels="cpu")


def test_models_take_their_kernels_when_built():
    # Two models with different kernels side by side, no global switch: the CPU kernels
    # appear in the traced model as custom-VJP calls, the plain ones do not.
    batch = {"x": jnp.ones((3, 4)), "y": jnp.array([0, 1, 0])}

    def custom_vjp_calls(model):
        params = _numpy_params(model)
        return str(jax.make_jaxpr(lambda p: model.apply(p, batch))(params)).count("custom_vjp")

    fast, plain = mlp((4,), (5,), num_classes=2, kernels="cpu"), mlp((4,), (5,), num_classes=2,
                                                                     kernels="plain")
    assert custom_vjp_calls(fast) == 2 and custom_vjp_calls(plain) == 0
    auto = mlp((4,), (5,), num_classes=2)
    assert custom_vjp_calls(auto) == (2 if jax.default_backend() == "cpu" else 0)
    assert not hasattr(nn, "set_fast_cpu_gradients")


def test_emnist_cnn_cpu_and_plain_kernels_agree():
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.uniform(size=(3, 28, 28, 1)), jnp.float32),
             "y": jnp.array([3, 7, 61])}
    mask = jnp.array([True, True, False])
    fast, plain = emnist_cnn(kernels="cpu"), emnist_cnn(kernels="plain")
    params = _numpy_params(fast)
    key = jax.random.key(4)

    def loss_logits_grad(model):
        def loss(p):
            logits = model.apply(p, batch, key=key, train=True)
            m = mask.astype(jnp.float32)
            return jnp.sum(model.loss(batch, logits) * m) / jnp.sum(m), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (l_fast, y_fast), g_fast = loss_logits_grad(fast)
    (l_plain, y_plain), g_plain = loss_logits_grad(plain)
    # Forward (training path: the same dropout bits), loss and gradient.
    np.testing.assert_allclose(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_fast, l_plain, rtol=1e-5, atol=1e-5)
    assert float(l_plain) > 1.0
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_plain))


# -------------------------------------------------------------------- forward mode


def test_forward_mode_on_a_plain_cnn_and_documented_behaviour_otherwise():
    rng = np.random.default_rng(1)
    batch = {"x": jnp.asarray(rng.uniform(size=(2, 28, 28, 1)), jnp.float32),
             "y": jnp.array([5, 9])}
    mask = jnp.ones(2, bool)
    plain, fast = emnist_cnn(kernels="plain"), emnist_cnn(kernels="cpu")
    params = _numpy_params(plain)
    key = jax.random.key(0)

    def loss_of(model):
        return lambda p: masked_mean_loss(model, p, batch, mask, key, train=True)

    v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), params)
    # jax.jvp on the plain model: the directional derivative is <grad, v>.
    _, tangent = jax.jit(lambda p, v: jax.jvp(loss_of(plain), (p,), (v,)))(params, v)
    want = _tree_vdot(jax.jit(jax.grad(loss_of(fast)))(params), v)
    np.testing.assert_allclose(tangent, want, rtol=1e-4, atol=1e-6)
    assert abs(float(want)) > 1e-3

    # jax.hessian over the first conv's bias (32 x 32; its gradient passes through every
    # layer): symmetric, and H @ u is the reverse-over-reverse HVP along u.
    def loss_b(model):
        return lambda b: loss_of(model)({**params, "conv_0": {**params["conv_0"], "b": b}})

    b0 = params["conv_0"]["b"]
    hess = jax.jit(jax.hessian(loss_b(plain)))(b0)
    assert hess.shape == (32, 32)
    np.testing.assert_allclose(hess, hess.T, rtol=1e-4, atol=1e-6)
    u = jnp.asarray(rng.normal(size=32), jnp.float32)
    hu = jax.jit(jax.grad(lambda b: jnp.vdot(jax.grad(loss_b(fast))(b), u)))(b0)
    assert float(jnp.linalg.norm(hu)) > 1e-4
    np.testing.assert_allclose(hess @ u, hu, rtol=1e-4, atol=1e-5)
    # The CPU kernels: forward mode on the loss itself raises JAX's error naming it.
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(loss_of(fast), (params,), (v,))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jacfwd(loss_b(fast))(b0)


def test_cpu_kernels_allow_forward_over_reverse():
    # Documented: jax.hessian (jacfwd of jacrev) differentiates the hand-written backward
    # pass, so it works with the CPU kernels and equals the plain model's Hessian.
    batch = {"x": jnp.asarray(np.random.default_rng(5).normal(size=(6, 4)), jnp.float32),
             "y": jnp.array([0, 1, 2, 1, 0, 2])}
    mask = jnp.ones(6, bool)
    plain = mlp((4,), (5,), num_classes=3, kernels="plain")
    fast = mlp((4,), (5,), num_classes=3, kernels="cpu")
    params = _numpy_params(plain, seed=3)

    def loss_w(model):
        return lambda w: masked_mean_loss(
            model, {**params, "dense_0": {**params["dense_0"], "w": w}}, batch, mask, None)

    w0 = params["dense_0"]["w"]
    h_plain, h_fast = (jax.jit(jax.hessian(loss_w(m)))(w0) for m in (plain, fast))
    assert h_plain.shape == (4, 5, 4, 5) and float(jnp.abs(h_plain).max()) > 1e-3
    np.testing.assert_allclose(h_fast, h_plain, rtol=1e-5, atol=1e-6)
    v = jnp.ones_like(w0)
    hvp = jax.jit(lambda w, v: jax.jvp(jax.grad(loss_w(fast)), (w,), (v,))[1])(w0, v)
    np.testing.assert_allclose(hvp, jnp.tensordot(h_plain, v, 2), rtol=1e-5, atol=1e-6)


def test_forward_mode_through_a_plain_lstm():
    batch = {"x": jnp.array([[1, 5, 6, 7], [1, 8, 3, 0]]),
             "y": jnp.array([[5, 6, 7, 2], [8, 3, 2, 0]])}
    mask = jnp.ones(2, bool)
    kw = dict(vocab_size=10, embed_size=3, hidden_size=4)
    plain, fast = shakespeare_lstm(**kw, kernels="plain"), shakespeare_lstm(**kw, kernels="cpu")
    params = _numpy_params(plain, seed=2)
    v = jax.tree.map(jnp.ones_like, params)

    def loss_of(model):
        return lambda p: masked_mean_loss(model, p, batch, mask, None, train=True)

    _, tangent = jax.jit(lambda p, v: jax.jvp(loss_of(plain), (p,), (v,)))(params, v)
    np.testing.assert_allclose(tangent, _tree_vdot(jax.jit(jax.grad(loss_of(fast)))(params), v),
                               rtol=1e-5, atol=1e-6)
    assert abs(float(tangent)) > 1e-4
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(loss_of(fast), (params,), (v,))


# ------------------------------------------------------------------------ dropout


@pytest.mark.parametrize("shape", [(7,), (20, 12, 12, 64), (3, 5, 2), ()])
@pytest.mark.parametrize("rate", [0.25, 0.5, 0.1, 1e-3, 1 / 3])
def test_dropout_mask_is_jax_bernoulli_bit_for_bit(shape, rate):
    # The unrolled Threefry reproduces jax.random.bernoulli exactly, so switching to it
    # changed no run's numbers; typed, raw and folded keys, eager and jitted.
    keys = [jax.random.key(3), jax.random.fold_in(jax.random.key(1), 7), jax.random.PRNGKey(5)]
    for key in keys:
        expected = jax.random.bernoulli(key, 1.0 - rate, shape)
        np.testing.assert_array_equal(cpu_kernels.bernoulli(key, 1.0 - rate, shape), expected)
        jitted = jax.jit(cpu_kernels.bernoulli, static_argnums=(1, 2))(key, 1.0 - rate, shape)
        np.testing.assert_array_equal(jitted, expected)
    x = jnp.arange(1.0, 1.0 + math.prod(shape)).reshape(shape)
    want = jnp.where(jax.random.bernoulli(keys[0], 1.0 - rate, shape), x / (1.0 - rate), 0.0)
    np.testing.assert_array_equal(
        nn.dropout(x, rate, keys[0], train=True, kernels=nn.Kernels.cpu()), want)
    np.testing.assert_array_equal(nn.dropout(x, rate, keys[0], train=True), want)


def test_dropout_mask_under_vmap_and_other_key_impls():
    keys = jax.random.split(jax.random.key(0), 4)
    got = jax.vmap(lambda k: cpu_kernels.bernoulli(k, 0.75, (5, 6)))(keys)
    want = jax.vmap(lambda k: jax.random.bernoulli(k, 0.75, (5, 6)))(keys)
    np.testing.assert_array_equal(got, want)
    # rbg keys take jax.random.bernoulli itself.
    rbg = jax.random.key(0, impl="rbg")
    assert cpu_kernels._threefry_key_data(rbg) is None
    np.testing.assert_array_equal(cpu_kernels.bernoulli(rbg, 0.5, (9,)),
                                  jax.random.bernoulli(rbg, 0.5, (9,)))


def test_threefry_matches_the_published_known_answer():
    # Random123's known-answer vectors for Threefry-2x32 with 20 rounds.
    u32 = lambda v: jnp.asarray(v, jnp.uint32)  # noqa: E731
    out = cpu_kernels.threefry2x32(u32(0x13198A2E), u32(0x03707344), u32(0x243F6A88),
                                   u32(0x85A308D3))
    assert [int(v) for v in out] == [0xC4923A9C, 0x483DF7A0]
    out = cpu_kernels.threefry2x32(u32(0), u32(0), u32(0), u32(0))
    assert [int(v) for v in out] == [0x6B200159, 0x99BA4EFE]


# ------------------------------------------------------------------------- matmul


@pytest.mark.parametrize("x_shape, w_shape", [
    ((7, 5, 3), (3, 4)),      # few rows: dW^T = dY^T X
    ((2, 40), (40, 6)),       # few rows, wide input: dW = (X^T) dY
    ((64, 3), (3, 2)),
])
def test_matmul_gradients_equal_plain_dot(x_shape, w_shape):
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)

    def loss(dot):
        return lambda x, w: jnp.sum(jnp.sin(dot(x, w)))

    np.testing.assert_allclose(cpu_kernels.matmul(x, w), jnp.dot(x, w), rtol=1e-6)
    got = jax.grad(loss(cpu_kernels.matmul), (0, 1))(x, w)
    want = jax.grad(loss(jnp.dot), (0, 1))(x, w)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    # vmap over a leading client axis and reverse-over-reverse.
    xs = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(
        jax.vmap(jax.grad(loss(cpu_kernels.matmul), 1), (0, None))(xs, w),
        jax.vmap(jax.grad(loss(jnp.dot), 1), (0, None))(xs, w), rtol=1e-5, atol=1e-5)

    def second(dot):
        return jax.grad(lambda w: jnp.sum(jax.grad(loss(dot), 1)(x, w) ** 2))(w)

    np.testing.assert_allclose(second(cpu_kernels.matmul), second(jnp.dot),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_shape, w_shape", [((7, 5, 3), (3, 4)), ((2, 40), (40, 6))])
def test_matmul_fused_input_equals_matmul(x_shape, w_shape):
    # Behind dropout, as in the EMNIST CNN: values are matmul's bits; the weight gradient
    # is the same up to float summation order (the same bits when X has 20 rows, as in the
    # CNN); vmap and second order work.
    kx, kw, kd = jax.random.split(jax.random.key(1), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)

    def loss(dot):
        def f(x, w):
            dropped = jnp.where(cpu_kernels.bernoulli(kd, 0.75, x.shape), x / 0.75, 0.0)
            return jnp.sum(jnp.sin(dot(jax.nn.relu(dropped), w)))
        return f

    plain, fused = loss(cpu_kernels.matmul), loss(cpu_kernels.matmul_fused_input)
    np.testing.assert_array_equal(cpu_kernels.matmul_fused_input(x, w), cpu_kernels.matmul(x, w))
    for g, e in zip(jax.jit(jax.grad(fused, (0, 1)))(x, w), jax.jit(jax.grad(plain, (0, 1)))(x, w)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.grad(fused, 1)(x, w), jax.grad(loss(jnp.dot), 1)(x, w),
                               rtol=1e-5, atol=1e-5)
    xs = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(jax.vmap(jax.grad(fused, 1), (0, None))(xs, w),
                               jax.vmap(jax.grad(plain, 1), (0, None))(xs, w), rtol=1e-5, atol=1e-5)

    def second(f):
        return jax.grad(lambda w: jnp.sum(jax.grad(f, 1)(x, w) ** 2))(w)

    np.testing.assert_allclose(second(fused), second(loss(jnp.dot)), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU compilation check")
def test_emnist_cnn_first_dense_gradient_reads_its_input_in_place():
    # Few rows, wide input: matmul materialises X^T (no dot contracting dim 0 of a
    # [rows, 9216] operand); matmul_fused_input contracts X's rows where they lie.
    x, w = jnp.ones((20, 9216)), jnp.ones((9216, 128))
    assert _weight_grad_dots(cpu_kernels.matmul, x, w) == []
    assert _weight_grad_dots(cpu_kernels.matmul_fused_input, x, w)
    from fedjax_core.models.emnist_cnn import emnist_cnn
    model = emnist_cnn(kernels="cpu")
    params = model.init(jax.random.key(0))
    batch = {"x": jnp.ones((4, 28, 28, 1)), "y": jnp.zeros((4,), jnp.int32)}
    text = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, batch, jax.random.key(1),
                                                          train=True)))).lower(
        params).compile().as_text()
    assert any(" dot(" in line and "f32[9216,128]" in line.split("=")[1][:20]
               and "lhs_contracting_dims={0}" in line for line in text.splitlines())


def _weight_grad_dots(dot, x, w) -> list[str]:
    """Dots of the compiled weight gradient that contract the lhs's leading axis."""
    text = jax.jit(jax.grad(lambda w: jnp.sum(dot(x, w)))).lower(w).compile().as_text()
    return [line for line in text.splitlines()
            if " dot(" in line and "lhs_contracting_dims={0}" in line]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU compilation check")
def test_matmul_weight_gradient_avoids_leading_axis_contraction():
    # The reason matmul exists: plain autodiff gives XLA:CPU a dot contracting the
    # leading axis (Eigen, ~2x slower than YNNPACK for EMNIST's conv2 im2col shape).
    x, w = jnp.ones((2 * 24 * 24, 288)), jnp.ones((288, 64))
    assert _weight_grad_dots(jnp.dot, x, w), "plain autodiff no longer gives the slow dot"
    assert _weight_grad_dots(cpu_kernels.matmul, x, w) == []


def test_matmul_refuses_forward_mode_and_plain_dot_allows_it():
    x, w = jnp.ones((2, 3)), jnp.ones((3, 2))
    _, tangent = jax.jvp(lambda w: nn.Kernels.plain().matmul(x, w), (w,), (w,))
    np.testing.assert_allclose(tangent, jnp.full((2, 2), 3.0))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda w: cpu_kernels.matmul(x, w), (w,), (w,))
