"""FedDyn: federated learning with dynamic regularization (Acar et al. 2021, Algorithm 1).

Server state: the model theta, the correction h (zero at the start); each client i
keeps `grad_i`, its running estimate of the gradient of its loss at its last model
(zero until it first trains). Round t, cohort P_t of real clients, m clients in all:

    for each client i in P_t, in parallel:
        theta_i = argmin_theta L_i(theta) - <grad_i, theta> + alpha/2 ||theta - theta^{t-1}||^2
                                                     # approximated by local ClientOpt steps
        grad_i <- grad_i - alpha (theta_i - theta^{t-1})
    h^t     = h^{t-1} - (alpha/m) sum_{i in P_t} (theta_i - theta^{t-1})
    theta^t = (1/|P_t|) sum_{i in P_t} theta_i - h^t / alpha

In terms of the deltas `Delta_i = theta^{t-1} - theta_i` and their uniform mean Delta:
`h^t = h^{t-1} + alpha (|P_t|/m) Delta` and `theta^t = theta^{t-1} - (Delta + h^t/alpha)`.
The per-client `grad_i` are the algorithm's per-client state, kept by the round
skeleton in a store that grows with the clients seen, not with m.
"""

import jax
import jax.numpy as jnp

from fedjax_core import tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.algorithms.base import (
    AlgorithmEntry,
    FederatedAlgorithm,
    OptimizerOrRate,
    server_rate,
    sgd_if_rate,
)
from fedjax_core.client import ClientContext, ClientReport
from fedjax_core.skeleton import RoundResult, algorithm


def feddyn(client_optimizer: OptimizerOrRate, server_optimizer: float, *,
           aggregator: Aggregator | None = None, num_clients: int,
           alpha: float = 0.01) -> FederatedAlgorithm:
    """FedDyn: each client's local objective is corrected by its own linear term.

    Update rule (round t, cohort P_t of real clients, m clients in all):
      clients minimise `L_i(w) - <grad_i, w> + alpha/2 ||w - theta^{t-1}||^2` with the
      client optimizer from `theta^{t-1}`, ending at `theta_i`;
      `grad_i <- grad_i + alpha Delta_i` with `Delta_i = theta^{t-1} - theta_i`;
      `Delta = aggregator({Delta_i}, uniform weights)` (mean: `(1/|P_t|) sum Delta_i`);
      `h <- h + alpha (|P_t|/m) Delta`;
      `theta^t = theta^{t-1} - eta_g (Delta + h / alpha)`.

    The paper has no server learning rate: `eta_g = 1.0` is Algorithm 1 exactly; other
    values take a step of `eta_g` along the paper's update. The paper averages the
    cohort's models uniformly, so the deltas reach the aggregator with weight 1 (0 for
    padding clients), whatever the clients' sizes. Any aggregator whose output
    estimates that mean can be used (mean, robust, compressed, private means): its
    output serves both the model average and, times |P_t|, the sum in the h update.
    A round without real clients changes nothing.

    Args:
      client_optimizer: the local optimizer (the paper uses SGD); a float is
        `optax.sgd(that float)`.
      server_optimizer: eta_g, a float, 1.0 for the paper's algorithm. An optax
        transformation raises `ValueError`: the server state holds only h.
      aggregator: combines the model deltas; defaults to `mean()`.
      num_clients: m, the population size.
      alpha: the regularization strength, positive (e.g. 0.1, 0.01, 0.001).

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`; its server part is h, shaped like the
      params; its per-client store holds the `grad_i`, zero until client i first
      trains). Round metrics: `train/loss` (of `L_i` alone, without the regularizer),
      `train/num_examples`, `train/delta_norm`, `train/h_norm` (`||h^t||`), plus the
      aggregator's.

    Example:
      >>> alg = feddyn(0.1, 1.0, num_clients=100, alpha=0.01)   # clients: optax.sgd(0.1)
      >>> state = alg.init(params)
      >>> state, metrics = jit_round(alg, model)(state, cohort, round_key)

    References:
      Acar et al. 2021, "Federated Learning Based on Dynamic Regularization" (ICLR),
      Algorithm 1.
    """
    client_optimizer = sgd_if_rate(client_optimizer)
    server_learning_rate = server_rate(
        server_optimizer, "feddyn", "it is eta_g of theta <- theta - eta_g (Delta + h / alpha) "
        "(the server state holds only h)")
    if not alpha > 0:
        raise ValueError(f"feddyn: alpha must be positive, got {alpha}")
    if int(num_clients) < 1:
        raise ValueError(f"feddyn: num_clients must be at least 1, got {num_clients}")
    alpha = float(alpha)
    population = float(int(num_clients))

    def client(c: ClientContext) -> ClientReport:
        theta, grad_i = c.params, c.state

        def regularizer(w):  # -<grad_i, w> + alpha/2 ||w - theta^{t-1}||^2
            linear = sum(jnp.vdot(g, x)
                         for g, x in zip(jax.tree.leaves(grad_i), jax.tree.leaves(w)))
            prox = sum(jnp.sum(jnp.square(x - a))
                       for x, a in zip(jax.tree.leaves(w), jax.tree.leaves(theta)))
            return -linear + 0.5 * alpha * prox

        w, stats = c.train(theta, client_optimizer, regularizer=regularizer)
        delta = tree.sub(theta, w)
        # grad_i - alpha (theta_i - theta^{t-1}); a padding client keeps its row.
        grad_new = jax.tree.map(lambda g, d: g + alpha * d, grad_i, delta)
        return ClientReport(delta, stats, weight=(c.num_examples > 0) * 1.0, state=grad_new)

    def server(theta, h, r: RoundResult):
        h = jax.tree.map(lambda hh, d: hh + (alpha * r.num_clients / population) * d, h,
                         r.delta)
        any_real = r.num_clients > 0
        params = jax.tree.map(
            lambda p, d, hh: jnp.where(any_real, p - server_learning_rate * (d + hh / alpha), p),
            theta, r.delta, h)
        metrics = {"train/h_norm": tree.l2_norm(h)}
        return params, h, metrics

    return algorithm(client, server, init=tree.zeros_like, client_init=tree.zeros_like,
                     aggregator=aggregator)


ENTRY = AlgorithmEntry(
    "feddyn", "FedDyn: dynamic per-client regularization and a server correction h", feddyn,
    "Acar et al. 2021, Federated Learning Based on Dynamic Regularization",
    needs=("num_clients",))
