"""FedNova: normalized averaging, which removes FedAvg's bias towards clients taking more steps.

Round t, for a cohort S of clients with n_i examples, p_i = n_i / sum_{j in S} n_j:

    for each client i in S, in parallel:
        run tau_i local SGD steps (learning rate eta, momentum rho, proximal weight mu)
        Delta_i = w_t - w_i = eta sum_k a_{i,k} g_{i,k}          # g: gradients of F_i
        d_i = Delta_i / ||a_i||_1                                 # normalized update
    tau_eff = sum_i p_i ||a_i||_1
    w_{t+1} = w_t - eta_s tau_eff sum_i p_i d_i                   # aggregator: the p-mean

The weights a_i say how much each local gradient counts in Delta_i; they depend only on
tau_i and the local solver (k = 0 .. tau_i - 1; the paper's examples):

    plain SGD:                 a_i = [1, ..., 1],                   ||a_i||_1 = tau_i
    momentum rho:              a_{i,k} = (1 - rho^(tau_i - k)) / (1 - rho)
                               ||a_i||_1 = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)
    proximal mu, alpha = eta mu:  a_{i,k} = (1 - alpha)^(tau_i - 1 - k)
                               ||a_i||_1 = (1 - (1 - alpha)^tau_i) / alpha

With both momentum and a proximal term (the proximal gradient goes into the momentum
buffer, as `client.local_train` adds it to the loss) the paper gives no closed form;
`||a_i||_1` is then the exact sum of `|a_{i,k}|`, the solver's response at step tau_i
to a unit gradient at step k, computed by running the scalar recurrence.

Because the a_i must describe the local solver exactly, FedNova builds the clients'
optimizer itself: `optax.sgd(eta, momentum)` (optax's heavy ball,
`b <- rho b + g; w <- w - eta b`, like PyTorch's SGD used by the authors), with a
constant learning rate, so its `client_optimizer` is the float eta. The registry's
builder takes the run's client optimizer only to check, on a probe, that it is that
SGD, and raises ValueError otherwise (e.g. Adam, or momentum SGD without the option
`momentum`), rather than normalise by the wrong a_i.

Differences from the authors' code (github.com/JYWa/FedNova), which follows the paper
for plain SGD and momentum: with a proximal term it sets `tau_eff = sum p_i tau_i`
(here `sum p_i ||a_i||_1`, as in the paper's general update rule) and adds
`mu (w - w_0)` after the momentum buffer rather than inside it; weight decay is not
modelled here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_core import tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.algorithms.base import (
    AlgorithmEntry,
    FederatedAlgorithm,
    OptimizerOrRate,
    is_rate,
    server_sgd,
)
from fedjax_core.algorithms.fedavg import anchored
from fedjax_core.algorithms.fedprox import proximal_term
from fedjax_core.client import ClientContext, ClientReport
from fedjax_core.skeleton import RoundResult, algorithm
from fedjax_core.typing import Array, ArrayLike


def local_solver(client_learning_rate: float, momentum: float = 0.0,
                 ) -> optax.GradientTransformation:
    """The clients' optimizer FedNova's normalisation assumes: SGD, heavy-ball `momentum`."""
    return optax.sgd(client_learning_rate, momentum=momentum if momentum else None)


def a_norm(tau: ArrayLike, momentum: float = 0.0, eta_mu: float = 0.0) -> Array:
    """`||a||_1` for `tau` local steps of SGD with `momentum` rho and `eta_mu` = eta * mu.

    Closed forms of the paper when at most one of rho, eta * mu is nonzero; with both,
    the sum of `|r(m)|` for m = 1..tau, where `r(m)` is the (negated, 1/eta-scaled)
    displacement m steps after a unit gradient, under
    `b <- rho b + g + mu (w - w_0)`, `w <- w - eta b`.

    Args:
      tau: scalar or array of step counts (int or float), >= 0.
      momentum: rho in [0, 1).
      eta_mu: client learning rate times proximal weight, in [0, 1).

    Returns:
      Float array shaped like `tau`; 0 where `tau` is 0.

    Example:
      >>> a_norm(3, momentum=0.5)      # 1 + 1.5 + 1.75
      Array(4.25, dtype=float32)
    """
    tau = jnp.asarray(tau, jnp.float32)
    rho, alpha = float(momentum), float(eta_mu)
    if rho == 0.0 and alpha == 0.0:
        return tau
    if alpha == 0.0:
        return (tau - rho * (1.0 - rho ** tau) / (1.0 - rho)) / (1.0 - rho)
    if rho == 0.0:
        return (1.0 - (1.0 - alpha) ** tau) / alpha
    # Both: run the scalar recurrence from a unit impulse, e = (w - w_0) / eta.
    # Step 1 consumes the impulse g = 1; later steps g = 0. r(m) = -e_m.
    def one(t):
        def body(m, carry):
            b, e, total = carry
            g = jnp.where(m == 0, 1.0, 0.0)
            b = rho * b + g + alpha * e
            e = e - b
            return b, e, total + jnp.abs(e)
        zero = jnp.zeros((), jnp.float32)
        return jax.lax.fori_loop(0, t.astype(jnp.int32), body, (zero, zero, zero))[2]
    return jnp.vectorize(one)(tau)


def fednova(client_optimizer: float, server_optimizer: OptimizerOrRate = 1.0, *,
            aggregator: Aggregator | None = None, momentum: float = 0.0,
            proximal_weight: float = 0.0, server_momentum: float = 0.0) -> FederatedAlgorithm:
    """FedNova: average `Delta_i / ||a_i||_1`, then rescale by `tau_eff = sum p_i ||a_i||_1`.

    Update rule (round t, cohort S, `p_i = n_i / sum n_j`):
      each client runs `tau_i` steps (its non-empty packed steps) of
      `sgd(eta, momentum)` on `L_k(w) + mu/2 ||w - w_t||^2`,
      `Delta_i = w_t - w_i`, `d_i = Delta_i / ||a_i||_1` (see `a_norm`),
      `d = aggregator({d_i}, {n_i})` (mean: `sum p_i d_i`),
      `tau_eff = sum p_i ||a_i||_1`,
      `w_{t+1} = w_t + sgd(eta_s, server_momentum).update(tau_eff * d)` (or
      `ServerOpt(tau_eff * d)`).
    With equal tau_i and plain SGD this is FedAvg with server learning rate eta_s.

    Args:
      client_optimizer: eta, the clients' constant SGD step size, a float (the clients
        run `local_solver(eta, momentum)`, built here so that `a_i` is right); an optax
        transformation raises `ValueError`.
      server_optimizer: eta_s, a float (server SGD with `server_momentum`; 1.0 as in the
        paper), or an optax optimizer applied to `tau_eff * d`.
      aggregator: how the normalized updates d_i are combined, with weights n_i;
        defaults to the example-weighted `mean()` (= `sum p_i d_i`).
      momentum: rho, the clients' heavy-ball momentum (the paper's experiments: 0.9).
      proximal_weight: mu, FedProx's proximal term in the local objective (0: none).
      server_momentum: heavy-ball momentum of the server SGD when `server_optimizer` is
        a float (the authors' code's "gmf"); 0 as in the paper's Algorithm.

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part the server SGD's state,
      no per-client store). Round metrics: `train/loss`,
      `train/num_examples`, `train/delta_norm` (norm of `tau_eff * d`),
      `train/tau_eff`, `train/mean_local_steps` (example-weighted mean of tau_i), and
      the aggregator's.

    Example:
      >>> alg = fednova(0.1, 1.0, momentum=0.9)
      >>> state = alg.init(model.init(jax.random.key(0)))
      >>> state, metrics = jit_round(alg, model)(state, cohort, round_key)

    References:
      Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
      Federated Optimization" (NeurIPS), which gives the a_i of momentum and proximal
      SGD.
    """
    if not is_rate(client_optimizer):
        raise ValueError("fednova: client_optimizer must be the clients' SGD learning rate "
                         "(a float; set the option momentum for heavy-ball SGD): FedNova's "
                         "normalisation assumes that solver")
    client_learning_rate = client_optimizer
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if proximal_weight < 0:
        raise ValueError(f"proximal_weight must be >= 0, got {proximal_weight}")
    eta_mu = client_learning_rate * proximal_weight
    if eta_mu >= 1.0:
        raise ValueError(f"client_learning_rate * proximal_weight must be < 1, got {eta_mu}")
    solver = local_solver(client_learning_rate, momentum)
    proximal = proximal_term(proximal_weight) if proximal_weight else None
    server_optimizer = server_sgd(server_optimizer, server_momentum, "fednova")

    def client(c: ClientContext) -> ClientReport:
        regularizer = None if proximal is None else anchored(proximal, c.params)
        w, stats = c.train(c.params, solver, regularizer=regularizer)
        norm = a_norm(stats.steps, momentum, eta_mu)              # ||a_i||_1, tau_i = steps
        d = tree.scale(tree.sub(c.params, w), 1.0 / jnp.where(norm > 0, norm, 1.0))
        n = c.num_examples
        return ClientReport(d, stats, sums={"norm": n * norm, "tau": n * stats.steps})

    def server(w, opt_state, r: RoundResult):
        total = jnp.where(r.num_examples > 0, r.num_examples, 1.0)
        tau_eff = r.sums["norm"] / total                          # sum_i p_i ||a_i||_1
        step = tree.scale(r.delta, tau_eff)
        updates, opt_state = server_optimizer.update(step, opt_state, w)
        return optax.apply_updates(w, updates), opt_state, {
            "train/delta_norm": tree.l2_norm(step), "train/tau_eff": tau_eff,
            "train/mean_local_steps": r.sums["tau"] / total}

    return algorithm(client, server, init=server_optimizer.init, aggregator=aggregator)


def _matches_sgd(optimizer: optax.GradientTransformation, learning_rate: float,
                 momentum: float) -> bool:
    """Whether `optimizer` answers the gradients 2, 0, 0 as `sgd(learning_rate, momentum)`."""
    w = jnp.zeros((), jnp.float32)
    state = optimizer.init(w)
    got = []
    for g in (2.0, 0.0, 0.0):
        u, state = optimizer.update(jnp.float32(g), state, w)
        got.append(float(jnp.asarray(u)))
    want = [-2.0 * learning_rate * momentum ** k for k in range(3)]
    return np.allclose(got, want, rtol=1e-5, atol=1e-12 + 1e-6 * abs(learning_rate))


def _build(client_optimizer, server_learning_rate, aggregator=None, *, client_learning_rate,
           momentum=0.0, proximal_weight=0.0, server_momentum=0.0):
    """Registry builder. The clients run `sgd(client_learning_rate, momentum)` built by
    FedNova; `client_optimizer` must behave like it (checked on a probe), else ValueError."""
    if not _matches_sgd(client_optimizer, client_learning_rate, momentum):
        raise ValueError(
            "fednova normalises updates for plain SGD: the client optimizer must be "
            f"optax.sgd({client_learning_rate}"
            + (f", momentum={momentum})" if momentum else ")")
            + " with a constant learning rate (set the option `momentum` to the client "
            "optimizer's momentum)")
    return fednova(client_learning_rate, server_learning_rate, aggregator=aggregator,
                   momentum=momentum, proximal_weight=proximal_weight,
                   server_momentum=server_momentum)


ENTRY = AlgorithmEntry(
    "fednova", "normalized averaging: client updates divided by their local work ||a_i||_1",
    _build, "Wang et al. 2020, Tackling the Objective Inconsistency Problem (NeurIPS)",
    needs=("client_learning_rate",))
