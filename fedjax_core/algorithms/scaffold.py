"""SCAFFOLD: stochastic controlled averaging (Karimireddy et al. 2020, Algorithm 1, option II).

Server state: the model x, the server control variate c; each client i keeps its own
control variate c_i (zero until it first trains). Round t, cohort S of real clients:

    for each client i in S, in parallel:
        y_i = x
        for k in 1 .. K_i:                                  # K_i: its non-empty local steps
            g = minibatch gradient of f_i at y_i
            y_i = ClientOpt(y_i, g - c_i + c)               # SGD(eta_l): y_i -= eta_l (g - c_i + c)
        c_i+ = c_i - c + (x - y_i) / (K_i eta_l)            # option II
        Delta_i = x - y_i,   Delta c_i = c_i+ - c_i;   c_i <- c_i+
    Delta = aggregator({Delta_i})                            # paper: plain mean over S
    x <- x - eta_g Delta                                     # the paper's x + eta_g mean(y_i - x)
    c <- c + (|S| / N) mean_{i in S} Delta c_i = c + (1/N) sum_{i in S} Delta c_i

N is the population size. Option II reads `eta_l` as the client's SGD learning rate;
with SGD, `c_i+` is the mean of the client's raw minibatch gradients along its
trajectory. The per-client `c_i` live in a `client_state.ClientStore` that grows with
the clients seen, not with N.
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

WEIGHTINGS = ("examples", "uniform")


class ScaffoldState(NamedTuple):
    """Server state of SCAFFOLD.

    Attributes:
      params: the global model x.
      control: the server control variate c, shaped like the params.
      client_controls: the clients' control variates c_i, one store row per client seen.
      aggregator_state: the aggregator's state.
    """

    params: Params
    control: Params
    client_controls: client_state.ClientStore
    aggregator_state: State


def _client_weights(num_examples, weighting: str):
    """Aggregation weights `[clients]`: n_i (`"examples"`) or 1 (`"uniform"`), 0 for padding."""
    n = jnp.asarray(num_examples, jnp.float32)
    return n if weighting == "examples" else (n > 0).astype(jnp.float32)


def scaffold(client_optimizer: optax.GradientTransformation, server_learning_rate: float,
             client_learning_rate: float, num_clients: int, weighting: str = "examples",
             aggregator: Aggregator | None = None) -> FederatedAlgorithm:
    """SCAFFOLD with option II control variates.

    Update rule (round t, cohort S of real clients, N clients in all):
      clients descend on `g - c_i + c` from `x`, ending at `y_i` after `K_i` steps;
      `c_i <- c_i - c + (x - y_i) / (K_i eta_l)`;
      `x <- x - eta_g aggregator({x - y_i})`;
      `c <- c + (1/N) sum_{i in S} (c_i+ - c_i)`.

    Args:
      client_optimizer: the local optimizer, fed the corrected gradients; option II
        assumes SGD with learning rate `client_learning_rate`.
      server_learning_rate: eta_g (1.0 in the paper's experiments).
      client_learning_rate: eta_l, the client optimizer's learning rate.
      num_clients: N, the population size (the control variate update scales by |S|/N).
      weighting: aggregation weights of the model deltas: `"examples"` (n_i, as FedAvg
        here; the default) or `"uniform"` (the paper's plain mean over S). The control
        variate update always uses the paper's plain mean.
      aggregator: combines the model deltas with those weights; defaults to the weighted
        `mean()`. It does not see the control variates.

    Returns:
      A `FederatedAlgorithm` whose state is a `ScaffoldState`. Round metrics:
      `train/loss`, `train/num_examples`, `train/delta_norm`, `train/control_norm`
      (`||c||` after the round), plus the aggregator's.

    Example:
      >>> alg = scaffold(optax.sgd(0.1), 1.0, client_learning_rate=0.1, num_clients=3400)
      >>> state, index = alg.init(params), client_state.StateIndex()
      >>> state, slots = client_state.prepare(index, state, cohort.client_index)
      >>> state, metrics = alg.apply(state, cohort._replace(slots=slots), key, model=model)

    References:
      Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
      Federated Learning" (ICML), Algorithm 1.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"scaffold: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not client_learning_rate > 0:
        raise ValueError(f"scaffold: client_learning_rate must be positive, "
                         f"got {client_learning_rate}")
    if int(num_clients) < 1:
        raise ValueError(f"scaffold: num_clients must be at least 1, got {num_clients}")
    aggregator = aggregator or mean()
    eta_l = float(client_learning_rate)
    inv_population = 1.0 / int(num_clients)

    def correction(grads, w, context):
        del w
        c_i, c = context
        return jax.tree.map(lambda g, ci, cc: g - ci + cc, grads, c_i, c)

    def init(params):
        zeros = tree.zeros_like(params)
        return ScaffoldState(params, zeros, client_state.empty_store(zeros),
                             aggregator.init(params))

    def apply(state, cohort, key, *, model, plan=parallel.Plan()):
        slots = client_state.require_slots(cohort, "scaffold")
        update = client_update(model, client_optimizer, grad_correction=correction)
        x, c = state.params, state.control
        c_old = client_state.gather(state.client_controls, slots, tree.zeros_like(x))

        def one_client(inputs):
            batches, mask, n, position, c_i = inputs
            u = update(x, batches, mask, n, jax.random.fold_in(key, position), (c_i, c))
            steps = jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.float32)
            # Option II; a client without steps (padding) keeps its c_i.
            scale = jnp.where(steps > 0, 1.0 / (jnp.maximum(steps, 1.0) * eta_l), 0.0)
            c_new = jax.tree.map(
                lambda ci, cc, d: jnp.where(steps > 0, ci - cc + scale * d, ci), c_i, c, u.delta)
            return u, c_new

        positions = jnp.arange(cohort.mask.shape[0], dtype=jnp.int32)
        updates, c_new = parallel.map_clients(
            one_client, (cohort.batches, cohort.mask, cohort.num_examples, positions, c_old), plan)
        real = jnp.asarray(cohort.num_examples) > 0
        delta, aggregator_state, agg_metrics = aggregator.apply(
            updates.delta, _client_weights(cohort.num_examples, weighting),
            state.aggregator_state, jax.random.fold_in(key, AGGREGATOR_KEY), slots)
        params = jax.tree.map(lambda p, d: p - server_learning_rate * d, x, delta)
        # c + (|S|/N) mean_S (c_i+ - c_i) = c + (1/N) sum_S (c_i+ - c_i), real clients only.
        control_change = tree.weighted_sum(tree.sub(c_new, c_old), real.astype(jnp.float32))
        control = jax.tree.map(lambda cc, dc: cc + inv_population * dc, c, control_change)
        store = client_state.scatter(state.client_controls, slots, c_new, keep=real)
        metrics = {**round_metrics(updates, delta), "train/control_norm": tree.l2_norm(control),
                   **agg_metrics}
        return ScaffoldState(params, control, store, aggregator_state), metrics

    return FederatedAlgorithm(init, apply)


ENTRY = AlgorithmEntry(
    "scaffold", "SCAFFOLD: client drift corrected by control variates (option II)", scaffold,
    "Karimireddy et al. 2020, SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
    needs=("num_clients", "client_learning_rate"))
