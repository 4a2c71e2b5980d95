"""`jit_round(..., donate_state=True)`: the same round, written over the donated state."""

import jax
import numpy as np

from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.scaffold import scaffold
from fedjax_core.data import pack_cohort
from fedjax_core.parallel import Plan
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients


def test_donated_round_equals_the_kept_one_and_consumes_its_input():
    data = unequal_clients(sizes=(3, 1, 4, 2), seed=0)
    model = tiny_softmax_model()
    alg = scaffold(0.1, 1.0, num_clients=4)
    states = {}
    for donate in (False, True):
        step = jit_round(alg, model, Plan(2), donate_state=donate)
        state = alg.init(model.init(jax.random.key(0)))
        for r in range(3):
            cohort = pack_cohort(data, [r % 4, (r + 1) % 4], batch_size=2, epochs=1, seed=0,
                                 round_num=r)
            old = state
            state, _ = step(state, cohort, jax.random.key(r))
            if r > 0:  # round 0 grows the stores on the host: a new state goes in
                assert jax.tree.leaves(old)[0].is_deleted() == donate
        states[donate] = state
    jax.tree.map(np.testing.assert_array_equal, states[True], states[False])
