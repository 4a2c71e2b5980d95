"""Every algorithm factory has one signature: `name(client_optimizer, server_optimizer, *,
aggregator=None, **options)`, where a float optimizer means `optax.sgd(that float)`."""

import importlib
import inspect

import jax
import numpy as np
import optax
import pytest

import fedjax_core as fc
from fedjax_core.algorithms import registry
from fedjax_core.algorithms.base import jit_round, sgd_if_rate
from fedjax_core.data import pack_cohort
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients

FACTORY_MODULES = {"fedadam": "fedopt", "fedyogi": "fedopt", "fedadagrad": "fedopt",
                   "fedavgm": "fedopt", "mimelite": "mime"}
"""Registered names whose factory lives in a module of another name."""


def factory(name):
    """The public factory of registered algorithm `name`: the function of that name, in its
    module and in the flat `fedjax_core` namespace."""
    module = importlib.import_module(
        f"fedjax_core.algorithms.{FACTORY_MODULES.get(name, name)}")
    f = getattr(module, name)
    assert getattr(fc, name) is f, f"fedjax_core.{name} is not {module.__name__}.{name}"
    return f


def test_every_registered_algorithm_has_a_factory():
    assert len(registry.ALGORITHMS) == 18
    for name in registry.ALGORITHMS:
        assert callable(factory(name))


@pytest.mark.parametrize("name", sorted(registry.ALGORITHMS))
def test_factory_signature(name):
    params = list(inspect.signature(factory(name)).parameters.values())
    assert [p.name for p in params[:3]] == ["client_optimizer", "server_optimizer", "aggregator"]
    assert [p.kind for p in params[:2]] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2
    assert params[2].default is None
    for p in params[2:]:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}: {p.name} is {p.kind}"


def run(alg, rounds=2):
    model, data = tiny_softmax_model(), unequal_clients()
    state = alg.init(model.init(jax.random.key(0)))
    step = jit_round(alg, model)
    for r in range(rounds):
        cohort = pack_cohort(data, [0, 2, 3], batch_size=2, epochs=1, seed=0, round_num=r)
        state, _ = step(state, cohort, jax.random.key(r))
    return state.params


def equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sgd_if_rate():
    adam = optax.adam(1e-3)
    assert sgd_if_rate(adam) is adam
    g, w = {"w": np.float32([2.0, -1.0])}, {"w": np.float32([0.0, 0.0])}
    sgd = sgd_if_rate(0.1)
    u, _ = sgd.update(g, sgd.init(w), w)
    np.testing.assert_allclose(u["w"], [-0.2, 0.1], rtol=1e-6)
    with pytest.raises(TypeError, match="optax.GradientTransformation or a learning rate"):
        sgd_if_rate("adam")


def test_float_shorthand_is_sgd_exactly():
    equal(run(fc.fedavg(0.1, 0.7)), run(fc.fedavg(optax.sgd(0.1), optax.sgd(0.7))))
    equal(run(fc.fedprox(0.1, 1.0, proximal_weight=0.1)),
          run(fc.fedprox(optax.sgd(0.1), optax.sgd(1.0), proximal_weight=0.1)))
    equal(run(fc.fedadam(0.1, 0.01)), run(fc.fedadam(optax.sgd(0.1), 0.01)))
    # SCAFFOLD reads eta_l from the float
    equal(run(fc.scaffold(0.1, 1.0, num_clients=7)),
          run(fc.scaffold(optax.sgd(0.1), 1.0, client_learning_rate=0.1, num_clients=7)))
    equal(run(fc.qffl(0.1, 1.0)), run(fc.qffl(optax.sgd(0.1), 1.0, client_learning_rate=0.1)))


def test_server_float_is_sgd_exactly_for_ditto_apfl_qffl_fedsgd_fednova():
    equal(run(fc.ditto(0.1, 0.5)), run(fc.ditto(0.1, optax.sgd(0.5))))
    equal(run(fc.apfl(0.1, 0.5)), run(fc.apfl(0.1, optax.sgd(0.5))))
    equal(run(fc.qffl(0.1, 0.5)), run(fc.qffl(0.1, optax.sgd(0.5))))
    equal(run(fc.fedsgd(None, 0.5, server_momentum=0.9)),
          run(fc.fedsgd(None, optax.sgd(0.5, momentum=0.9))))
    equal(run(fc.fednova(0.1, 0.5, server_momentum=0.9)),
          run(fc.fednova(0.1, optax.sgd(0.5, momentum=0.9))))
    equal(run(fc.fedbuff(0.1, 0.5, server_momentum=0.9)),
          run(fc.fedbuff(0.1, optax.sgd(0.5, momentum=0.9))))


def test_a_server_transformation_is_used():
    """Where the server takes a transformation, Adam moves the model elsewhere than SGD."""
    for make in (fc.ditto, fc.apfl, fc.qffl, fc.fedprox):
        sgd, adam = run(make(0.1, 1.0), 1), run(make(0.1, optax.adam(0.05)), 1)
        assert not np.allclose(sgd["w"], adam["w"]), make.__name__


@pytest.mark.parametrize("make, match", [
    (lambda: fc.fedadam(0.1, optax.adam(0.01)), "fedadam: server_optimizer must be a learning "
                                                r"rate .*use fedavg\(client_optimizer"),
    (lambda: fc.fedyogi(0.1, optax.sgd(1.0)), "fedyogi: server_optimizer must be a learning"),
    (lambda: fc.fedadagrad(0.1, optax.sgd(1.0)), "fedadagrad: server_optimizer must be"),
    (lambda: fc.fedavgm(0.1, optax.sgd(1.0)), "fedavgm: server_optimizer must be"),
    (lambda: fc.scaffold(0.1, optax.sgd(1.0), num_clients=5), "scaffold: server_optimizer"),
    (lambda: fc.feddyn(0.1, optax.sgd(1.0), num_clients=5), "feddyn: server_optimizer"),
    (lambda: fc.mime(0.1, optax.sgd(1.0)), "mime: server_optimizer must be"),
    (lambda: fc.mimelite(0.1, optax.sgd(1.0)), "mimelite: server_optimizer must be"),
    (lambda: fc.scaffold(optax.sgd(0.1), 1.0, num_clients=5),
     "scaffold: client_optimizer is an optax transformation, so pass its learning rate as "
     "client_learning_rate"),
    (lambda: fc.qffl(optax.adam(0.1), 1.0), "qffl: .*client_learning_rate"),
    (lambda: fc.scaffold(0.1, 1.0, client_learning_rate=0.2, num_clients=5),
     "client_learning_rate=0.2 differs from the client_optimizer's learning rate 0.1"),
    (lambda: fc.fednova(optax.sgd(0.1), 1.0), "fednova: client_optimizer must be the clients' "
                                              "SGD learning rate"),
    (lambda: fc.fedsgd(optax.sgd(0.1), 0.5), "fedsgd: client_optimizer must be None"),
    (lambda: fc.fedsgd(None, optax.sgd(0.5), server_momentum=0.9),
     r"fedsgd: server_momentum applies when server_optimizer is a learning rate"),
    (lambda: fc.fedbuff(0.1, optax.adam(0.1), server_momentum=0.9), "fedbuff: server_momentum"),
])
def test_refusals_say_what_to_pass(make, match):
    with pytest.raises(ValueError, match=match) as e:
        make()
    assert "\n" not in str(e.value)
