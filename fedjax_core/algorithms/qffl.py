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

`sum_k Delta_k / sum_k h_k = mean_k Delta_k / mean_k h_k`; the mean of the Delta_k is
the aggregator's, with weight 1 per real client (the paper sums clients without
weights: its sampler draws client k with probability p_k = n_k / n, which then need
not appear again). Padding clients count in neither sum. As in the authors' code,
`F_k + 1e-10` stands for F_k in the powers, so that a client with zero loss gives no
infinity or NaN. With q = 0, `Delta_k = Dw_k` and `h_k = L`, so the step is the
unweighted mean of the clients' `w_t - wbar_k`: FedAvg with uniform weights.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_core import parallel, tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.aggregate.mean import mean
from fedjax_core.algorithms.base import AlgorithmEntry, FederatedAlgorithm
from fedjax_core.algorithms.fedavg import AGGREGATOR_KEY, round_metrics
from fedjax_core.client import client_update, first_epoch_mask, full_batch
from fedjax_core.typing import Params, State

LOSS_OFFSET = 1e-10
"""Added to F_k before taking powers, as in the authors' code."""


class QFFLState(NamedTuple):
    """Server state of q-FedAvg."""

    params: Params
    aggregator_state: State


def qffl(client_optimizer: optax.GradientTransformation, client_learning_rate: float,
         server_learning_rate: float = 1.0, q: float = 1.0,
         aggregator: Aggregator | None = None) -> FederatedAlgorithm:
    """q-FedAvg for the q-FFL objective: loss-reweighted deltas over a Lipschitz-style step size.

    Update rule (round t, cohort S of real clients):
      `F_k = F_k(w_t)`, `wbar_k = ClientOpt-train(w_t)`, `Dw_k = (w_t - wbar_k) / eta`,
      `Delta_k = F_k^q Dw_k`, `h_k = q F_k^(q-1) ||Dw_k||^2 + F_k^q / eta`,
      `w_{t+1} = w_t - eta_s * aggregator({Delta_k}, 1) / mean_k h_k`
      (mean aggregator: `w_t - eta_s sum_k Delta_k / sum_k h_k`, the paper's step).

    Args:
      client_optimizer: optax optimizer each client runs locally (the paper: SGD with
        learning rate `client_learning_rate`), fresh state each round.
      client_learning_rate: eta; L = 1 / eta estimates the Lipschitz constant of the
        gradient of F_k.
      server_learning_rate: eta_s multiplies the paper's step; 1.0 is the paper.
      q: fairness parameter >= 0; 0 is FedAvg with uniform client weights. The paper
        uses q in {0.001, 0.01, 0.1, 1, 2, 5, 10, 15} depending on the dataset.
      aggregator: combines the Delta_k, each real client with weight 1; defaults to
        `mean()`.

    Returns:
      A `FederatedAlgorithm` with `QFFLState`. Round metrics: `train/loss` (loss over
      the local steps), `train/num_examples`, `train/delta_norm` (norm of the server
      step before eta_s), `train/client_loss_mean` and `train/client_loss_variance`
      (unweighted mean and variance over the cohort of `F_k(w_t)`, the figures q-FFL
      aims to make fair), `train/h_mean`, and the aggregator's.

    Example:
      >>> alg = qffl(optax.sgd(0.1), client_learning_rate=0.1, q=1.0)
      >>> state = alg.init(model.init(jax.random.key(0)))
      >>> state, metrics = alg.apply(state, cohort, round_key, model=model)

    References:
      Li et al. 2020, "Fair Resource Allocation in Federated Learning" (ICLR),
      Algorithm 2 (q-FedAvg).
    """
    if q < 0:
        raise ValueError(f"q must be >= 0, got {q}")
    if client_learning_rate <= 0:
        raise ValueError(f"client_learning_rate must be > 0, got {client_learning_rate}")
    aggregator = aggregator or mean()
    lipschitz = 1.0 / client_learning_rate

    def init(params):
        return QFFLState(params, aggregator.init(params))

    def apply(state, cohort, key, *, model, plan=parallel.Plan()):
        update = client_update(model, client_optimizer)
        objective = full_batch(model, with_grad=False, train=False)

        def one_client(c):
            batches, mask, n, slot = c
            loss_sum, _, count = objective(state.params, batches, first_epoch_mask(mask, n))
            f = loss_sum / jnp.maximum(count, 1.0) + LOSS_OFFSET
            u = update(state.params, batches, mask, n, jax.random.fold_in(key, slot))
            dw = tree.scale(u.delta, lipschitz)
            f_q = f ** q
            h = lipschitz * f_q
            if q != 0:
                h = h + q * f ** (q - 1.0) * jnp.square(tree.l2_norm(dw))
            return u._replace(delta=tree.scale(dw, f_q)), h, f - LOSS_OFFSET

        slots = jnp.arange(cohort.mask.shape[0], dtype=jnp.int32)
        updates, hs, losses = parallel.map_clients(
            one_client, (cohort.batches, cohort.mask, cohort.num_examples, slots), plan)
        real = (cohort.num_examples > 0).astype(jnp.float32)
        k = jnp.sum(real)
        mean_delta, aggregator_state, agg_metrics = aggregator.apply(
            updates.delta, real, state.aggregator_state,
            jax.random.fold_in(key, AGGREGATOR_KEY), cohort.slots)
        safe_k = jnp.maximum(k, 1.0)
        h_mean = jnp.sum(real * hs) / safe_k
        step = tree.scale(mean_delta, 1.0 / jnp.where(h_mean > 0, h_mean, 1.0))
        params = tree.sub(state.params, tree.scale(step, server_learning_rate))
        loss_mean = jnp.sum(real * losses) / safe_k
        loss_var = jnp.sum(real * jnp.square(losses - loss_mean)) / safe_k
        metrics = {**round_metrics(updates, step), "train/client_loss_mean": loss_mean,
                   "train/client_loss_variance": loss_var, "train/h_mean": h_mean,
                   **agg_metrics}
        return QFFLState(params, aggregator_state), metrics

    return FederatedAlgorithm(init, apply)


def _build(client_optimizer, server_learning_rate, aggregator=None, *, client_learning_rate,
           q=1.0):
    """Registry builder: `qffl(client_optimizer, client_learning_rate, ...)`."""
    return qffl(client_optimizer, client_learning_rate, server_learning_rate, q=q,
                aggregator=aggregator)


ENTRY = AlgorithmEntry(
    "qffl", "q-FedAvg for q-FFL: loss^q-weighted deltas, Lipschitz step (fairness)",
    _build, "Li et al. 2020, Fair Resource Allocation in Federated Learning (ICLR)",
    needs=("client_learning_rate",))
