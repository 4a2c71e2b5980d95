"""Ditto: fair and robust federated learning through personalization (Li et al. 2021, Algorithm 1).

Server state: the global model w; each client k that has trained keeps a personal model
v_k (it starts at the global model of the round it first trains in). Round t, cohort S:

    for each client k in S, in parallel:
        w_k = ClientOpt^K(w_t; D_k)                        # FedAvg's local steps from w_t
        v_k <- v_k, or w_t if k is new
        for s in 1 .. K:                             # the same K non-empty steps (batches)
            v_k = v_k - eta (grad F_k(v_k) + lam (v_k - w_t))
                                                     # i.e. ClientOpt on F_k + lam/2 ||v - w_t||^2
        Delta_k = w_t - w_k
    Delta = aggregator({Delta_k})                          # default: example-weighted mean
    w_{t+1} = w_t - eta_g Delta                            # or w_t + ServerOpt(Delta)

The global model is trained exactly as in FedAvg; the personal models never reach the
server. They are the algorithm's per-client state, kept by the round skeleton in a
store that grows with the clients seen. A client's personal model is what `evaluate`
uses for it once it has one.

Evaluation uses `fedjax_core.personalization.evaluate_personal`: each client with its
own model, compiled once.
"""

import jax
import jax.numpy as jnp
import optax

from fedjax_core import keys, tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.algorithms.base import (
    AlgorithmEntry,
    FederatedAlgorithm,
    OptimizerOrRate,
    sgd_if_rate,
)
from fedjax_core.client import ClientContext, ClientReport
from fedjax_core.personalization import evaluate_personal
from fedjax_core.skeleton import RoundResult, algorithm
from fedjax_core.typing import Params


def ditto(client_optimizer: OptimizerOrRate, server_optimizer: OptimizerOrRate = 1.0, *,
          aggregator: Aggregator | None = None, lam: float = 0.1) -> FederatedAlgorithm:
    """Ditto with FedAvg as the global solver.

    Update rule (round t, cohort S):
      `w_k = ClientOpt^K(w_t; D_k)`, `Delta = aggregator({w_t - w_k}, {n_k})`,
      `w_{t+1} = w_t - eta_g Delta` (or `w_t + ServerOpt(Delta)`);
      each k in S, over the same K batches: `v_k <- ClientOpt^K(v_k; F_k + lam/2 ||v - w_t||^2)`,
      i.e. with SGD `v_k <- v_k - eta (grad F_k(v_k) + lam (v_k - w_t))`; a client's first
      `v_k` is `w_t`.

    Args:
      client_optimizer: the local optimizer of both passes (fresh state for each pass
        and round); the paper uses SGD(eta); a float is `optax.sgd(that float)`.
      server_optimizer: eta_g, a float (server SGD; 1.0 is the paper's
        `w_{t+1} = w_t + mean(w_k - w_t)`), or an optax optimizer applied to Delta.
      aggregator: combines the global deltas; defaults to the example-weighted `mean()`.
      lam: lambda >= 0, the pull of the personal models towards the global one (0: purely
        local models; large: the global model). The paper tunes it per dataset over
        {0.05, 0.1, 0.2, 0.5, 1, 2}; the authors' run scripts use 1.

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part the server optimizer's
      state (no arrays for a float); its per-client store
      holds the personal models v_k, one row shaped like the params per client that has
      trained), with `evaluate` (personal models; see `evaluate_personal`). Round
      metrics: `train/loss` (the global pass), `train/num_examples`, `train/delta_norm`,
      `train/personal_loss` (the personal pass, without the regularizer), plus the
      aggregator's.

    Example:
      >>> alg = ditto(optax.sgd(0.05), 1.0, lam=1.0)
      >>> state = alg.init(params)
      >>> state, metrics = jit_round(alg, model)(state, cohort, round_key)
      >>> alg.evaluate(model, state, test_data, 256, EvalClients(rows))

    References:
      Li, Hu, Beirami, Smith 2021, "Ditto: Fair and Robust Federated Learning Through
      Personalization" (ICML), Algorithm 1.
    """
    if not lam >= 0:
        raise ValueError(f"ditto: lam must be non-negative, got {lam}")
    lam = float(lam)
    client_optimizer, server_optimizer = sgd_if_rate(client_optimizer), sgd_if_rate(server_optimizer)

    def client(c: ClientContext) -> ClientReport:
        w_t, v = c.params, c.state                 # v: w_t for a client never seen

        def proximal(q):  # lam/2 ||q - w_t||^2 (no sqrt: its gradient at q = w_t is 0)
            return 0.5 * lam * sum(jnp.sum(jnp.square(a - b))
                                   for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(w_t)))

        w_k, stats = c.train(w_t, client_optimizer)
        v_k, personal = c.train(v, client_optimizer, key=keys.stream(c.key, keys.PERSONAL),
                                regularizer=proximal)
        return ClientReport(tree.sub(w_t, w_k), stats, state=v_k,
                            sums={"personal_loss": personal.loss_sum,
                                  "personal_seen": personal.examples_seen})

    def server(w, opt_state, r: RoundResult):
        updates, opt_state = server_optimizer.update(r.delta, opt_state, w)
        loss = r.sums["personal_loss"] / jnp.maximum(r.sums["personal_seen"], 1.0)
        return optax.apply_updates(w, updates), opt_state, {"train/personal_loss": loss}

    def evaluate(model, state, data, batch_size=256, clients=None):
        return evaluate_personal(model, _select_personal, state.store.rows, state.params,
                                 data, batch_size, None if clients is None else clients.rows)

    return algorithm(client, server, init=server_optimizer.init,
                     client_init=lambda params: params, aggregator=aggregator, evaluate=evaluate)


def _select_personal(personal: Params, global_params: Params, row) -> Params:
    """Ditto's model of store row `row`: `v_row`, or the global model when `row < 0`."""
    r = jnp.maximum(row, 0)
    return jax.tree.map(lambda t, g: jnp.where(row >= 0, t[r], g), personal, global_params)


ENTRY = AlgorithmEntry(
    "ditto", "Ditto: FedAvg plus per-client personal models pulled towards the global one",
    ditto, "Li et al. 2021, Ditto: Fair and Robust Federated Learning Through Personalization")
