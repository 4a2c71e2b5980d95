"""The native LSTM recurrence (fedjax_core.models.native.lstm) against the pure-JAX one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_core.client import masked_mean_loss
from fedjax_core.models import native, nn
from fedjax_core.models.shakespeare_lstm import shakespeare_lstm

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native kernels unavailable: {native.reason()}")


def _inputs(seed=0, t=7, b=3, h=5):
    rng = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: jnp.asarray(rng.normal(size=s) * scale, jnp.float32)  # noqa: E731
    return f(t, b, 4 * h), f(h, 4 * h, scale=0.5), f(b, h), f(b, h)


def _objective(rec):
    def value(xp, w, h0, c0):
        hs, h, c = rec(xp, w, h0, c0)
        return jnp.sum(jnp.sin(hs)) + jnp.sum(h ** 2) + 3.0 * jnp.sum(c)
    return value


def _native(*args):
    from fedjax_core.models.native import lstm  # noqa: PLC0415
    return lstm.lstm_recurrence(*args)


def test_forward_and_gradients_match_pure_jax():
    args = _inputs()
    for got, want in zip(jax.jit(_native)(*args), nn._lstm_recurrence(*args)):
        assert float(jnp.abs(want).max()) > 0.1
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grad = lambda rec: jax.jit(jax.grad(_objective(rec), argnums=(0, 1, 2, 3)))  # noqa: E731
    for got, want in zip(grad(_native)(*args), grad(nn._lstm_recurrence)(*args)):
        assert float(jnp.abs(want).max()) > 0.1
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# 136 hidden units: the recurrence splits them 72 / 64 between the calling thread and a task
# on XLA's thread pool (halves of at least 64 units; smaller layers run on one thread).
_SPLIT_CODE = """
import hashlib, jax, jax.numpy as jnp, numpy as np
from fedjax_core.models.native import lstm
rng = np.random.default_rng(11)
f = lambda *s, scale=1.0: jnp.asarray(rng.normal(size=s) * scale, jnp.float32)
args = (f(6, 3, 4 * 136), f(136, 4 * 136, scale=0.1), f(3, 136), f(3, 136))
def value(xp, w, h0, c0):
    hs, h, c = lstm.lstm_recurrence(xp, w, h0, c0)
    return jnp.sum(jnp.sin(hs)) + jnp.sum(h ** 2) + 3.0 * jnp.sum(c)
