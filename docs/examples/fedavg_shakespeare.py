"""FedAvg on Shakespeare's plays, written the way the paper writes it.

Each round the server samples 10 of the ~1,200 speaking characters (clients), each
client runs one epoch of SGD (lr 1.0, batch 4) from the global model, and the server
treats the mean of the clients' changes as a gradient for Adam (lr 1e-2): FedAvg with
an adaptive server optimizer (McMahan et al. 2017; Reddi et al. 2021, Shakespeare).

Run from the repository root (offline; needs the `plays` extra, which `make run` installs):

    .venv/bin/python docs/examples/fedavg_shakespeare.py
"""

import optax

from fedjax_api import Server, tasks
from fedjax_core.algorithms.fedavg import fedavg

TASK = "shakespeare-plays"
ROUNDS = 300
CLIENTS_PER_ROUND = 10


def main() -> None:
    task = tasks.get(TASK)  # model, train/test clients, batch size and epochs of the task
    algorithm = fedavg(client_optimizer=optax.sgd(1.0), server_optimizer=optax.adam(1e-2))
    server = Server.create(algorithm, task.model, seed=0)
    for r in range(ROUNDS):
        cohort = task.train.sample(clients=CLIENTS_PER_ROUND, round=r)
        server = server.step(cohort)
        if r % 50 == 0:
            print(f"round {r + 1}: train loss {float(server.metrics['train/loss']):.4f}")
    print(f"test after {server.round} rounds:", server.evaluate(task.test))


if __name__ == "__main__":
    main()
