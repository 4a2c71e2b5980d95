"""Mixed precision (`with_precision`): f32 is the model itself; bf16 computes in bfloat16 with
f32 params, outputs and gradients, close to f32; FedAvg under bf16 equals a plain loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.data import pack_cohort
from fedjax_core.models import nn
from fedjax_core.models.base import masked_mean_loss
from fedjax_core.models.emnist_cnn import emnist_cnn
from fedjax_core.models.linear import classification_loss, classification_metrics
from fedjax_core.models.precision import Policy, policy, precision_of, with_precision
from fedjax_core.models.resnet import group_norm, resnet
from fedjax_core.models.shakespeare_lstm import shakespeare_lstm
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients

RNG = np.random.default_rng(0)
IMAGES = {"x": RNG.normal(size=(4, 28, 28, 1)).astype(np.float32),
          "y": RNG.integers(0, 62, 4).astype(np.int32)}
TOKENS = RNG.integers(3, 90, (3, 12)).astype(np.int32)
SEQUENCES = {"x": TOKENS, "y": np.roll(TOKENS, -1, axis=1)}


def matmul_dtypes(fn, *args) -> set[tuple[str, ...]]:
    """The operand dtypes of every dot and convolution in `fn`'s jaxpr, sub-jaxprs included."""
    found: set[tuple[str, ...]] = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def quick_params(model):
    """Params of `model.init`'s shapes and scales (weights `N(0, 1 / fan_in)`, biases
    `N(0, 0.01^2)`), drawn by numpy: no initialiser to compile."""
    rng = np.random.default_rng(1)

    def draw(s):
        std = 0.01 if len(s.shape) < 2 else float(np.prod(s.shape[:-1])) ** -0.5
        return jnp.asarray(std * rng.normal(size=s.shape), s.dtype)
    return jax.tree.map(draw, jax.eval_shape(model.init, jax.random.key(0)))


def loss_and_grad(model, batch, train=True):
    """`params -> (masked mean loss, its gradient)` on `batch`, jitted."""
    mask = jnp.ones(batch["y"].shape[0], bool)
    return jax.jit(jax.value_and_grad(
        lambda p: masked_mean_loss(model, p, batch, mask, jax.random.key(1), train=train)))


