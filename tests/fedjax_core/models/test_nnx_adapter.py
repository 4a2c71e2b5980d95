"""Flax NNX models through `from_nnx`: plain-dict params, FedAvg equal to the same network
written as a plain `Model`, dropout keyed by the step key, BatchNorm refused or opted in."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.data import pack_cohort
from fedjax_core.models.adapters import from_nnx
from fedjax_core.models.base import Model
from fedjax_core.models.linear import classification_loss, classification_metrics
from tests.fedjax_core.helpers import unequal_clients

nnx = pytest.importorskip("flax.nnx")

FEATURES, HIDDEN, CLASSES = 3, 5, 4
X = np.random.default_rng(0).normal(size=(6, FEATURES)).astype(np.float32)


class MLP(nnx.Module):
    """Two dense layers in an `nnx.List`, with optional dropout between them."""

    def __init__(self, rngs, dropout: float = 0.0):
        self.layers = nnx.List([nnx.Linear(FEATURES, HIDDEN, rngs=rngs),
                                nnx.Linear(HIDDEN, CLASSES, rngs=rngs)])
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x):
        return self.layers[1](self.dropout(nnx.relu(self.layers[0](x))))


class WithBatchNorm(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(FEATURES, CLASSES, rngs=rngs)
        self.norm = nnx.BatchNorm(CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.dense(x))


def nnx_model(dropout: float = 0.0) -> Model:
    return from_nnx(lambda rngs: MLP(rngs, dropout), classification_loss, classification_metrics)


def plain_model(init) -> Model:
    """The same network in plain JAX, on the same params dict."""
    def apply(params, batch, key=None, train=False):
        d0, d1 = params["layers"]["0"], params["layers"]["1"]
        return jax.nn.relu(batch["x"] @ d0["kernel"] + d0["bias"]) @ d1["kernel"] + d1["bias"]

    return Model(init=init, apply=apply, loss=classification_loss,
                 metrics=classification_metrics)


def test_params_are_a_plain_dict_of_the_param_state():
    model = nnx_model()
    params = jax.jit(model.init)(jax.random.key(0))  # Server.create jits init
    assert jax.tree.map(jnp.shape, params) == {"layers": {
        "0": {"kernel": (FEATURES, HIDDEN), "bias": (HIDDEN,)},
        "1": {"kernel": (HIDDEN, CLASSES), "bias": (CLASSES,)}}}
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params))
    reference = MLP(nnx.Rngs(jax.random.key(0)))  # the factory with the same key
    np.testing.assert_array_equal(params["layers"]["0"]["kernel"], reference.layers[0].kernel[...])
    expected = plain_model(model.init).apply(params, {"x": X})
    np.testing.assert_allclose(model.apply(params, {"x": X}), expected, atol=1e-6)
    np.testing.assert_allclose(reference(X), expected, atol=1e-6)
    other = model.init(jax.random.key(1))
    assert not np.allclose(other["layers"]["0"]["kernel"], params["layers"]["0"]["kernel"])


def test_fedavg_equals_the_plain_model():
    """Two FedAvg rounds of the NNX model equal the same network as a plain Model (same
    init params) to 1e-6, on clients of unequal sizes."""
    model = nnx_model()
    plain = plain_model(model.init)
    data = unequal_clients()  # 5 clients, 3 features, 4 classes
    alg = fedavg(optax.sgd(0.3), optax.sgd(0.7, momentum=0.9))
    params = model.init(jax.random.key(1))
    states = [alg.init(params), alg.init(params)]
    steps = [jit_round(alg, model), jit_round(alg, plain)]
    for r in range(2):
        cohort = pack_cohort(data, [4, 0, 2, 1], batch_size=2, epochs=2, seed=3, round_num=r)
        states = [step(st, cohort, jax.random.key(r))[0] for step, st in zip(steps, states)]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6),
                     states[0].params, states[1].params)
    assert not np.allclose(states[0].params["layers"]["1"]["kernel"],
                           params["layers"]["1"]["kernel"])


def test_dropout_follows_the_step_key():
    model = nnx_model(dropout=0.5)
    params = model.init(jax.random.key(0))
    x = {"x": np.repeat(X[:1], 16, axis=0)}  # 16 copies of one example
    evaluate = model.apply(params, x)
    np.testing.assert_allclose(model.apply(params, x, key=jax.random.key(3)), evaluate)
    round_key = jax.random.key(3)
    client = [jax.random.fold_in(round_key, slot) for slot in (0, 1)]  # the clients' keys
    apply = jax.jit(model.apply, static_argnames="train")
    a = apply(params, x, client[0], train=True)
    b = apply(params, x, client[0], train=True)
    c = apply(params, x, client[1], train=True)
    np.testing.assert_array_equal(a, b)  # the key decides the mask
    assert not np.allclose(a, evaluate) and not np.allclose(a, c)  # another client, another mask
    assert len({tuple(np.round(row, 5)) for row in np.asarray(a)}) > 1  # one mask per example
    raw = apply(params, x, jax.random.key_data(client[0]), train=True)  # raw uint32 keys too
    np.testing.assert_array_equal(raw, a)
    with pytest.raises(ValueError, match="train=True needs the step key"):
        model.apply(params, x, train=True)


def test_dropout_round_is_deterministic_per_seed():
    model = nnx_model(dropout=0.5)
    alg = fedavg(optax.sgd(0.3), optax.sgd(1.0))
    params = model.init(jax.random.key(0))
    cohort = pack_cohort(unequal_clients(), [0, 1, 2], batch_size=2, epochs=1, seed=0,
                         round_num=0)
    step = jit_round(alg, model)
    first, metrics = step(alg.init(params), cohort, jax.random.key(7))
    again, _ = step(alg.init(params), cohort, jax.random.key(7))
    other, _ = step(alg.init(params), cohort, jax.random.key(8))
    jax.tree.map(np.testing.assert_array_equal, first.params, again.params)
    assert not np.allclose(first.params["layers"]["0"]["kernel"],
                           other.params["layers"]["0"]["kernel"])
    assert np.isfinite(float(metrics["train/loss"]))


def test_batch_norm_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"nnx.BatchStat at norm.mean, norm.var.*"
                                         r"diverge across clients.*allow_batch_stats=True"):
        from_nnx(WithBatchNorm, classification_loss)


def test_batch_norm_opt_in_normalizes_with_the_batch():
    model = from_nnx(WithBatchNorm, classification_loss, allow_batch_stats=True)
    params = model.init(jax.random.key(0))
    assert sorted(params) == ["dense", "norm"] and sorted(params["norm"]) == ["bias", "scale"]
    h = X @ params["dense"]["kernel"] + params["dense"]["bias"]
    expected = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5)  # scale 1, bias 0 at init
    for train in (True, False):  # batch statistics in training and in evaluation
        np.testing.assert_allclose(model.apply(params, {"x": X}, key=jax.random.key(0),
                                               train=train), expected, atol=1e-5)
    alg = fedavg(optax.sgd(0.3), optax.sgd(1.0))
    cohort = pack_cohort(unequal_clients(), [0, 2], batch_size=3, epochs=1, seed=0, round_num=0)
    state, metrics = jit_round(alg, model)(alg.init(params), cohort, jax.random.key(0))
    assert np.isfinite(float(metrics["train/loss"]))
    assert not np.allclose(state.params["norm"]["scale"], params["norm"]["scale"])


def test_other_changing_state_is_refused_when_traced():
    class Counter(nnx.Variable):
        pass

    class Counting(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(FEATURES, CLASSES, rngs=rngs)
            self.calls = Counter(jnp.zeros((), jnp.int32))

        def __call__(self, x):
            self.calls[...] = self.calls[...] + 1
            return self.dense(x)

    model = from_nnx(Counting, classification_loss)
    params = model.init(jax.random.key(0))
    assert sorted(params) == ["dense"]
    with pytest.raises(ValueError, match="changes its Counter state at calls.*nnx.Param"):
        model.apply(params, {"x": X})
    opted = from_nnx(Counting, classification_loss, allow_batch_stats=True)
    np.testing.assert_allclose(opted.apply(params, {"x": X}),
                               X @ params["dense"]["kernel"] + params["dense"]["bias"],
                               atol=1e-6)


def test_wrong_objects_and_missing_flax_name_the_fix(monkeypatch):
    with pytest.raises(TypeError, match="returned function, not a flax.nnx.Module"):
        from_nnx(lambda rngs: (lambda x: x), classification_loss)
    with pytest.raises(ValueError, match="no feature 'pixels'.*inputs="):
        from_nnx(lambda rngs: MLP(rngs), classification_loss, inputs="pixels").apply(
            nnx_model().init(jax.random.key(0)), {"x": X})
    for name in ("flax", "flax.nnx"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    with pytest.raises(ImportError, match=r"from_nnx needs flax.*pip install 'fedjax-sim\[flax\]'"):
        from_nnx(MLP, classification_loss)
