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
    w_{t+1} = w_t - eta_g Delta

The global model is trained exactly as in FedAvg; the personal models never reach the
server. A client's personal model is what `evaluate` uses for it once it has one.

Evaluation uses `fedjax_core.personalization.evaluate_personal`: each client with its
own model, compiled once.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_core import client_state, parallel, tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.aggregate.mean import mean
from fedjax_core.algorithms.base import AlgorithmEntry, FederatedAlgorithm
from fedjax_core.algorithms.fedavg import AGGREGATOR_KEY, round_metrics
from fedjax_core.client import ClientUpdate, local_train
from fedjax_core.personalization import evaluate_personal
from fedjax_core.typing import Params, State

PERSONAL_KEY = (-2) & 0x7FFFFFFF
"""A client's personal pass uses `fold_in(client_key, PERSONAL_KEY)` as its key (its step k
then folds in k), distinct from the global pass's step keys `fold_in(client_key, k)`."""


class DittoState(NamedTuple):
    """Server state of Ditto.

    Attributes:
      params: the global model w.
      personal: the personal models v_k, one store row (shaped like the params) per
        client seen.
      aggregator_state: the aggregator's state.
    """

    params: Params
    personal: client_state.ClientStore
    aggregator_state: State


def ditto(client_optimizer: optax.GradientTransformation, server_learning_rate: float = 1.0,
          lam: float = 0.1, aggregator: Aggregator | None = None) -> FederatedAlgorithm:
    """Ditto with FedAvg as the global solver.

    Update rule (round t, cohort S):
      `w_k = ClientOpt^K(w_t; D_k)`, `Delta = aggregator({w_t - w_k}, {n_k})`,
      `w_{t+1} = w_t - eta_g Delta`;
      each k in S, over the same K batches: `v_k <- ClientOpt^K(v_k; F_k + lam/2 ||v - w_t||^2)`,
      i.e. with SGD `v_k <- v_k - eta (grad F_k(v_k) + lam (v_k - w_t))`; a client's first
      `v_k` is `w_t`.

    Args:
      client_optimizer: the local optimizer of both passes (fresh state for each pass
        and round); the paper uses SGD(eta).
      server_learning_rate: eta_g; 1.0 is the paper's `w_{t+1} = w_t + mean(w_k - w_t)`.
      lam: lambda >= 0, the pull of the personal models towards the global one (0: purely
        local models; large: the global model). The paper tunes it per dataset over
        {0.05, 0.1, 0.2, 0.5, 1, 2}; the authors' run scripts use 1.
      aggregator: combines the global deltas; defaults to the example-weighted `mean()`.

    Returns:
      A `FederatedAlgorithm` whose state is a `DittoState`, with `evaluate` (personal
      models; see `evaluate_personal`). Round metrics: `train/loss` (the global pass),
      `train/num_examples`, `train/delta_norm`, `train/personal_loss` (the personal pass,
      without the regularizer), plus the aggregator's.

    Example:
      >>> alg = ditto(optax.sgd(0.05), 1.0, lam=1.0)
      >>> state, index = alg.init(params), client_state.StateIndex()
      >>> state, slots = client_state.prepare(index, state, cohort.client_index)
      >>> state, metrics = alg.apply(state, cohort._replace(slots=slots), key, model=model)
      >>> alg.evaluate(model, state, test_data, 256, EvalClients(rows))

    References:
      Li, Hu, Beirami, Smith 2021, "Ditto: Fair and Robust Federated Learning Through
      Personalization" (ICML), Algorithm 1.
    """
    if not lam >= 0:
        raise ValueError(f"ditto: lam must be non-negative, got {lam}")
    aggregator = aggregator or mean()
    lam = float(lam)

    def proximal(v, w_global):  # lam/2 ||v - w_t||^2 (no sqrt: its gradient at v = w_t is 0)
        return 0.5 * lam * sum(jnp.sum(jnp.square(a - b))
                               for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(w_global)))

    def init(params):
        return DittoState(params, client_state.empty_store(params), aggregator.init(params))

    def apply(state, cohort, key, *, model, plan=parallel.Plan()):
        slots = client_state.require_slots(cohort, "ditto")
        train_global = local_train(model, client_optimizer)
        train_personal = local_train(model, client_optimizer, regularizer=proximal)
        w = state.params
        v_old = client_state.gather(state.personal, slots, w)

        def one_client(inputs):
            batches, mask, n, position, v = inputs
            client_key = jax.random.fold_in(key, position)
            w_k, loss_sum, seen = train_global(w, batches, mask, client_key)
            v_k, personal_loss_sum, _ = train_personal(
                v, batches, mask, jax.random.fold_in(client_key, PERSONAL_KEY), w)
            u = ClientUpdate(tree.sub(w, w_k), jnp.asarray(n, jnp.float32), loss_sum, seen)
            return u, v_k, personal_loss_sum

        positions = jnp.arange(cohort.mask.shape[0], dtype=jnp.int32)
        updates, v_new, personal_loss = parallel.map_clients(
            one_client, (cohort.batches, cohort.mask, cohort.num_examples, positions, v_old), plan)
        delta, aggregator_state, agg_metrics = aggregator.apply(
            updates.delta, updates.weight, state.aggregator_state,
            jax.random.fold_in(key, AGGREGATOR_KEY), slots)
        params = jax.tree.map(lambda p, d: p - server_learning_rate * d, w, delta)
        # A client without examples keeps its row; a new one gets its fresh v_k = w_t.
        keep = (jnp.asarray(cohort.num_examples) > 0) | slots.is_new
        personal = client_state.scatter(state.personal, slots, v_new, keep=keep)
        seen = jnp.sum(updates.examples_seen)
        metrics = {**round_metrics(updates, delta),
                   "train/personal_loss": jnp.sum(personal_loss) / jnp.maximum(seen, 1.0),
                   **agg_metrics}
        return DittoState(params, personal, aggregator_state), metrics

    def evaluate(model, state, data, batch_size=256, clients=None):
        return evaluate_personal(model, _select_personal, state.personal.rows, state.params,
                                 data, batch_size, None if clients is None else clients.rows)

    return FederatedAlgorithm(init, apply, evaluate)


def _select_personal(personal: Params, global_params: Params, row) -> Params:
    """Ditto's model of store row `row`: `v_row`, or the global model when `row < 0`."""
    r = jnp.maximum(row, 0)
    return jax.tree.map(lambda t, g: jnp.where(row >= 0, t[r], g), personal, global_params)


ENTRY = AlgorithmEntry(
    "ditto", "Ditto: FedAvg plus per-client personal models pulled towards the global one",
    ditto, "Li et al. 2021, Ditto: Fair and Robust Federated Learning Through Personalization")