def relative_error(a, b) -> float:
    diff = sum(float(jnp.sum(jnp.square(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                                  jax.tree.leaves(b)))
    return (diff / sum(float(jnp.sum(jnp.square(y))) for y in jax.tree.leaves(b))) ** 0.5


def test_policies():
    assert policy("bf16") == Policy(jnp.float32, jnp.bfloat16, jnp.float32)
    assert policy("f32").name == "f32" and policy("bf16").name == "bf16"
    with pytest.raises(ValueError, match="precision must be one of f32, bf16, got 'fp16'"):
        policy("fp16")
    tree = {"w": jnp.ones(2), "ids": jnp.arange(2), "mask": jnp.ones(2, bool)}
    cast = policy("bf16").cast_to_compute(tree)
    assert [str(cast[k].dtype) for k in ("w", "ids", "mask")] == ["bfloat16", "int32", "bool"]


def test_f32_is_the_model_itself():
    model = emnist_cnn()
    assert with_precision(model, "f32") is model
    bf16 = with_precision(model, "bf16")
    assert precision_of(bf16) == "bf16" and precision_of(model) == "f32"
    assert with_precision(bf16, "bf16") is bf16  # never wrapped twice
    assert with_precision(bf16, "f32").apply is model.apply  # unwrapped, not wrapped in f32
    assert with_precision(bf16, "f32") == model


def test_bf16_resnet_computes_in_bfloat16():
    model = with_precision(resnet(10, (1,), 4, groups=2), "bf16")
    batch = {"x": IMAGES["x"][:2, :8, :8].repeat(3, -1), "y": IMAGES["y"][:2] % 10}
    params = quick_params(model)
    mask = jnp.ones(2, bool)
    grad_fn = jax.grad(lambda p: masked_mean_loss(model, p, batch, mask, None, train=True))
    assert matmul_dtypes(grad_fn, params) == {("bfloat16", "bfloat16")}
    assert {str(g.dtype) for g in jax.tree.leaves(jax.eval_shape(grad_fn, params))} == {"float32"}
    assert jax.eval_shape(model.apply, params, batch).dtype == jnp.float32


def test_group_norm_keeps_f32_statistics_for_bf16():
    x = 1000.0 + jnp.arange(2 * 2 * 2 * 4, dtype=jnp.float32).reshape(2, 2, 2, 4) / 8
    y32 = group_norm({}, x, groups=2)
    y16 = group_norm({}, x.astype(jnp.bfloat16), groups=2)
    assert y16.dtype == jnp.bfloat16
    # The bf16 inputs (1000 + k/8, rounded to steps of 4) normalise in f32 to what their
    # own f32 values give; a mean and variance taken in bf16 would not.
    np.testing.assert_allclose(np.asarray(y16, np.float32),
                               group_norm({}, x.astype(jnp.bfloat16).astype(jnp.float32),
                                          groups=2), atol=1e-2)
    assert y32.dtype == jnp.float32


def flax_model():
    linen = pytest.importorskip("flax.linen")
    from fedjax_core.models.adapters import from_flax

    class MLP(linen.Module):
        @linen.compact
        def __call__(self, x, train: bool = False):
            h = linen.relu(linen.Dense(16)(x.reshape(x.shape[0], -1)))
            return linen.Dense(62)(h)

    return from_flax(MLP(), {"x": IMAGES["x"][:1]}, classification_loss, classification_metrics)


@pytest.mark.parametrize("make, batch", [
    (emnist_cnn, IMAGES),
    # The pure-JAX recurrence: the native one (Kernels.native_lstm) computes in f32 whatever
    # the policy (tests/fedjax_core/models/test_native_lstm.py).
    (lambda: shakespeare_lstm(hidden_size=16, kernels=nn.Kernels.cpu(native_lstm=False)),
     SEQUENCES),
    (flax_model, IMAGES),
], ids=["emnist_cnn", "shakespeare_lstm", "flax"])
def test_bf16_step_is_close_to_f32_with_f32_params_and_grads(make, batch):
    model = make()
    bf16 = with_precision(model, "bf16")
    params = quick_params(bf16)
    assert {str(a.dtype) for a in jax.tree.leaves(params)} == {"float32"}
    f32_fn, bf16_fn = loss_and_grad(model, batch), loss_and_grad(bf16, batch)
    loss32, grads32 = f32_fn(params)
    loss16, grads16 = bf16_fn(params)
    assert loss16.dtype == jnp.float32
    assert {str(g.dtype) for g in jax.tree.leaves(grads16)} == {"float32"}
    # Every product of the forward and the backward pass (im2col conv, dense, the LSTM's
    # recurrence and its hand-written gradient) is bf16 x bf16; without the policy, f32.
    mask = jnp.ones(batch["y"].shape[0], bool)
    def grad_fn(m):
        return jax.grad(lambda p: masked_mean_loss(m, p, batch, mask, jax.random.key(1)))
    assert matmul_dtypes(grad_fn(bf16), params) == {("bfloat16", "bfloat16")}
    assert matmul_dtypes(grad_fn(model), params) == {("float32", "float32")}
    np.testing.assert_allclose(loss16, loss32, rtol=1e-2)
    # The gradient rounds (bfloat16 keeps 8 mantissa bits, 2^-9 relative per value; the
    # first layers' gradients, sums that cancel a lot, lose most) but points the same way.
    assert 0 < relative_error(grads16, grads32) < 0.1
    # One SGD step with each lowers the (f32) loss by the same amount within 1e-2; the
    # learning rate is set for a first-order gain of 5% of the loss.
    lr = 0.05 * float(loss32) / sum(float(jnp.vdot(g, g)) for g in jax.tree.leaves(grads32))
    def after_step(grads):
        return f32_fn(optax.apply_updates(params, jax.tree.map(lambda g: -lr * g, grads)))[0]
    gain32, gain16 = loss32 - after_step(grads32), loss32 - after_step(grads16)
    assert gain32 > 0
    np.testing.assert_allclose(gain16, gain32, rtol=1e-2)


def test_fedavg_bf16_round_equals_plain_loop():
    """FedAvg under the bf16 policy against the paper's loop with the casts written out."""
    model = tiny_softmax_model()
    data = unequal_clients()
    client_opt, server_opt = optax.sgd(0.3), optax.sgd(0.7, momentum=0.9)
    alg = fedavg(client_opt, server_opt)
    params = model.init(jax.random.key(1))
    bf16 = jnp.bfloat16

    def grad_fn(w, batch):  # forward and backward in bf16, the f32 master weights' gradient
        def loss(p):
            logits = batch["x"].astype(bf16) @ p["w"].astype(bf16) + p["b"].astype(bf16)
            return jnp.mean(model.loss(batch, logits.astype(jnp.float32)))
        return jax.grad(loss)(w)

    def reference_round(w, cohort, server_state):
        deltas, weights = [], []
        for c in range(cohort.num_clients):
            wc, opt_state = w, client_opt.init(w)
            for s in range(cohort.num_steps):
                m = cohort.mask[c, s]
                if m.any():
                    batch = {k: jnp.asarray(v[c, s][m]) for k, v in cohort.batches.items()}
                    updates, opt_state = client_opt.update(grad_fn(wc, batch), opt_state, wc)
                    wc = optax.apply_updates(wc, updates)
            deltas.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), w, wc))
            weights.append(float(cohort.num_examples[c]))
        mean = jax.tree.map(lambda *ds: sum(n * d for n, d in zip(weights, ds)) / sum(weights),
                            *deltas)
        updates, server_state = server_opt.update(mean, server_state, w)
        return optax.apply_updates(w, updates), server_state

    state, ref, ref_server = alg.init(params), params, server_opt.init(params)
    f32_state = state
    step = jit_round(alg, with_precision(model, "bf16"))
    f32_step = jit_round(alg, model)
    for r in range(2):
        cohort = pack_cohort(data, [4, 0, 2, 1], batch_size=2, epochs=2, seed=3, round_num=r)
        state, _ = step(state, cohort, jax.random.key(r))
        f32_state, _ = f32_step(f32_state, cohort, jax.random.key(r))
        ref, ref_server = reference_round(ref, cohort, ref_server)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-3, rtol=2e-3),
                     state.params, ref)
    assert {str(a.dtype) for a in jax.tree.leaves(state)} <= {"float32", "int32"}
    # ... and the bf16 round is not the f32 one: it really rounds.
    assert not np.allclose(state.params["w"], f32_state.params["w"], atol=1e-6, rtol=0)


