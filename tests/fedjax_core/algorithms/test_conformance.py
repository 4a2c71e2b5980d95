"""Every registered algorithm and aggregator obeys the `FederatedAlgorithm` contract.

For each: the round jits and traces once across rounds, keeps the state's structure,
shapes and dtypes, gives the same result with and without `jit` and for any chunk size,
and its metrics are finite scalars.
"""

import jax
import numpy as np
import optax
import pytest

from fedjax_core import client_state, parallel
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.algorithms import registry
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.data import pack_cohort
from tests.fedjax_api.tiny_task import with_domains
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients

FACTS = {"num_clients": 7, "num_domains": 2, "client_learning_rate": 0.1}
COHORTS = ([0, 2, 3, 5], [1, 2, 6, 4], [0, 4, 5, 3])


DATA = with_domains(unequal_clients(sizes=(5, 2, 9, 1, 4, 7, 3)))


def build(name, aggregator=None):
    entry = registry.get(name)
    return registry.build(name, optax.sgd(0.1), 1.0, aggregator=aggregator,
                          **{k: FACTS[k] for k in entry.needs})


def run_rounds(alg, model, plan, use_jit=True, traces=None):
    apply = alg.apply
    if traces is not None:
        def apply(state, cohort, key, *, model, plan):
            traces.append(1)
            return alg.apply(state, cohort, key, model=model, plan=plan)
    counted = alg._replace(apply=apply)
    step = (jit_round(counted, model, plan) if use_jit else
            (lambda s, c, k: counted.apply(s, c, k, model=model, plan=plan)))
    state = alg.init(model.init(jax.random.key(0)))
    states, metrics = [state], []
    for r, clients in enumerate(COHORTS):
        cohort = pack_cohort(DATA, clients, batch_size=2, epochs=1, seed=0, round_num=r,
                             steps=6)
        if not use_jit:  # jit_round fits the per-client stores; here, by hand
            state = client_state.fit(state, cohort.client_index)
        state, m = step(state, cohort, jax.random.key(r))
        states.append(state)
        metrics.append(m)
    return states, metrics


def check_state_and_metrics(states, metrics):
    first = jax.tree.structure(states[0])
    for s in states[1:]:
        assert jax.tree.structure(s) == first
        for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(s)):
            assert a.shape == b.shape and a.dtype == b.dtype
    assert hasattr(states[-1], "params")
    for m in metrics:
        assert "train/loss" in m and "train/num_examples" in m
        for k, v in m.items():
            assert np.shape(v) == (), k
            assert np.isfinite(float(v)), k


def close(a, b, tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=tol, rtol=tol),
                 jax.tree.leaves(a), jax.tree.leaves(b))


@pytest.mark.parametrize("name", sorted(registry.ALGORITHMS))
def test_algorithm_conformance(name):
    model = tiny_softmax_model()
    alg = build(name)
    traces = []
    states, metrics = run_rounds(alg, model, parallel.Plan(1), traces=traces)
    assert len(traces) == 1, f"{name} traced {len(traces)} times in 3 rounds"
    check_state_and_metrics(states, metrics)
    assert not np.allclose(jax.tree.leaves(states[0].params)[0],
                           jax.tree.leaves(states[-1].params)[0]), "the model never moved"
    chunked, _ = run_rounds(alg, model, parallel.Plan(3))
    close(states[-1], chunked[-1], 1e-5)
    with jax.disable_jit():
        eager, _ = run_rounds(alg, model, parallel.Plan(2), use_jit=False)
    close(states[-1], eager[-1], 1e-5)


def test_every_algorithm_documents_its_update_and_paper():
    for name, e in registry.ALGORITHMS.items():
        assert e.description and "\n" not in e.description, name
        assert e.paper, name
        assert set(e.needs) <= set(FACTS), name


AGGREGATOR_OPTIONS = {"dp_adaptive": {"clip_count_stddev": 2.0}}
"""Options without which an aggregator cannot run on a 4-client cohort."""


@pytest.mark.parametrize("name", sorted(aggregators.AGGREGATORS))
def test_aggregator_plugs_into_fedavg(name):
    model = tiny_softmax_model()
    alg = fedavg(optax.sgd(0.1), optax.sgd(1.0),
                 aggregator=aggregators.build(name, **AGGREGATOR_OPTIONS.get(name, {})))
    traces = []
    states, metrics = run_rounds(alg, model, parallel.Plan(1), traces=traces)
    assert len(traces) == 1
    check_state_and_metrics(states, metrics)
    chunked, _ = run_rounds(alg, model, parallel.Plan(3))
    close(states[-1].params, chunked[-1].params, 1e-5)


def test_aggregator_entries_are_described():
    for name, e in aggregators.AGGREGATORS.items():
        assert e.description and e.paper, name


def test_unknown_options_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="has no option 'mu'; its options are: momentum"):
        registry.build("fedavgm", optax.sgd(0.1), 1.0, mu=0.1)
    with pytest.raises(ValueError, match="aggregator 'mean' has no option 'beta'"):
        aggregators.build("mean", beta=0.1)
