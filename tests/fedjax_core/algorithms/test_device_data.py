"""Every registered algorithm runs on device-resident (indexed) cohorts and lands where
it lands on dense cohorts. FedAvg, SCAFFOLD, FedSGD and Mime are checked in more detail
(chunk sizes 1 and 3, three rounds) in tests/fedjax_core/data/test_device.py."""

import functools

import jax
import numpy as np
import optax
import pytest

from fedjax_core import parallel
from fedjax_core.algorithms import registry
from fedjax_core.data import pack_cohort
from fedjax_core.data.device import device_examples, index_cohort
from tests.fedjax_api.tiny_task import with_domains
from tests.fedjax_core.data.test_device import ALGORITHMS, run_rounds
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients

DATA = with_domains(unequal_clients(sizes=(5, 2, 9, 1, 4, 7, 3)))
FACTS = {"num_clients": 7, "num_domains": 2, "client_learning_rate": 0.1}


@pytest.mark.parametrize("name", sorted(set(registry.ALGORITHMS) - set(ALGORITHMS)))
def test_every_algorithm_runs_on_indexed_cohorts(name):
    # Two rounds of each registered algorithm (chunks of 2 over 3 clients) on device data
    # land where the dense rounds land.
    examples = device_examples(DATA)
    make = lambda: registry.build(  # noqa: E731
        name, optax.sgd(0.1), 1.0, **{k: FACTS[k] for k in registry.get(name).needs})
    draws = ([0, 2, 3], [1, 2, 6])
    dense = [pack_cohort(DATA, d, 2, 1, seed=0, round_num=r, steps=6) for r, d in enumerate(draws)]
    indexed = [index_cohort(examples, d, 2, 1, seed=0, round_num=r, steps=6)
               for r, d in enumerate(draws)]
    plan = parallel.Plan(chunk_size=2)
    want, _ = run_rounds(make(), tiny_softmax_model(), dense, plan)
    got, _ = run_rounds(make(), tiny_softmax_model(), indexed, plan)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=1e-6), got, want)