def equinox_model():
    eqx = pytest.importorskip("equinox")
    from fedjax_core.models.adapters import from_equinox

    return from_equinox(lambda k: eqx.nn.MLP(3, 4, 8, 1, key=k), classification_loss,
                        classification_metrics)


def test_bf16_equinox_model_computes_in_bfloat16():
    """Equinox params are a module with None leaves: the casts go through them."""
    model = equinox_model()
    bf16 = with_precision(model, "bf16")
    batch = {"x": RNG.normal(size=(6, 3)).astype(np.float32), "y": np.arange(6) % 4}
    params = model.init(jax.random.key(0))
    mask = jnp.ones(6, bool)
    def grad_fn(m):
        return jax.grad(lambda p: masked_mean_loss(m, p, batch, mask, jax.random.key(1)))
    assert matmul_dtypes(grad_fn(bf16), params) == {("bfloat16", "bfloat16")}
    grads16, grads32 = jax.jit(grad_fn(bf16))(params), jax.jit(grad_fn(model))(params)
    assert {str(g.dtype) for g in jax.tree.leaves(grads16)} == {"float32"}
    assert 0 < relative_error(grads16, grads32) < 3e-2
    assert bf16.apply(params, batch).dtype == jnp.float32


def test_layers_keep_bfloat16_forward_and_backward():
    """Every layer of `nn` maps bf16 inputs and params to bf16, and back-propagates bf16
    cotangents (JAX does not check a custom VJP's cotangent dtypes: an f32 one would pass)."""
    from fedjax_core.models import cpu_kernels, nn

    bf16 = jnp.bfloat16
    key = jax.random.key(0)
    x = jnp.ones((2, 6, 6, 3), bf16)

    def params(w_shape):  # bf16 params of a layer (the values do not matter: dtypes only)
        return {"w": jnp.ones(w_shape, bf16), "b": jnp.zeros(w_shape[-1:], bf16)}
    layers = {
        "dense": (params((3, 4)), lambda p, x: nn.dense(p, x, kernels=nn.Kernels.cpu())),
        "conv_im2col": (params((3, 3, 3, 4)), lambda p, x: nn.conv2d(
            p, x, impl="im2col", kernels=nn.Kernels.cpu())),
        "conv_lax": (params((3, 3, 3, 4)), lambda p, x: nn.conv2d(p, x, impl="lax")),
        "max_pool": ({}, lambda p, x: nn.max_pool(x, 3, 1) + nn.max_pool(x, 2, 2).mean()),
        "dropout": ({}, lambda p, x: nn.dropout(x, 0.25, key, True, kernels=nn.Kernels.cpu())),
        "lstm": (params((8, 20)), lambda p, x: nn.lstm_unroll(p, x[:, 0])[0]),
        "lstm_autodiff": (params((8, 20)),
                          lambda p, x: nn.lstm_unroll(p, x[:, 0], custom_vjp=False)[0]),
    }
    for name, (params, layer) in layers.items():
        assert jax.eval_shape(layer, params, x).dtype == bf16, name
        grads = jax.eval_shape(jax.grad(lambda p, x: layer(p, x).astype(jnp.float32).sum(),
                                        argnums=(0, 1)), params, x)
        assert {str(g.dtype) for g in jax.tree.leaves(grads)} == {"bfloat16"}, name
    table = {"embeddings": jnp.ones((5, 3), bf16)}
    assert jax.eval_shape(nn.embedding, table, jnp.arange(4)).dtype == bf16
    # cpu_kernels.matmul with mixed operands gives each cotangent its primal's dtype.
    dx, dw = jax.eval_shape(jax.grad(lambda x, w: cpu_kernels.matmul(x, w).sum(), argnums=(0, 1)),
                            jnp.ones((4, 3), bf16), jnp.ones((3, 2), jnp.float32))
    assert (dx.dtype, dw.dtype) == (bf16, jnp.float32)
