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
The per-client `grad_i` live in a `client_state.ClientStore` that grows with the
clients seen, not with m.
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
from fedjax_core.client import client_update
from fedjax_core.typing import Params, State


class FedDynState(NamedTuple):
    """Server state of FedDyn.

    Attributes:
      params: the global model theta^t.
      h: the server correction h^t, shaped like the params.
      client_grads: the clients' `grad_i`, one store row per client seen.
      aggregator_state: the aggregator's state.
    """

    params: Params
    h: Params
    client_grads: client_state.ClientStore
    aggregator_state: State


def feddyn(client_optimizer: optax.GradientTransformation, server_learning_rate: float,
           num_clients: int, alpha: float = 0.01,
           aggregator: Aggregator | None = None) -> FederatedAlgorithm:
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
      client_optimizer: the local optimizer (the paper uses SGD).
      server_learning_rate: eta_g, 1.0 for the paper's algorithm.
      num_clients: m, the population size.
      alpha: the regularization strength, positive (e.g. 0.1, 0.01, 0.001).
      aggregator: combines the model deltas; defaults to `mean()`.

    Returns:
      A `FederatedAlgorithm` whose state is a `FedDynState`. Round metrics:
      `train/loss` (of `L_i` alone, without the regularizer), `train/num_examples`,
      `train/delta_norm`, `train/h_norm` (`||h^t||`), plus the aggregator's.

    Example:
      >>> alg = feddyn(optax.sgd(0.1), 1.0, num_clients=100, alpha=0.01)
      >>> state, index = alg.init(params), client_state.StateIndex()
      >>> state, slots = client_state.prepare(index, state, cohort.client_index)
      >>> state, metrics = alg.apply(state, cohort._replace(slots=slots), key, model=model)

    References:
      Acar et al. 2021, "Federated Learning Based on Dynamic Regularization" (ICLR),
      Algorithm 1.
    """
    if not alpha > 0:
        raise ValueError(f"feddyn: alpha must be positive, got {alpha}")
    if int(num_clients) < 1:
        raise ValueError(f"feddyn: num_clients must be at least 1, got {num_clients}")
    aggregator = aggregator or mean()
    alpha = float(alpha)
    population = float(int(num_clients))

    def regularizer(w, context):
        grad_i, anchor = context
        linear = sum(jnp.vdot(g, x) for g, x in zip(jax.tree.leaves(grad_i), jax.tree.leaves(w)))
        prox = sum(jnp.sum(jnp.square(x - a))
                   for x, a in zip(jax.tree.leaves(w), jax.tree.leaves(anchor)))
        return -linear + 0.5 * alpha * prox

    def init(params):
        zeros = tree.zeros_like(params)
        return FedDynState(params, zeros, client_state.empty_store(zeros), aggregator.init(params))

    def apply(state, cohort, key, *, model, plan=parallel.Plan()):
        slots = client_state.require_slots(cohort, "feddyn")
        update = client_update(model, client_optimizer, regularizer=regularizer)
        theta = state.params
        grads_old = client_state.gather(state.client_grads, slots, tree.zeros_like(theta))

        def one_client(inputs):
            batches, mask, n, position, grad_i = inputs
            u = update(theta, batches, mask, n, jax.random.fold_in(key, position),
                       (grad_i, theta))
            # grad_i - alpha (theta_i - theta^{t-1}); padding clients have delta 0.
            return u, jax.tree.map(lambda g, d: g + alpha * d, grad_i, u.delta)

        positions = jnp.arange(cohort.mask.shape[0], dtype=jnp.int32)
        updates, grads_new = parallel.map_clients(
            one_client, (cohort.batches, cohort.mask, cohort.num_examples, positions, grads_old),
            plan)
        real = (jnp.asarray(cohort.num_examples) > 0).astype(jnp.float32)
        cohort_size = jnp.sum(real)
        delta, aggregator_state, agg_metrics = aggregator.apply(
            updates.delta, real, state.aggregator_state,
            jax.random.fold_in(key, AGGREGATOR_KEY), slots)
        h = jax.tree.map(lambda hh, d: hh + (alpha * cohort_size / population) * d,
                         state.h, delta)
        any_real = cohort_size > 0
        params = jax.tree.map(
            lambda p, d, hh: jnp.where(any_real, p - server_learning_rate * (d + hh / alpha), p),
            theta, delta, h)
        store = client_state.scatter(state.client_grads, slots, grads_new, keep=real > 0)
        metrics = {**round_metrics(updates, delta), "train/h_norm": tree.l2_norm(h),
                   **agg_metrics}
        return FedDynState(params, h, store, aggregator_state), metrics

    return FederatedAlgorithm(init, apply)


ENTRY = AlgorithmEntry(
    "feddyn", "FedDyn: dynamic per-client regularization and a server correction h", feddyn,
    "Acar et al. 2021, Federated Learning Based on Dynamic Regularization",
    needs=("num_clients",))
