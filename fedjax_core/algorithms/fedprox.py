"""FedProx: FedAvg whose clients add a proximal term to their local objective.

Round t, for a cohort S of clients with n_i examples each:

    for each client i in S, in parallel:
        w_i ~= argmin_w  F_i(w) + mu/2 ||w - w_t||^2          # local steps of ClientOpt
        Delta_i = w_t - w_i
    Delta = sum_i n_i Delta_i / sum_i n_i                    # aggregator (default: mean)
    w_{t+1} = w_t - eta_s Delta                              # server_optimizer: sgd(eta_s)

Every local step differentiates the batch loss plus `mu/2 ||w - w_t||^2`, so its
gradient gains `mu (w - w_t)`, which pulls the client back towards the global model.
With `mu = 0` this is FedAvg.

The paper's Algorithm 2 samples devices with probability n_k / n and averages their
models uniformly; like FedJAX's `fed_prox`, the default here samples as the caller does
and averages with weights n_k (the `mean()` aggregator), which has the same expectation
under uniform sampling. The paper also lets devices stop early (gamma-inexact
solutions); here a client's work is its packed steps (`epochs`, `max_steps`).
"""

import jax
import jax.numpy as jnp

from fedjax_core.aggregate.base import Aggregator
from fedjax_core.algorithms.base import AlgorithmEntry, FederatedAlgorithm, OptimizerOrRate
from fedjax_core.algorithms.fedavg import ProximalTerm, fedavg


def proximal_term(proximal_weight: float) -> ProximalTerm:
    """`R(w, w_t) = proximal_weight / 2 * ||w - w_t||^2`, a `fedavg.ProximalTerm`."""

    def regularizer(w, w_global):
        # A sum of squares, not l2_norm(...)**2: sqrt has no gradient at w = w_t.
        sq = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.sum(jnp.square(a - b)), w, w_global))
        return jnp.asarray(0.5 * proximal_weight * sum(sq))

    return regularizer


def fedprox(client_optimizer: OptimizerOrRate, server_optimizer: OptimizerOrRate = 1.0, *,
            aggregator: Aggregator | None = None,
            proximal_weight: float = 0.01) -> FederatedAlgorithm:
    """FedProx: FedAvg with the proximal term `mu/2 ||w - w_t||^2` in every local step.

    Update rule (round t, cohort S):
      each client runs its optimizer on `L_k(w) + mu/2 ||w - w_t||^2` for its steps k,
      `Delta_i = w_t - w_i`, `Delta = aggregator({Delta_i}, {n_i})`
      (mean: `sum n_i Delta_i / sum n_i`), `w_{t+1} = w_t - eta_s Delta` (or
      `w_t + ServerOpt(Delta)`).

    Args:
      client_optimizer: optax optimizer each client runs locally (the paper uses SGD),
        fresh state each round; a float is `optax.sgd(that float)`.
      server_optimizer: eta_s, a float (server SGD; 1.0 takes the averaged model, as in
        the paper), or an optax optimizer applied to the aggregated delta as in `fedavg`.
      aggregator: how deltas are combined; defaults to the example-weighted `mean()`.
      proximal_weight: mu >= 0. 0 is FedAvg. The paper tunes mu over
        {0.001, 0.01, 0.1, 1}.

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part the server SGD's state,
      no per-client store). Round metrics:
      `train/loss` (example-weighted loss over the local steps, without the proximal
      term), `train/num_examples`, `train/delta_norm`, and the aggregator's.

    Example:
      >>> alg = fedprox(optax.sgd(0.1), 1.0, proximal_weight=0.01)
      >>> state = alg.init(model.init(jax.random.key(0)))
      >>> state, metrics = jit_round(alg, model)(state, cohort, round_key)

    References:
      Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (MLSys),
      Algorithm 2.
    """
    if proximal_weight < 0:
        raise ValueError(f"proximal_weight must be >= 0, got {proximal_weight}")
    return fedavg(client_optimizer, server_optimizer, aggregator=aggregator,
                  regularizer=proximal_term(proximal_weight))


ENTRY = AlgorithmEntry(
    "fedprox", "FedAvg with a proximal term mu/2 ||w - w_t||^2 in the clients' objective",
    fedprox, "Li et al. 2020, Federated Optimization in Heterogeneous Networks (MLSys)")
