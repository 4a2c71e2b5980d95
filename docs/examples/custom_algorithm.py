"""Tutorial: a new federated algorithm in a dozen lines of the round skeleton.

FedExP (Jhunjhunwala, Wang and Joshi, "FedExP: Speeding Up Federated Averaging via
Extrapolation", ICLR 2023) is FedAvg whose server step extrapolates when the clients agree:

    Delta   = sum_i p_i Delta_i                                  (p_i = n_i / sum n)
    eta_g   = max(1, sum_i p_i ||Delta_i||^2 / (2 (||Delta||^2 + eps)))
    w_{t+1} = w_t - eta_g Delta

The paper averages uniformly (p_i = 1/M); this version weights by examples like FedAvg.
Run it: `python docs/examples/custom_algorithm.py` (about a minute on 2 CPU cores).
"""

import jax.numpy as jnp
import optax

from fedjax_api import Server, tasks
from fedjax_core import ClientContext, ClientReport, RoundResult, algorithm, tree

TASK = "shakespeare-plays"
ROUNDS = 20
CLIENTS_PER_ROUND = 10


# --- the algorithm ---
def fedexp(client_optimizer, eps=1e-3):
    def client(c: ClientContext) -> ClientReport:
        w, stats = c.train(c.params, client_optimizer)          # local steps from w_t
        delta = tree.sub(c.params, w)                            # Delta_i = w_t - w_i
        return ClientReport(delta, stats, sums={"sq_norm": c.num_examples * tree.l2_norm(delta) ** 2})

    def server(w, state, r: RoundResult):                       # r.delta = sum_i p_i Delta_i
        spread = r.sums["sq_norm"] / jnp.maximum(r.num_examples, 1.0)   # sum_i p_i ||Delta_i||^2
        eta = jnp.maximum(1.0, spread / (2 * (tree.l2_norm(r.delta) ** 2 + eps)))
        return tree.sub(w, tree.scale(r.delta, eta)), state, {"fedexp/eta_g": eta}

    return algorithm(client, server)
# --- end of the algorithm ---


if __name__ == "__main__":
    task = tasks.get(TASK)
    server = Server.create(fedexp(optax.sgd(1.0)), task.model, seed=0)
    for r in range(ROUNDS):
        server = server.step(task.train.sample(CLIENTS_PER_ROUND, r))
        print(f"round {r + 1}: train loss {float(server.metrics['train/loss']):.4f}, "
              f"eta_g {float(server.metrics['fedexp/eta_g']):.2f}")
    print("test:", server.evaluate(task.test))
