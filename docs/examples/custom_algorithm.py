"""Tutorial: a new federated algorithm in under 40 lines of the core API.

FedExP (Jhunjhunwala, Wang and Joshi, "FedExP: Speeding Up Federated Averaging via
Extrapolation", ICLR 2023) is FedAvg whose server step extrapolates when the clients agree:

    Delta   = sum_i p_i Delta_i                                  (p_i = n_i / sum n)
    eta_g   = max(1, sum_i p_i ||Delta_i||^2 / (2 (||Delta||^2 + eps)))
    w_{t+1} = w_t - eta_g Delta

The paper averages uniformly (p_i = 1/M); this version weights by examples like FedAvg.
Run it: `python docs/examples/custom_algorithm.py` (about a minute on 2 CPU cores).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_api import Server, tasks
from fedjax_core import parallel, tree
from fedjax_core.algorithms.base import FederatedAlgorithm
from fedjax_core.client import client_update

TASK = "shakespeare-plays"
ROUNDS = 20
CLIENTS_PER_ROUND = 10


# --- the algorithm ---
class FedExPState(NamedTuple):
    params: dict  # the global model (every state has `params`)


def fedexp(client_optimizer, eps=1e-3):
    def init(params):
        return FedExPState(params)

    def apply(state, cohort, key, *, model, plan=parallel.Plan()):
        update = client_update(model, client_optimizer)  # one client's local training

        def one_client(c):
            batches, mask, n, slot = c
            return update(state.params, batches, mask, n, jax.random.fold_in(key, slot))

        slots = jnp.arange(cohort.num_clients)
        u = parallel.map_clients(one_client, (cohort.batches, cohort.mask,
                                              cohort.num_examples, slots), plan)
        p = u.weight / jnp.maximum(jnp.sum(u.weight), 1.0)  # padding clients weigh 0
        delta = tree.weighted_sum(u.delta, p)
        sq_norms = jax.vmap(lambda d: tree.l2_norm(d) ** 2)(u.delta)
        eta = jnp.maximum(1.0, jnp.sum(p * sq_norms) / (2 * (tree.l2_norm(delta) ** 2 + eps)))
        params = tree.sub(state.params, tree.scale(delta, eta))
        loss = jnp.sum(u.loss_sum) / jnp.maximum(jnp.sum(u.examples_seen), 1.0)
        return FedExPState(params), {"train/loss": loss, "fedexp/eta_g": eta}

    return FederatedAlgorithm(init, apply)
# --- end of the algorithm ---


if __name__ == "__main__":
    task = tasks.get(TASK)
    server = Server.create(fedexp(optax.sgd(1.0)), task.model, seed=0)
    for r in range(ROUNDS):
        server = server.step(task.train.sample(CLIENTS_PER_ROUND, r))
        print(f"round {r + 1}: train loss {float(server.metrics['train/loss']):.4f}, "
              f"eta_g {float(server.metrics['fedexp/eta_g']):.2f}")
    print("test:", server.evaluate(task.test))
