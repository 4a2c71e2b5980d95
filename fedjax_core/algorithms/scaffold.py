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

from fedjax_core import tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.algorithms.base import (
    AlgorithmEntry,
    FederatedAlgorithm,
    OptimizerOrRate,
    client_rate,
    server_rate,
    sgd_if_rate,
)
from fedjax_core.client import ClientContext, ClientReport
from fedjax_core.skeleton import RoundResult, algorithm

WEIGHTINGS = ("examples", "uniform")


def scaffold(client_optimizer: OptimizerOrRate, server_optimizer: float, *,
             aggregator: Aggregator | None = None, client_learning_rate: float | None = None,
             num_clients: int, weighting: str = "examples") -> FederatedAlgorithm:
    """SCAFFOLD with option II control variates.

    Update rule (round t, cohort S of real clients, N clients in all):
      clients descend on `g - c_i + c` from `x`, ending at `y_i` after `K_i` steps;
      `c_i <- c_i - c + (x - y_i) / (K_i eta_l)`;
      `x <- x - eta_g aggregator({x - y_i})`;
      `c <- c + (1/N) sum_{i in S} (c_i+ - c_i)`.

    Args:
      client_optimizer: eta_l, the clients' SGD learning rate (a float: `optax.sgd(eta_l)`,
        as option II assumes), or an optax optimizer fed the corrected gradients, then
        with `client_learning_rate`.
      server_optimizer: eta_g, a float (1.0 in the paper's experiments). An optax
        transformation raises `ValueError`: the server state holds only c.
      aggregator: combines the model deltas with the `weighting` weights; defaults to
        the weighted `mean()`. It does not see the control variates.
      client_learning_rate: eta_l of option II; required when `client_optimizer` is a
        transformation (its learning rate), else taken from it.
      num_clients: N, the population size (the control variate update scales by |S|/N).
      weighting: aggregation weights of the model deltas: `"examples"` (n_i, as FedAvg
        here; the default) or `"uniform"` (the paper's plain mean over S). The control
        variate update always uses the paper's plain mean.

    Returns:
      A `FederatedAlgorithm`; its state's server part is `c`, its per-client store
      the `c_i`. Round metrics:
      `train/loss`, `train/num_examples`, `train/delta_norm`, `train/control_norm`
      (`||c||` after the round), plus the aggregator's.

    Example:
      >>> alg = scaffold(0.1, 1.0, num_clients=3400)   # clients: optax.sgd(0.1)
      >>> state = alg.init(params)
      >>> state, metrics = jit_round(alg, model)(state, cohort, round_key)

    References:
      Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
      Federated Learning" (ICML), Algorithm 1.
    """
    eta_l = client_rate(client_optimizer, client_learning_rate, "scaffold")
    client_optimizer = sgd_if_rate(client_optimizer)
    server_learning_rate = server_rate(
        server_optimizer, "scaffold", "it is eta_g of x <- x - eta_g Delta (the server state "
        "holds only the control variate c)")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"scaffold: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not eta_l > 0:
        raise ValueError(f"scaffold: client_learning_rate must be positive, "
                         f"got {eta_l}")
    if int(num_clients) < 1:
        raise ValueError(f"scaffold: num_clients must be at least 1, got {num_clients}")
    eta_l, inv_population = float(eta_l), 1.0 / int(num_clients)

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


def _build(client_optimizer, server_learning_rate, aggregator=None, *, client_learning_rate,
           num_clients, weighting="examples"):
    """Registry builder: `scaffold(...)` with the facts the facade supplies, required."""
    return scaffold(client_optimizer, server_learning_rate, aggregator=aggregator,
                    client_learning_rate=client_learning_rate, num_clients=num_clients,
                    weighting=weighting)


ENTRY = AlgorithmEntry(
    "scaffold", "SCAFFOLD: client drift corrected by control variates (option II)", _build,
    "Karimireddy et al. 2020, SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
    needs=("num_clients", "client_learning_rate"))
