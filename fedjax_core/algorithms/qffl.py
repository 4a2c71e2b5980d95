"""q-FFL trained with q-FedAvg: fairer accuracy across clients by up-weighting high losses.

q-FFL minimises `f_q(w) = sum_k p_k F_k(w)^(q+1) / (q+1)`; q = 0 is the usual objective,
larger q weights the clients with high loss more. q-FedAvg (Algorithm 2), round t,
cohort S of K clients:

    for each client k in S, in parallel:
        F_k = F_k(w_t)                       # mean loss over its data, each example once
        wbar_k = ClientOpt-train(w_t, D_k)   # local epochs, as in FedAvg
        Dw_k = L (w_t - wbar_k),  L = 1 / eta          # eta: the client learning rate
        Delta_k = F_k^q Dw_k
        h_k = q F_k^(q-1) ||Dw_k||^2 + L F_k^q
    w_{t+1} = w_t - eta_s sum_k Delta_k / sum_k h_k    # eta_s = 1 in the paper

`server_optimizer` is eta_s (a float), or an optax optimizer applied to the paper's step
`sum_k Delta_k / sum_k h_k` as a pseudo-gradient (`optax.sgd(eta_s)` is the float form).

`sum_k Delta_k / sum_k h_k = mean_k Delta_k / mean_k h_k`; the mean of the Delta_k is
the aggregator's, with weight 1 per real client (the paper sums clients without
weights: its sampler draws client k with probability p_k = n_k / n, which then need
not appear again). Padding clients count in neither sum. As in the authors' code,
`F_k + 1e-10` stands for F_k in the powers, so that a client with zero loss gives no
infinity or NaN. With q = 0, `Delta_k = Dw_k` and `h_k = L`, so the step is the
unweighted mean of the clients' `w_t - wbar_k`: FedAvg with uniform weights.
"""

import jax.numpy as jnp
import optax

from fedjax_core import tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.algorithms.base import (
    AlgorithmEntry,
    FederatedAlgorithm,
    OptimizerOrRate,
    client_rate,
    sgd_if_rate,
)
from fedjax_core.client import ClientContext, ClientReport
from fedjax_core.skeleton import RoundResult, algorithm

LOSS_OFFSET = 1e-10
"""Added to F_k before taking powers, as in the authors' code."""


def qffl(client_optimizer: OptimizerOrRate, server_optimizer: OptimizerOrRate = 1.0, *,
         aggregator: Aggregator | None = None, client_learning_rate: float | None = None,
         q: float = 1.0) -> FederatedAlgorithm:
    """q-FedAvg for the q-FFL objective: loss-reweighted deltas over a Lipschitz-style step size.

    Update rule (round t, cohort S of real clients):
      `F_k = F_k(w_t)`, `wbar_k = ClientOpt-train(w_t)`, `Dw_k = (w_t - wbar_k) / eta`,
      `Delta_k = F_k^q Dw_k`, `h_k = q F_k^(q-1) ||Dw_k||^2 + F_k^q / eta`,
      `w_{t+1} = w_t - eta_s * aggregator({Delta_k}, 1) / mean_k h_k`
      (mean aggregator: `w_t - eta_s sum_k Delta_k / sum_k h_k`, the paper's step).

    Args:
      client_optimizer: the clients' SGD learning rate eta (a float: `optax.sgd(eta)`, as
        the paper), or an optax optimizer each client runs locally (fresh state each
        round), then with `client_learning_rate`.
      server_optimizer: eta_s, a float multiplying the paper's step (1.0 is the paper),
        or an optax optimizer applied to that step as a pseudo-gradient.
      aggregator: combines the Delta_k, each real client with weight 1; defaults to
        `mean()`.
      client_learning_rate: eta, for L = 1 / eta, the estimate of the Lipschitz constant
        of the gradient of F_k; required when `client_optimizer` is a transformation,
        else taken from it.
      q: fairness parameter >= 0; 0 is FedAvg with uniform client weights. The paper
        uses q in {0.001, 0.01, 0.1, 1, 2, 5, 10, 15} depending on the dataset.

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part the server optimizer's
      state (no arrays for a float), no per-client store). Round metrics: `train/loss` (loss over the local steps),
      `train/num_examples`, `train/delta_norm` (norm of the server step before eta_s),
      `train/client_loss_mean` and `train/client_loss_variance` (unweighted mean and
      variance over the cohort of `F_k(w_t)`, the figures q-FFL aims to make fair),
      `train/h_mean`, and the aggregator's.

    Example:
      >>> alg = qffl(0.1, 1.0, q=1.0)   # or qffl(optax.sgd(0.1), 1.0, client_learning_rate=0.1)
      >>> state, metrics = jit_round(alg, model)(alg.init(params), cohort, round_key)

    References:
      Li et al. 2020, "Fair Resource Allocation in Federated Learning" (ICLR),
      Algorithm 2 (q-FedAvg).
    """
    if q < 0:
        raise ValueError(f"q must be >= 0, got {q}")
    eta = client_rate(client_optimizer, client_learning_rate, "qffl")
    client_optimizer, server_optimizer = sgd_if_rate(client_optimizer), sgd_if_rate(server_optimizer)
    if eta <= 0:
        raise ValueError(f"client_learning_rate must be > 0, got {eta}")
    lipschitz = 1.0 / eta

    def client(c: ClientContext) -> ClientReport:
        loss_sum, _, count = c.full_batch(c.params, with_grad=False, train=False)
        f = loss_sum / jnp.maximum(count, 1.0) + LOSS_OFFSET      # F_k(w_t), each example once
        w, stats = c.train(c.params, client_optimizer)
        dw = tree.scale(tree.sub(c.params, w), lipschitz)
        f_q = f ** q
        h = lipschitz * f_q
        if q != 0:
            h = h + q * f ** (q - 1.0) * jnp.square(tree.l2_norm(dw))
        loss = f - LOSS_OFFSET
        return ClientReport(tree.scale(dw, f_q), stats, weight=(c.num_examples > 0) * 1.0,
                            sums={"h": h, "loss": loss, "loss_sq": jnp.square(loss)})

    def server(w, opt_state, r: RoundResult):
        k = jnp.maximum(r.num_clients, 1.0)
        h_mean = r.sums["h"] / k
        step = tree.scale(r.delta, 1.0 / jnp.where(h_mean > 0, h_mean, 1.0))
        loss_mean = r.sums["loss"] / k
        loss_var = jnp.maximum(r.sums["loss_sq"] / k - jnp.square(loss_mean), 0.0)
        updates, opt_state = server_optimizer.update(step, opt_state, w)
        return (optax.apply_updates(w, updates), opt_state,
                {"train/delta_norm": tree.l2_norm(step), "train/client_loss_mean": loss_mean,
                 "train/client_loss_variance": loss_var, "train/h_mean": h_mean})

    return algorithm(client, server, init=server_optimizer.init, aggregator=aggregator)


def _build(client_optimizer, server_learning_rate, aggregator=None, *, client_learning_rate,
           q=1.0):
    """Registry builder: `qffl(client_optimizer, server_learning_rate, ...)` (the facade
    always supplies `client_learning_rate`)."""
    return qffl(client_optimizer, server_learning_rate, aggregator=aggregator,
                client_learning_rate=client_learning_rate, q=q)


ENTRY = AlgorithmEntry(
    "qffl", "q-FedAvg for q-FFL: loss^q-weighted deltas, Lipschitz step (fairness)",
    _build, "Li et al. 2020, Fair Resource Allocation in Federated Learning (ICLR)",
    needs=("client_learning_rate",))
