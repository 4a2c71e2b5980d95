"""Federated Averaging with any client and server optimizer (FedOpt).

Round t, for a cohort S of clients with n_i examples each:

    for each client i in S, in parallel:
        w_i = ClientOpt-train(w_t, client i's data)        # fedjax_core.client
        Delta_i = w_t - w_i
    Delta = sum_i n_i Delta_i / sum_i n_i                  # aggregator (default: mean)
    w_{t+1} = w_t + ServerOpt.update(Delta)                # sgd(1.0): w_{t+1} = w_t - Delta

With `server_optimizer = optax.sgd(1.0)` this is FedAvg (McMahan et al. 2017); with
Adam, Yogi, Adagrad or momentum SGD it is FedAdam, FedYogi, FedAdagrad and FedAvgM
(Reddi et al. 2021, Algorithms 1-2).
"""

from typing import Callable

import optax

from fedjax_core import tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.algorithms.base import FederatedAlgorithm, OptimizerOrRate, sgd_if_rate
from fedjax_core.client import ClientContext, ClientReport, Regularizer
from fedjax_core.skeleton import RoundResult, algorithm
from fedjax_core.typing import Array, Params

ProximalTerm = Callable[[Params, Params], Array]
"""`R(w, w_t) -> scalar` added to every local step's loss, with the round's global model
w_t as context (FedProx's `mu/2 ||w - w_t||^2`)."""


def anchored(term: ProximalTerm, anchor: Params) -> Regularizer:
    """The one-argument regularizer `w -> term(w, anchor)` of a client's local steps (e.g.
    FedProx's `mu/2 ||w - w_t||^2` with `anchor = w_t`)."""
    return lambda w: term(w, anchor)


def fedavg(client_optimizer: OptimizerOrRate = optax.sgd(0.1),
           server_optimizer: OptimizerOrRate = optax.sgd(1.0), *,
           aggregator: Aggregator | None = None,
           regularizer: ProximalTerm | None = None) -> FederatedAlgorithm:
    """Federated Averaging with pluggable client optimizer, server optimizer and aggregator.

    Update rule (round t, cohort S):
      `Delta_i = w_t - ClientOpt^K(w_t; D_i)`,
      `Delta = aggregator({Delta_i}, {n_i})` (mean: `sum n_i Delta_i / sum n_i`),
      `w_{t+1} = w_t + ServerOpt(Delta)`.

    Args:
      client_optimizer: optax optimizer each client runs locally, fresh state each round;
        a float is `optax.sgd(that float)`.
      server_optimizer: optax optimizer the server applies to the aggregated delta,
        treating it as a gradient; a float is `optax.sgd(that float)`.
      aggregator: how deltas are combined; defaults to the example-weighted `mean()`.
      regularizer: optional `R(w, w_t)` added to every local step's loss, with the
        round's global model as context (FedProx's proximal term); None for FedAvg.

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part the server optimizer's
      state). Round metrics: `train/loss` (example-weighted loss over the cohort's local
      steps), `train/num_examples`, `train/delta_norm`, and the aggregator's.

    Example:
      >>> alg = fedavg(optax.sgd(1.0), optax.adam(1e-2))
      >>> alg = fedavg(0.1, 1.0)    # fedavg(optax.sgd(0.1), optax.sgd(1.0))
      >>> state = alg.init(model.init(jax.random.key(0)))
      >>> state, metrics = jit_round(alg, model)(state, cohort, round_key)

    References:
      McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
      Decentralized Data" (AISTATS). Reddi et al. 2021, "Adaptive Federated
      Optimization" (ICLR).
    """
    client_optimizer, server_optimizer = sgd_if_rate(client_optimizer), sgd_if_rate(server_optimizer)

    def client(c: ClientContext) -> ClientReport:
        proximal = None if regularizer is None else anchored(regularizer, c.params)
        w, stats = c.train(c.params, client_optimizer, regularizer=proximal)
        return ClientReport(tree.sub(c.params, w), stats)

    def server(w, opt_state, r: RoundResult):
        updates, opt_state = server_optimizer.update(r.delta, opt_state, w)
        return optax.apply_updates(w, updates), opt_state, {}

    return algorithm(client, server, init=server_optimizer.init, aggregator=aggregator)
