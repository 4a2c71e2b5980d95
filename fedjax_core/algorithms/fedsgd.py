"""FedSGD: one full-batch gradient per client, averaged, one server SGD step.

Round t, for a cohort S of clients with n_i examples each:

    for each client i in S, in parallel:
        g_i = grad_w F_i(w_t),   F_i(w) = 1/n_i sum_{j in D_i} loss(w; x_j, y_j)
    g = sum_i n_i g_i / sum_i n_i                            # aggregator (default: mean)
    w_{t+1} = w_t - eta_s g                # server_optimizer: sgd(eta_s, server_momentum)

This is the baseline of McMahan et al. 2017 (FedAvg with E = 1 and B = infinity).

Each example counts once. A packed client holds its examples `epochs` times (each
epoch a fresh permutation, concatenated and cut into batches, see `data/pack.py`), and
`max_steps` may cut that stream inside an epoch, so the masked mean over all its slots
could count some examples more often than others. The gradient therefore uses only the
first `n_i` slots of the client's flattened batch stream, which are exactly one
permutation of its data (the first epoch); it also skips the later epochs' steps. When
`max_steps` cuts the stream before `n_i` slots, the gradient is the mean over the
examples that were packed, while the client's weight stays `n_i`, as in FedAvg. The
gradient is accumulated batch by batch (sums of per-example gradients, divided once by
the count), so memory stays that of one batch.
"""

import jax.numpy as jnp
import optax

from fedjax_core import tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.algorithms.base import (
    AlgorithmEntry,
    FederatedAlgorithm,
    OptimizerOrRate,
    server_sgd,
)
from fedjax_core.client import ClientContext, ClientReport, TrainStats
from fedjax_core.skeleton import RoundResult, algorithm


def fedsgd(client_optimizer: None, server_optimizer: OptimizerOrRate, *,
           aggregator: Aggregator | None = None,
           server_momentum: float = 0.0) -> FederatedAlgorithm:
    """FedSGD: the server descends the example-weighted mean of full-batch client gradients.

    Update rule (round t, cohort S):
      `g_i = 1/n_i sum_{j in D_i} grad loss_j(w_t)` (each example once, see the module
      docstring for epochs > 1), `g = aggregator({g_i}, {n_i})` (mean: `sum n_i g_i /
      sum n_i`), `w_{t+1} = w_t + sgd(eta_s, momentum).update(g)` (or `ServerOpt(g)`).

    There is no client optimizer: a client takes no local step, it only computes its
    gradient (in the model's training mode, so with dropout where the model has it).

    Args:
      client_optimizer: must be None (FedSGD's clients take no optimizer step); it comes
        first by name only, as in every algorithm factory. Anything else raises
        `ValueError`.
      server_optimizer: eta_s, a float (the global SGD's step size, with
        `server_momentum`), or an optax optimizer applied to the aggregated gradient.
      aggregator: how the gradients are combined; defaults to the example-weighted
        `mean()`.
      server_momentum: heavy-ball momentum of the server SGD when `server_optimizer` is
        a float; 0 is plain FedSGD.

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part the server SGD's state,
      no per-client store). Round metrics: `train/loss` (the cohort's example-weighted
      loss at w_t), `train/num_examples`, `train/delta_norm` (norm of the aggregated
      gradient g), and the aggregator's.

    Example:
      >>> alg = fedsgd(None, 0.5)
      >>> state = alg.init(model.init(jax.random.key(0)))
      >>> state, metrics = jit_round(alg, model)(state, cohort, round_key)

    References:
      McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
      Decentralized Data" (AISTATS): FederatedSGD, the baseline of its experiments.
    """
    if client_optimizer is not None:
        raise ValueError("fedsgd: client_optimizer must be None (its clients take no local "
                         "step, they only send their full-batch gradient)")
    server_optimizer = server_sgd(server_optimizer, server_momentum, "fedsgd")

    def client(c: ClientContext) -> ClientReport:
        # Over the first epoch: each example once; no local step.
        loss_sum, grad_sum, count = c.full_batch(c.params, key=c.key)
        g = tree.scale(grad_sum, 1.0 / jnp.maximum(count, 1.0))
        return ClientReport(g, TrainStats(loss_sum, count, jnp.zeros((), jnp.float32)))

    def server(w, opt_state, r: RoundResult):
        updates, opt_state = server_optimizer.update(r.delta, opt_state, w)
        return optax.apply_updates(w, updates), opt_state, {}

    return algorithm(client, server, init=server_optimizer.init, aggregator=aggregator)


def _build(client_optimizer, server_learning_rate, aggregator=None, server_momentum=0.0):
    """Registry builder: FedSGD has no client optimizer, `client_optimizer` is ignored."""
    del client_optimizer
    return fedsgd(None, server_learning_rate, aggregator=aggregator,
                  server_momentum=server_momentum)


ENTRY = AlgorithmEntry(
    "fedsgd", "one full-batch gradient per client, weighted mean, server SGD (no local steps)",
    _build, "McMahan et al. 2017, Communication-Efficient Learning (FederatedSGD)")
