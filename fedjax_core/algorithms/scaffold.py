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
trajectory. The per-client `c_i` are the algorithm's per-client state, kept by the round
skeleton in a store that grows with the clients seen, not with N.
"""

import jax
import jax.numpy as jnp
import optax

from fedjax_core import tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.algorithms.base import AlgorithmEntry, FederatedAlgorithm
from fedjax_core.client import ClientContext, ClientReport
from fedjax_core.skeleton import RoundResult, algorithm

WEIGHTINGS = ("examples", "uniform")


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
      A `FederatedAlgorithm`; its state's server part is `c`, its per-client store
      the `c_i`. Round metrics:
      `train/loss`, `train/num_examples`, `train/delta_norm`, `train/control_norm`
      (`||c||` after the round), plus the aggregator's.

    Example:
      >>> alg = scaffold(optax.sgd(0.1), 1.0, client_learning_rate=0.1, num_clients=3400)
      >>> state = alg.init(params)
      >>> state, metrics = jit_round(alg, model)(state, cohort, round_key)

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
    eta_l, inv_population = float(client_learning_rate), 1.0 / int(num_clients)

    def client(ctx: ClientContext) -> ClientReport:
        x, c, c_i = ctx.params, ctx.server, ctx.state
        y, stats = ctx.train(x, client_optimizer,
                             correction=lambda g, w: tree.add(tree.sub(g, c_i), c))
        delta = tree.sub(x, y)
        # Option II; a client without steps (padding) keeps its c_i.
        scale = jnp.where(stats.steps > 0, 1.0 / (jnp.maximum(stats.steps, 1.0) * eta_l), 0.0)
        c_new = jax.tree.map(lambda ci, cc, d: jnp.where(stats.steps > 0, ci - cc + scale * d, ci),
                             c_i, c, delta)
        weight = ctx.num_examples if weighting == "examples" else (ctx.num_examples > 0) * 1.0
        return ClientReport(delta, stats, weight=weight, state=c_new,
                            sums={"control_change": tree.sub(c_new, c_i)})

    def server(x, c, r: RoundResult):
        params = jax.tree.map(lambda p, d: p - server_learning_rate * d, x, r.delta)
        # c + (|S|/N) mean_S (c_i+ - c_i) = c + (1/N) sum_S (c_i+ - c_i), real clients only.
        control = jax.tree.map(lambda cc, dc: cc + inv_population * dc, c, r.sums["control_change"])
        return params, control, {"train/control_norm": tree.l2_norm(control)}

    return algorithm(client, server, init=tree.zeros_like, client_init=tree.zeros_like,
                     aggregator=aggregator)


ENTRY = AlgorithmEntry(
    "scaffold", "SCAFFOLD: client drift corrected by control variates (option II)", scaffold,
    "Karimireddy et al. 2020, SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
    needs=("num_clients", "client_learning_rate"))
