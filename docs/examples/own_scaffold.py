"""Tutorial: SCAFFOLD written as "your own" algorithm on the round skeleton.

SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, Algorithm 1 with option II) corrects each client's drift with
control variates: the server keeps c, each client i keeps its own c_i.

    y_i <- y_i - eta_l (g(y_i) - c_i + c)                    K_i local steps from x
    c_i+ = c_i - c + (x - y_i) / (K_i eta_l)                  option II
    x   <- x - eta_g mean_i (x - y_i)
    c   <- c + (1/N) sum_i (c_i+ - c_i)

The skeleton keeps the c_i (`client_init` declares them; `c.state` reads a client's row and
`ClientReport(state=...)` writes it back), so the algorithm is only its update rule. It
equals the built-in `fedjax_core.scaffold` (tests/docs/test_examples.py checks it).
Run it: `python docs/examples/own_scaffold.py`.
"""

import jax.numpy as jnp
import optax

from fedjax_api import Server, tasks
from fedjax_core import ClientContext, ClientReport, RoundResult, algorithm, tree

TASK = "shakespeare-plays"
ROUNDS = 10
CLIENTS_PER_ROUND = 10


# --- the algorithm ---
def my_scaffold(eta_l, eta_g, num_clients):
    def client(c: ClientContext) -> ClientReport:
        x, control, c_i = c.params, c.server, c.state
        y, stats = c.train(x, optax.sgd(eta_l), correction=lambda g, w: tree.add(tree.sub(g, c_i), control))
        delta = tree.sub(x, y)
        scale = jnp.where(stats.steps > 0, 1.0 / (jnp.maximum(stats.steps, 1.0) * eta_l), 0.0)
        c_new = tree.add(tree.sub(c_i, tree.scale(control, stats.steps > 0)), tree.scale(delta, scale))
        return ClientReport(delta, stats, state=c_new, sums={"dc": tree.sub(c_new, c_i)})

    def server(x, control, r: RoundResult):
        control = tree.add(control, tree.scale(r.sums["dc"], 1.0 / num_clients))
        return tree.sub(x, tree.scale(r.delta, eta_g)), control, {"train/control_norm": tree.l2_norm(control)}

    return algorithm(client, server, init=tree.zeros_like, client_init=tree.zeros_like)
# --- end of the algorithm ---


if __name__ == "__main__":
    task = tasks.get(TASK)
    alg = my_scaffold(eta_l=1.0, eta_g=1.0, num_clients=task.train.num_clients)
    server = Server.create(alg, task.model, seed=0)
    for r in range(ROUNDS):
        server = server.step(task.train.sample(CLIENTS_PER_ROUND, r))
        print(f"round {r + 1}: train loss {float(server.metrics['train/loss']):.4f}, "
              f"||c|| {float(server.metrics['train/control_norm']):.4f}")
    print("test:", server.evaluate(task.test))
