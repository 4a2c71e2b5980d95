"""Flax and Equinox models through `from_flax` / `from_equinox`: same logits as plain JAX,
and one FedAvg round equal to the plain per-client Python loop."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.data import pack_cohort
from fedjax_core.models.adapters import from_equinox, from_flax
from fedjax_core.models.linear import classification_loss, classification_metrics
from tests.fedjax_core.algorithms.test_fedavg import reference_round
from tests.fedjax_core.helpers import unequal_clients

eqx = pytest.importorskip("equinox")
linen = pytest.importorskip("flax.linen")

FEATURES, HIDDEN, CLASSES = 3, 5, 4
X = np.random.default_rng(0).normal(size=(6, FEATURES)).astype(np.float32)


class FlaxMLP(linen.Module):
    dropout: float = 0.0

    @linen.compact
    def __call__(self, x, train: bool = False):
        h = linen.relu(linen.Dense(HIDDEN)(x))
        h = linen.Dropout(self.dropout, deterministic=not train)(h)
        return linen.Dense(CLASSES)(h)


class FlaxDeterministicMLP(linen.Module):
    """Takes `deterministic` (the other Flax convention) instead of `train`."""

    @linen.compact
    def __call__(self, x, deterministic: bool = True):
        h = linen.relu(linen.Dense(HIDDEN)(x))
        h = linen.Dropout(0.5, deterministic=deterministic)(h)
        return linen.Dense(CLASSES)(h)


class EqxDropoutMLP(eqx.Module):
    first: eqx.nn.Linear
    drop: eqx.nn.Dropout
    last: eqx.nn.Linear

    def __init__(self, key, p=0.5):
        k1, k2 = jax.random.split(key)
        self.first = eqx.nn.Linear(FEATURES, HIDDEN, key=k1)
        self.drop = eqx.nn.Dropout(p)
        self.last = eqx.nn.Linear(HIDDEN, CLASSES, key=k2)

    def __call__(self, x, *, key=None):
        return self.last(self.drop(jax.nn.relu(self.first(x)), key=key))


def flax_model(module=None):
    return from_flax(module or FlaxMLP(), {"x": X[:1]}, classification_loss,
                     classification_metrics)


def eqx_model():
    return from_equinox(lambda k: eqx.nn.MLP(FEATURES, CLASSES, HIDDEN, 1, key=k),
                        classification_loss, classification_metrics)


def plain_mlp(w0, b0, w1, b1, x):
    return jax.nn.relu(x @ w0 + b0) @ w1 + b1


def test_flax_logits_equal_plain_jax():
    model = flax_model()
    params = model.init(jax.random.key(0))
    assert jax.tree.map(jnp.shape, params) == {
        "Dense_0": {"kernel": (FEATURES, HIDDEN), "bias": (HIDDEN,)},
        "Dense_1": {"kernel": (HIDDEN, CLASSES), "bias": (CLASSES,)}}
    d0, d1 = params["Dense_0"], params["Dense_1"]
    expected = plain_mlp(d0["kernel"], d0["bias"], d1["kernel"], d1["bias"], X)
    np.testing.assert_allclose(model.apply(params, {"x": X}), expected, atol=1e-6)
    # Same weights through jit, and params of another key differ.
    np.testing.assert_allclose(jax.jit(model.apply)(params, {"x": X}), expected, atol=1e-6)
    other = model.init(jax.random.key(1))
    assert not np.allclose(other["Dense_0"]["kernel"], d0["kernel"])


def test_equinox_logits_equal_plain_jax():
    model = eqx_model()
    params = jax.jit(model.init)(jax.random.key(0))  # Server.create jits init
    l0, l1 = params.layers
    assert l0.weight.shape == (HIDDEN, FEATURES) and params.activation is None  # static out
    expected = plain_mlp(l0.weight.T, l0.bias, l1.weight.T, l1.bias, X)
    np.testing.assert_allclose(model.apply(params, {"x": X}), expected, atol=1e-6)
    np.testing.assert_allclose(jax.jit(model.apply)(params, {"x": X}), expected, atol=1e-6)
    reference = eqx.nn.MLP(FEATURES, CLASSES, HIDDEN, 1, key=jax.random.key(0))
    np.testing.assert_allclose(jax.vmap(reference)(X), expected, atol=1e-6)


def test_default_metrics_are_the_mean_loss():
    model = from_flax(FlaxMLP(), {"x": X[:1]}, classification_loss)
    params = model.init(jax.random.key(0))
    batch = {"x": X, "y": np.arange(6, dtype=np.int32) % CLASSES}
    num, den = model.metrics(batch, model.apply(params, batch))["loss"]
    np.testing.assert_allclose(num, classification_loss(batch, model.apply(params, batch)))
    np.testing.assert_array_equal(den, np.ones(6))


@pytest.mark.parametrize("make", [flax_model, eqx_model], ids=["flax", "equinox"])
def test_fedavg_round_equals_plain_loop(make):
    model = make()
    data = unequal_clients()  # 5 clients, 3 features, 4 classes
    client_opt, server_opt = optax.sgd(0.3), optax.sgd(0.7, momentum=0.9)
    alg = fedavg(client_opt, server_opt)
    params = model.init(jax.random.key(1))
    state, ref, ref_server = alg.init(params), params, server_opt.init(params)
    step = jit_round(alg, model)
    for r in range(2):
        cohort = pack_cohort(data, [4, 0, 2, 1], batch_size=2, epochs=2, seed=3, round_num=r)
        state, metrics = step(state, cohort, jax.random.key(r))
        ref, ref_server = reference_round(model, ref, cohort, client_opt, server_opt, ref_server)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                     state.params, ref)
    assert jax.tree.structure(state.params) == jax.tree.structure(params)
    assert not np.allclose(jax.tree.leaves(state.params)[0], jax.tree.leaves(params)[0])
    assert float(metrics["train/num_examples"]) == 4 + 5 + 9 + 2


def _dropout_checks(model):
    params = model.init(jax.random.key(0))
    x = {"x": np.repeat(X[:1], 16, axis=0)}  # 16 copies of one example
    evaluate = model.apply(params, x)
    np.testing.assert_allclose(model.apply(params, x, key=jax.random.key(3)), evaluate)
    a = model.apply(params, x, key=jax.random.key(3), train=True)
    b = model.apply(params, x, key=jax.random.key(3), train=True)
    c = model.apply(params, x, key=jax.random.key(4), train=True)
    np.testing.assert_array_equal(a, b)  # the key decides the dropout mask
    assert not np.allclose(a, evaluate) and not np.allclose(a, c)
    assert len({tuple(np.round(row, 5)) for row in np.asarray(a)}) > 1  # one mask per example
    # One FedAvg round trains through the dropout path.
    data = unequal_clients()
    alg = fedavg(optax.sgd(0.3), optax.sgd(1.0))
    cohort = pack_cohort(data, [0, 1, 2], batch_size=2, epochs=1, seed=0, round_num=0)
    state, metrics = jit_round(alg, model)(alg.init(params), cohort, jax.random.key(0))
    assert np.isfinite(float(metrics["train/loss"]))


def test_flax_dropout_follows_train_and_key():
    _dropout_checks(flax_model(FlaxMLP(dropout=0.5)))


def test_flax_deterministic_argument():
    _dropout_checks(flax_model(FlaxDeterministicMLP()))


def test_equinox_dropout_follows_train_and_key():
    _dropout_checks(from_equinox(EqxDropoutMLP, classification_loss))


def test_equinox_batched_module():
    class Batched(eqx.Module):
        linear: eqx.nn.Linear

        def __init__(self, key):
            self.linear = eqx.nn.Linear(FEATURES, CLASSES, key=key)

        def __call__(self, x):  # a whole batch, no key argument
            return x @ self.linear.weight.T + self.linear.bias

    model = from_equinox(Batched, classification_loss, per_example=False)
    params = model.init(jax.random.key(0))
    np.testing.assert_allclose(model.apply(params, {"x": X}, key=jax.random.key(0), train=True),
                               X @ params.linear.weight.T + params.linear.bias, atol=1e-6)


def test_flax_refuses_mutable_collections():
    class WithBatchNorm(linen.Module):
        @linen.compact
        def __call__(self, x, train: bool = False):
            return linen.BatchNorm(use_running_average=not train)(linen.Dense(CLASSES)(x))

    model = from_flax(WithBatchNorm(), {"x": X[:1]}, classification_loss)
    with pytest.raises(ValueError, match=r"\['batch_stats'\].*GroupNorm or LayerNorm"):
        model.init(jax.random.key(0))


def test_wrong_objects_are_refused_with_the_fix():
    with pytest.raises(TypeError, match="flax.linen.Module instance, got function"):
        from_flax(lambda x: x, {"x": X}, classification_loss)
    with pytest.raises(TypeError, match="not an equinox.Module.*make_with_state"):
        from_equinox(lambda k: eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch"),
                     classification_loss)
    with pytest.raises(ValueError, match="no feature 'pixels'.*inputs="):
        from_flax(FlaxMLP(), {"x": X}, classification_loss, inputs="pixels")


@pytest.mark.parametrize("adapter, modules, extra", [
    (lambda: from_flax(None, {}, classification_loss), ["flax", "flax.linen"], "flax"),
    (lambda: from_equinox(None, classification_loss), ["equinox"], "equinox"),
])
def test_missing_package_names_the_extra(monkeypatch, adapter, modules, extra):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    with pytest.raises(ImportError, match=rf"pip install 'fedjax-sim\[{extra}\]'"):
        adapter()