outs = [*jax.jit(lstm.lstm_recurrence)(*args), *jax.jit(jax.grad(value, (0, 1, 2, 3)))(*args)]
from fedjax_core.models import native
split = native._load()["lib"].fedjax_native_lstm_split_count
split.restype = __import__("ctypes").c_int64
print(split(), hashlib.sha256(b"".join(np.asarray(o).tobytes() for o in outs)).hexdigest())
"""


def test_a_sequence_split_over_two_threads_is_the_one_thread_result_bit_for_bit():
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    def run(threads):
        env = {**os.environ, "FEDJAX_NATIVE_THREADS": threads, "JAX_PLATFORMS": "cpu"}
        splits, digest = subprocess.run([sys.executable, "-c", _SPLIT_CODE], env=env,
                                        check=True, capture_output=True,
                                        text=True).stdout.split()[-2:]
        return int(splits), digest

    (two_splits, two), (one_splits, one) = run("0"), run("1")
    assert two == one
    assert one_splits == 0
    if (os.cpu_count() or 1) >= 2:  # XLA's pool has a second thread: the calls did split
        assert two_splits > 0


def test_split_recurrence_matches_pure_jax():
    rng = np.random.default_rng(12)
    f = lambda *s, scale=1.0: jnp.asarray(rng.normal(size=s) * scale, jnp.float32)  # noqa: E731
    args = (f(6, 3, 4 * 136), f(136, 4 * 136, scale=0.1), f(3, 136), f(3, 136))
    for got, want in zip(jax.jit(_native)(*args), nn._lstm_recurrence(*args)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grad = lambda rec: jax.jit(jax.grad(_objective(rec), argnums=(0, 1, 2, 3)))  # noqa: E731
    for got, want in zip(grad(_native)(*args), grad(nn._lstm_recurrence)(*args)):
        assert float(jnp.abs(want).max()) > 0.1
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_second_order_through_the_native_recurrence():
    # Reverse-over-reverse differentiates the native calls through their pure-JAX JVPs.
    xp, w, h0, c0 = _inputs(1, t=4, b=2, h=3)

    def grad_norm(rec):
        return jax.grad(lambda w: jnp.sum(jax.grad(_objective(rec), argnums=1)(xp, w, h0, c0) ** 2))

    want = grad_norm(nn._lstm_recurrence)(w)
    assert float(jnp.abs(want).max()) > 0.1
    np.testing.assert_allclose(grad_norm(_native)(w), want, rtol=1e-5, atol=1e-4)


def test_vmap_with_shared_and_batched_operands():
    xp, w, h0, c0 = _inputs(2)
    xps, h0s = jnp.stack([xp, 2.0 * xp]), jnp.stack([h0, 0.0 * h0])
    axes = (0, None, 0, None)
    got = jax.jit(jax.vmap(_native, in_axes=axes))(xps, w, h0s, c0)
    want = jax.vmap(nn._lstm_recurrence, in_axes=axes)(xps, w, h0s, c0)
    for g, v in zip(got, want):
        assert g.shape[0] == 2
        np.testing.assert_allclose(g, v, rtol=1e-5, atol=1e-5)
    gw = jax.vmap(jax.grad(_objective(_native), argnums=1), in_axes=axes)(xps, w, h0s, c0)
    ww = jax.vmap(jax.grad(_objective(nn._lstm_recurrence), argnums=1), in_axes=axes)(
        xps, w, h0s, c0)
    np.testing.assert_allclose(gw, ww, rtol=1e-5, atol=1e-5)


def test_sgd_steps_inside_fori_loop():
    xp, w, h0, c0 = _inputs(3)

    def run(rec):
        def body(i, w):
            return w - 0.1 * jax.grad(_objective(rec), argnums=1)(xp * (1.0 + i), w, h0, c0)
        return jax.jit(lambda w: jax.lax.fori_loop(0, 3, body, w))(w)

    want = run(nn._lstm_recurrence)
    assert float(jnp.abs(want - w).max()) > 0.01
    np.testing.assert_allclose(run(_native), want, rtol=1e-5, atol=1e-5)


def test_shakespeare_model_native_vs_plain_kernels():
    kw = dict(vocab_size=12, embed_size=3, hidden_size=8)
    fast = shakespeare_lstm(**kw, kernels=nn.Kernels.cpu())
    pure = shakespeare_lstm(**kw, kernels=nn.Kernels.cpu(native_lstm=False))
    assert nn.Kernels.cpu().native_lstm and not nn.Kernels.plain().native_lstm
    rng = np.random.default_rng(4)
    batch = {"x": jnp.asarray(rng.integers(1, 12, (3, 6))),
             "y": jnp.asarray(rng.integers(0, 12, (3, 6)))}
    mask = jnp.ones(3, bool)
    params = pure.init(jax.random.key(0))
    jaxpr = str(jax.make_jaxpr(lambda p: fast.apply(p, batch))(params))
    assert jaxpr.count("fedjax_lstm_forward") == 2 and "scan[" not in jaxpr

    def value_and_grad(model):
        return jax.jit(jax.value_and_grad(
            lambda p: masked_mean_loss(model, p, batch, mask, None, train=True)))(params)

    (lf, gf), (lp, gp) = value_and_grad(fast), value_and_grad(pure)
    np.testing.assert_allclose(lf, lp, rtol=1e-5)
    assert float(jnp.abs(gp["lstm_0"]["w"]).max()) > 1e-3
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gp)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
