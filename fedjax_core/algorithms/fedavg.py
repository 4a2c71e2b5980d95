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

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_core import parallel, tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.aggregate.mean import mean
from fedjax_core.algorithms.base import FederatedAlgorithm
from fedjax_core.client import Regularizer, client_update
from fedjax_core.typing import Params, State


AGGREGATOR_KEY = -1 & 0x7FFFFFFF
"""`fold_in(round_key, AGGREGATOR_KEY)` is the aggregator's key; clients use their slots."""


class FedAvgState(NamedTuple):
    """Server state of FedAvg / FedOpt."""

    params: Params
    server_opt_state: optax.OptState
    aggregator_state: State


def fedavg(client_optimizer: optax.GradientTransformation = optax.sgd(0.1),
           server_optimizer: optax.GradientTransformation = optax.sgd(1.0),
           aggregator: Aggregator | None = None,
           regularizer: Regularizer | None = None) -> FederatedAlgorithm:
    """Federated Averaging with pluggable client optimizer, server optimizer and aggregator.

    Update rule (round t, cohort S):
      `Delta_i = w_t - ClientOpt^K(w_t; D_i)`,
      `Delta = aggregator({Delta_i}, {n_i})` (mean: `sum n_i Delta_i / sum n_i`),
      `w_{t+1} = w_t + ServerOpt(Delta)`.

    Args:
      client_optimizer: optax optimizer each client runs locally, fresh state each round.
      server_optimizer: optax optimizer the server applies to the aggregated delta,
        treating it as a gradient.
      aggregator: how deltas are combined; defaults to the example-weighted `mean()`.
      regularizer: optional `R(w, w_t)` added to every local step's loss, with the
        round's global model as context (FedProx's proximal term); None for FedAvg.

    Returns:
      A `FederatedAlgorithm`. Round metrics: `train/loss` (example-weighted loss over
      the cohort's local steps), `train/num_examples`, `train/delta_norm`.

    Example:
      >>> alg = fedavg(optax.sgd(1.0), optax.adam(1e-2))
      >>> state = alg.init(model.init(jax.random.key(0)))
      >>> state, metrics = alg.apply(state, cohort, round_key, model=model)

    References:
      McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
      Decentralized Data" (AISTATS). Reddi et al. 2021, "Adaptive Federated
      Optimization" (ICLR).
    """
    aggregator = aggregator or mean()

    def init(params):
        return FedAvgState(params, server_optimizer.init(params), aggregator.init(params))

    def apply(state, cohort, key, *, model, plan=parallel.Plan()):
        update = client_update(model, client_optimizer, regularizer=regularizer)

        def one_client(c):  # batches may be IndexedBatches: local_train reads step by step
            batches, mask, n, slot = c
            return update(state.params, batches, mask, n, jax.random.fold_in(key, slot),
                          context=state.params)

        slots = jnp.arange(cohort.mask.shape[0], dtype=jnp.int32)
        inputs = (cohort.batches, cohort.mask, cohort.num_examples, slots)
        if aggregator.weighted_mean:
            # The mean needs only sums: add n_i * Delta_i chunk by chunk instead of
            # stacking every client's delta (memory independent of the cohort size).
            def contribution(c):
                u = one_client(c)
                return u._replace(delta=jax.tree.map(lambda d: u.weight * d, u.delta))

            total = parallel.sum_clients(contribution, inputs, plan, gather_batches=False)
            divisor = jnp.where(total.weight > 0, total.weight, 1.0)
            delta = jax.tree.map(lambda t, p: (t / divisor).astype(p.dtype), total.delta,
                                 state.params)
            aggregator_state, agg_metrics = state.aggregator_state, {}
            metrics = _metrics(total.loss_sum, total.examples_seen, total.weight, delta)
        else:
            updates = parallel.map_clients(one_client, inputs, plan, gather_batches=False)
            delta, aggregator_state, agg_metrics = aggregator.apply(
                updates.delta, updates.weight, state.aggregator_state,
                jax.random.fold_in(key, AGGREGATOR_KEY), cohort.slots)
            metrics = round_metrics(updates, delta)
        server_updates, server_opt_state = server_optimizer.update(
            delta, state.server_opt_state, state.params)
        params = optax.apply_updates(state.params, server_updates)
        metrics = {**metrics, **agg_metrics}
        return FedAvgState(params, server_opt_state, aggregator_state), metrics

    return FederatedAlgorithm(init, apply)


def round_metrics(updates, delta) -> dict:
    """Standard training metrics of a round from the stacked `ClientUpdate`s."""
    return _metrics(jnp.sum(updates.loss_sum), jnp.sum(updates.examples_seen),
                    jnp.sum(updates.weight), delta)


def _metrics(loss_sum, seen, weight, delta) -> dict:
    return {
        "train/loss": loss_sum / jnp.maximum(seen, 1.0),
        "train/num_examples": weight,
        "train/delta_norm": tree.l2_norm(delta),
    }
