"""Tests for fedjax_core.models.nn: layers against hand computations and references."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_core.models import nn


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_dense_init_is_truncated_normal_with_zero_bias():
    p = nn.dense_init(jax.random.key(0), 400, 300)
    assert p["w"].shape == (400, 300) and p["b"].shape == (300,)
    std = 1 / math.sqrt(400)
    assert float(jnp.max(jnp.abs(p["w"]))) <= 2 * std + 1e-7
    # std of N(0,1) truncated to [-2, 2] is 0.8796.
    assert abs(float(jnp.std(p["w"])) / std - 0.8796) < 0.01
    np.testing.assert_array_equal(p["b"], 0.0)


def test_dense_values():
    p = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.array([0.5, -1.0])}
    np.testing.assert_allclose(nn.dense(p, jnp.array([[1.0, 1.0]])), [[4.5, 5.0]])


@pytest.mark.parametrize("kernels", [None, nn.Kernels.cpu()])
@pytest.mark.parametrize("kernel,strides", [((3, 3), (1, 1)), ((2, 3), (1, 1)),
                                            ((3, 3), (2, 2))])
def test_im2col_conv_matches_lax_conv_forward_and_gradients(kernel, strides, kernels):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 7, 8, 3)), jnp.float32)
    p = {"w": jnp.asarray(rng.normal(size=(*kernel, 3, 4)) / 5, jnp.float32),
         "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}

    def f(impl):
        def out(p, x):
            return nn.conv2d(p, x, impl=impl, strides=strides, kernels=kernels)
        return jax.jit(out)

    y_lax = f("lax")(p, x)
    y_col = f("im2col")(p, x)
    assert y_lax.shape == y_col.shape
    assert _rel_err(y_col, y_lax) < 1e-5
    np.testing.assert_allclose(y_col, y_lax, rtol=1e-5, atol=1e-5)

    cot = jnp.asarray(rng.normal(size=y_lax.shape), jnp.float32)

    def grads(impl):
        return jax.jit(jax.grad(lambda p, x: jnp.sum(f(impl)(p, x) * cot),
                                argnums=(0, 1)))(p, x)

    (gp_lax, gx_lax), (gp_col, gx_col) = grads("lax"), grads("im2col")
    assert _rel_err(gp_col["w"], gp_lax["w"]) < 1e-5
    assert _rel_err(gp_col["b"], gp_lax["b"]) < 1e-5
    assert _rel_err(gx_col, gx_lax) < 1e-5


def test_conv_auto_picks_im2col_only_for_cpu_training():
    p = nn.conv2d_init(jax.random.key(0), 1, 2)
    x = jnp.ones((1, 5, 5, 1))

    def uses_conv(**kw):
        return "conv_general_dilated" in str(jax.make_jaxpr(
            lambda p, x: nn.conv2d(p, x, **kw))(p, x))

    assert uses_conv(impl="lax", train=True)
    assert not uses_conv(impl="im2col", train=False)
    assert uses_conv(impl="auto", train=False)
    assert uses_conv(impl="auto", train=True) == (jax.default_backend() != "cpu")
    with pytest.raises(ValueError):
        nn.conv2d(p, x, impl="fft")


def test_conv_hand_case():
    # 1 channel, 2x2 kernel of ones: each output is the sum of a 2x2 window, plus bias.
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    p = {"w": jnp.ones((2, 2, 1, 1)), "b": jnp.array([1.0])}
    for impl in ("lax", "im2col"):
        y = nn.conv2d(p, x, impl=impl)
        np.testing.assert_allclose(y[0, :, :, 0], [[0 + 1 + 3 + 4 + 1, 1 + 2 + 4 + 5 + 1],
                                                   [3 + 4 + 6 + 7 + 1, 4 + 5 + 7 + 8 + 1]])


@pytest.mark.parametrize("impl", ["auto", "reduce_window", "reshape"])
def test_max_pool_hand_case(impl):
    x = jnp.arange(25.0).reshape(1, 5, 5, 1)  # VALID: the last row and column are dropped
    np.testing.assert_array_equal(nn.max_pool(x, impl=impl)[0, :, :, 0],
                                  [[6.0, 8.0], [16.0, 18.0]])


def test_max_pool_impls_agree_in_value_and_gradient():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 7, 6, 3)), jnp.float32)
    cot = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 3, 3)), jnp.float32)

    def f(impl):
        return jax.jit(jax.value_and_grad(lambda x: jnp.sum(nn.max_pool(x, impl=impl) * cot)))

    (v1, g1), (v2, g2) = f("reduce_window")(x), f("reshape")(x)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_array_equal(g1, g2)
    # Overlapping windows fall back to reduce_window.
    assert nn.max_pool(x, window=3, stride=1).shape == (2, 5, 4, 3)
    with pytest.raises(ValueError):
        nn.max_pool(x, window=3, stride=1, impl="reshape")


def test_max_pool_reshape_gradient_is_jnp_max_rule_bit_for_bit():
    # Ties everywhere (relu zeros, repeated integers): the reshape form's own JVP must give
    # jnp.max's values and derivatives exactly, in reverse and forward mode, jitted.
    rng = np.random.default_rng(7)
    x = jnp.asarray(np.maximum(rng.integers(-2, 3, size=(3, 8, 6, 4)), 0), jnp.float32)
    x = x.at[0, 0:2, 0:2, 0].set(0.0).at[0, 0:2, 2:4, 0].set(jnp.array([[2.0, 1.0], [2.0, 0.0]]))
    cot = jnp.asarray(rng.normal(size=(3, 4, 3, 4)), jnp.float32)
    tan = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def reference(x):
        return jnp.max(x.reshape(3, 4, 2, 3, 2, 4), axis=(2, 4))

    def pooled(x):
        return nn.max_pool(x, impl="reshape")

    (v_ref, g_ref), (v, g) = (jax.jit(jax.value_and_grad(lambda x, f=f: jnp.sum(f(x) * cot)))(x)
                              for f in (reference, pooled))
    np.testing.assert_array_equal(v, v_ref)
    np.testing.assert_array_equal(g, g_ref)
    # A tie of four zeros splits the cotangent in quarters, one of two in halves.
    np.testing.assert_allclose(g[0, 0:2, 0:2, 0], np.full((2, 2), cot[0, 0, 0, 0] / 4))
    np.testing.assert_allclose(g[0, 0:2, 2:4, 0], [[cot[0, 0, 1, 0] / 2, 0.0],
                                                    [cot[0, 0, 1, 0] / 2, 0.0]])
    (_, t_ref), (_, t) = (jax.jit(lambda x, t, f=f: jax.jvp(f, (x,), (t,)))(x, tan)
                          for f in (reference, pooled))
    np.testing.assert_array_equal(t, t_ref)
    # Second order (forward over reverse) runs through the rule.
    hvp = jax.jvp(jax.grad(lambda x: jnp.sum(pooled(x) ** 2)), (x,), (tan,))[1]
    hvp_ref = jax.jvp(jax.grad(lambda x: jnp.sum(reference(x) ** 2)), (x,), (tan,))[1]
    np.testing.assert_array_equal(hvp, hvp_ref)


def test_embedding_lookup_and_init():
    p = nn.embedding_init(jax.random.key(0), 90, 8)
    assert p["embeddings"].shape == (90, 8)
    assert float(jnp.max(jnp.abs(p["embeddings"]))) <= 2.0
    table = {"embeddings": jnp.arange(6.0).reshape(3, 2)}
    np.testing.assert_array_equal(nn.embedding(table, jnp.array([[2, 0]])),
                                  [[[4.0, 5.0], [0.0, 1.0]]])


def _sig(z):
    return 1 / (1 + math.exp(-z))


def test_lstm_cell_zero_weights_by_hand():
    # All gates pre-activations are 0: c' = sigmoid(1) * c + 0.5 * tanh(0), h' = 0.5 tanh(c').
    p = {"w": jnp.zeros((2, 4)), "b": jnp.zeros((4,))}
    state = nn.LSTMState(hidden=jnp.array([[0.7]]), cell=jnp.array([[1.0]]))
    h, new = nn.lstm_cell(p, jnp.array([[0.3]]), state)
    c = _sig(1.0)
    np.testing.assert_allclose(new.cell, [[c]], rtol=1e-6)
    np.testing.assert_allclose(h, [[0.5 * math.tanh(c)]], rtol=1e-6)
    np.testing.assert_array_equal(h, new.hidden)


def test_lstm_cell_hidden_one_by_hand():
    # input 1, hidden 1; rows of w: [x, h]; columns: gates i, g, f, o.
    w = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]
    b = [0.0, 0.1, -1.0, 0.2]
    x, h0, c0 = 0.5, 0.2, 0.3
    i, g, f, o = (x * w[0][k] + h0 * w[1][k] + b[k] for k in range(4))
    c1 = _sig(f + 1) * c0 + _sig(i) * math.tanh(g)
    h1 = _sig(o) * math.tanh(c1)
    p = {"w": jnp.array(w), "b": jnp.array(b)}
    h, new = nn.lstm_cell(p, jnp.array([[x]]), nn.LSTMState(jnp.array([[h0]]), jnp.array([[c0]])))
    np.testing.assert_allclose(new.cell, [[c1]], rtol=1e-6)
    np.testing.assert_allclose(h, [[h1]], rtol=1e-6)


def _naive_unroll(params, xs, state):
    hs = []
    for t in range(xs.shape[1]):
        h, state = nn.lstm_cell(params, xs[:, t], state)
        hs.append(h)
    return jnp.stack(hs, axis=1), state


def test_lstm_init_layout_matches_haiku_counts():
    p = nn.lstm_init(jax.random.key(0), 8, 256)
    assert p["w"].shape == (264, 1024) and p["b"].shape == (1024,)


@pytest.mark.parametrize("custom_vjp", [True, False])
def test_hoisted_lstm_unroll_equals_naive_loop(custom_vjp):
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(4 + 6, 24)) / 3, jnp.float32),
              "b": jnp.asarray(0.1 * rng.normal(size=(24,)), jnp.float32)}
    xs = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
    s0 = nn.LSTMState(hidden=jnp.asarray(rng.normal(size=(3, 6)), jnp.float32),
                      cell=jnp.asarray(rng.normal(size=(3, 6)), jnp.float32))
    unroll = functools.partial(nn.lstm_unroll, custom_vjp=custom_vjp)
    hs, final = jax.jit(unroll)(params, xs, s0)
    hs_ref, final_ref = jax.jit(_naive_unroll)(params, xs, s0)
    assert hs.shape == (3, 5, 6)
    np.testing.assert_allclose(hs, hs_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(final.hidden, final_ref.hidden, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(final.cell, final_ref.cell, rtol=1e-5, atol=1e-6)
    # Zero initial state by default.
    hs0, _ = jax.jit(unroll)(params, xs)
    hs0_ref, _ = jax.jit(_naive_unroll)(params, xs, nn.lstm_initial_state(3, 6))
    np.testing.assert_allclose(hs0, hs0_ref, rtol=1e-5, atol=1e-6)

    # The same gradients w.r.t. params, inputs and initial state, through every output.
    def objective(f):
        def obj(p, xs, s0):
            hs, final = f(p, xs, s0)
            return jnp.sum(jnp.sin(hs)) + jnp.sum(final.hidden * 2.0) + jnp.sum(final.cell ** 2)
        return jax.jit(jax.grad(obj, argnums=(0, 1, 2)))

    g = objective(unroll)(params, xs, s0)
    g_ref = objective(_naive_unroll)(params, xs, s0)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert _rel_err(a, b) < 1e-5


def test_lstm_custom_vjp_second_order_and_vmap():
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.normal(size=(2 + 3, 12)) / 2, jnp.float32),
              "b": jnp.zeros((12,), jnp.float32)}
    xs = jnp.asarray(rng.normal(size=(2, 4, 2)), jnp.float32)

    def loss(p, xs, custom_vjp):
        return jnp.sum(nn.lstm_unroll(p, xs, custom_vjp=custom_vjp)[0] ** 2)

    def grad_norm(p, custom_vjp):  # reverse-over-reverse
        g = jax.grad(loss)(p, xs, custom_vjp)
        return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g))

    gg = jax.jit(jax.grad(grad_norm), static_argnums=1)
    for a, b in zip(jax.tree.leaves(gg(params, True)), jax.tree.leaves(gg(params, False))):
        assert _rel_err(a, b) < 1e-4
    # vmap over a stack of clients' params.
    stacked = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), params)
    vg = jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, None, None)), static_argnums=2)
    for a, b in zip(jax.tree.leaves(vg(stacked, xs, True)),
                    jax.tree.leaves(vg(stacked, xs, False))):
        assert _rel_err(a, b) < 1e-5


def test_lstm_unroll_is_one_scan():
    params = nn.lstm_init(jax.random.key(0), 2, 3)
    for custom_vjp in (True, False):
        jaxpr = str(jax.make_jaxpr(lambda p, x: nn.lstm_unroll(p, x, custom_vjp=custom_vjp))(
            params, jnp.ones((1, 7, 2))))
        assert jaxpr.count("scan[") == 1


@pytest.mark.parametrize("kernels", [None, nn.Kernels.cpu()])
def test_dropout_zeroes_rate_fraction_and_rescales(kernels):
    x = jnp.ones((100_000,))
    y = nn.dropout(x, 0.3, jax.random.key(0), train=True, kernels=kernels)
    zero_frac = float(jnp.mean(y == 0))
    assert abs(zero_frac - 0.3) < 0.01
    np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)
    assert abs(float(jnp.mean(y)) - 1.0) < 0.02


@pytest.mark.parametrize("kernels", [None, nn.Kernels.cpu()])
def test_dropout_identity_cases_and_errors(kernels):
    drop = functools.partial(nn.dropout, kernels=kernels)
    x = jnp.arange(4.0)
    np.testing.assert_array_equal(drop(x, 0.5, jax.random.key(0), train=False), x)
    np.testing.assert_array_equal(drop(x, 0.5, None, train=False), x)
    np.testing.assert_array_equal(drop(x, 0.0, None, train=True), x)
    np.testing.assert_array_equal(drop(x, 1.0, jax.random.key(0), train=True), 0.0)
    with pytest.raises(ValueError):
        drop(x, 0.5, None, train=True)
    # Same key, same mask; different keys, different masks.
    a = drop(jnp.ones(64), 0.5, jax.random.key(1), True)
    b = drop(jnp.ones(64), 0.5, jax.random.key(1), True)
    c = drop(jnp.ones(64), 0.5, jax.random.key(2), True)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
