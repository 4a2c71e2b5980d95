"""Agnostic Federated Averaging: minimise the loss of the worst mixture of domains.

Every example carries a `domain_id` in `[0, D)`. The server keeps domain weights
`lambda` (on the simplex) and a window of the cohorts' per-domain example counts over the
last W rounds. Round t, cohort S:

    alpha_d = lambda_d / mean_window(N_d)                 # per-example weight of domain d
    for each client k in S, in parallel:
        L_k,d = sum_{j in D_k, d_j = d} l_j(w_t)          # per-domain loss sums at w_t
        N_k,d = |{j in D_k : d_j = d}|                    # per-domain example counts
        beta_k = sum_d alpha_d N_k,d
        w_k = ClientOpt-train(w_t) on F_k(w) = sum_j alpha_{d_j} l_j(w) / beta_k
        Delta_k = w_t - w_k
    Delta = aggregator({Delta_k}, {beta_k})               # mean: sum beta_k Delta_k / sum beta_k
    w_{t+1} = w_t + ServerOpt.update(Delta)
    lambda_d <- lambda_d exp(eta_lambda L_d / N_d),  normalised to sum 1    (L, N summed over S)
    window <- window[1:] + [N]

`sum_k beta_k F_k = sum_d lambda_d (sum over the cohort's domain-d examples of l_j) /
mean_window(N_d)`, the lambda-mixture of the per-domain mean losses: each domain counts by
its lambda, whatever its share of the examples. This is FedJAX's
`fedjax/algorithms/agnostic_fed_avg.py` (Ro et al. 2021's communication-efficient version
of Mohri et al. 2019's AFL): its alpha, beta, aggregation weights, EG rule, window and
defaults (uniform lambda, window of ones, size 1).

Minibatch loss (`batch_loss`): F_k is a weighted mean over the client's examples (its
weights `alpha_{d_j} / beta_k` sum to 1). The default "mean" minimises the unbiased
minibatch estimate `mean_{j in b} omega_j l_j`, `omega_j = alpha_{d_j} N_k / beta_k`
(`N_k = sum_d N_k,d`), so that with one domain (or lambda proportional to the counts)
omega = 1 and a round is exactly FedAvg's. "sum" is FedJAX's `sum_{j in b} alpha_{d_j}
l_j / beta_k`, the same direction scaled by `|b| / N_k` (a client's effective step size
shrinks with its number of examples); use it to reproduce FedJAX's runs.

Per-domain losses are measured at w_t, in training mode (dropout on, as FedJAX), over
each client's first local epoch (each example once; FedJAX batches the client's data
separately, which gives the same sums). When `max_steps` cuts a client's stream inside
its first epoch, the sums and counts cover the examples it sees.
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
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
from fedjax_core.data.device import feature_names
from fedjax_core.skeleton import RoundResult, algorithm
from fedjax_core.typing import Array, Float


class AgnosticServer(NamedTuple):
    """The server part of Agnostic FedAvg's state.

    Attributes:
      opt_state: the server optimizer's state.
      domain_weights: `Float[Array, " domains"]`, lambda, on the simplex.
      domain_window: `Float[Array, "window domains"]`, the cohorts' per-domain example
        counts over the last `domain_window_size` rounds, oldest first.
    """

    opt_state: optax.OptState
    domain_weights: Float[Array, " domains"]
    domain_window: Float[Array, "window domains"]


def update_domain_weights(domain_weights: Array, domain_loss: Array, domain_learning_rate: float,
                          domain_algorithm: str = "eg") -> Array:
    """One exponentiated-gradient step on the simplex (or none).

    `"eg"`: `lambda_d <- lambda_d exp(eta loss_d) / sum_e lambda_e exp(eta loss_e)`;
    `"none"`: lambda unchanged.

    Example:
      >>> update_domain_weights(jnp.array([0.5, 0.5]), jnp.array([0.0, 1.0]), jnp.log(3.0))
      Array([0.25, 0.75], dtype=float32)
    """
    if domain_algorithm == "none":
        return domain_weights
    if domain_algorithm != "eg":
        raise ValueError(f"unsupported domain_algorithm {domain_algorithm!r}; use 'eg' or 'none'")
    w = jnp.maximum(domain_weights * jnp.exp(domain_learning_rate * domain_loss), 0.0)
    return w / jnp.sum(w)


def domain_sums(ctx: ClientContext, num_domains: int
                ) -> tuple[Float[Array, " domains"], Float[Array, " domains"]]:
    """`(L_d, N_d)`: one client's per-domain sums of the loss at the global model and its
    per-domain example counts, over its first epoch (each example once), in training mode.

    Step k's dropout key is `fold_in(fold_in(ctx.key, keys.DOMAIN), k)`.

    Args:
      ctx: the client; its batches hold `domain_id` (`[batch]` per step) in `[0, D)`.
      num_domains: D.

    Example:
      >>> loss_sums, counts = domain_sums(ctx, 3)
    """
    def step(carry, batch, mask, key):
        loss_sum, num = carry
        m = mask.astype(jnp.float32)
        losses = ctx.model.loss(batch, ctx.model.apply(ctx.params, batch, key=key, train=True)) * m
        d = batch["domain_id"]
        return (loss_sum + jax.ops.segment_sum(losses, d, num_domains),
                num + jax.ops.segment_sum(m, d, num_domains))

    zeros = jnp.zeros((num_domains,), jnp.float32)
    return ctx.loop(step, (zeros, zeros), key=keys.stream(ctx.key, keys.DOMAIN),
                    mask=ctx.first_epoch)


def agnostic_fedavg(client_optimizer: OptimizerOrRate,
                    server_optimizer: OptimizerOrRate, *,
                    aggregator: Aggregator | None = None,
                    num_domains: int,
                    domain_learning_rate: float = 0.1,
                    domain_algorithm: str = "eg",
                    domain_window_size: int = 1,
                    init_domain_weights: Sequence[float] | None = None,
                    init_domain_window: Sequence[float] | None = None,
                    batch_loss: str = "mean") -> FederatedAlgorithm:
    """Agnostic FedAvg: domain-reweighted FedAvg with exponentiated-gradient domain weights.

    Update rule (round t, cohort S; see the module docstring):
      `alpha = lambda / mean(window)`, `beta_k = sum_d alpha_d N_k,d`,
      client k minimises `F_k(w) = sum_j alpha_{d_j} l_j(w) / beta_k`,
      `Delta = aggregator({Delta_k}, {beta_k})`, `w_{t+1} = w_t + ServerOpt(Delta)`,
      `lambda <- normalise(lambda * exp(eta_lambda * L / N))`, `window <- window[1:] + [N]`.

    Args:
      client_optimizer: optax optimizer each client runs locally, fresh state each round;
        a float is `optax.sgd(that float)`.
      server_optimizer: optax optimizer applied to the aggregated delta; a float is
        `optax.sgd(that float)`.
      aggregator: combines the deltas with weights beta_k; defaults to the weighted `mean()`.
      num_domains: D; every example's `domain_id` must lie in `[0, D)`.
      domain_learning_rate: eta_lambda (FedJAX's default 0.1).
      domain_algorithm: `"eg"` (exponentiated gradient) or `"none"` (lambda fixed).
      domain_window_size: W, rounds of per-domain counts averaged into alpha's denominator.
      init_domain_weights: lambda_0, `D` non-negative numbers summing to 1; None: uniform.
      init_domain_window: the counts that fill the window at the start; None: ones.
      batch_loss: `"mean"` (unbiased minibatch estimate of F_k; one domain gives FedAvg)
        or `"sum"` (FedJAX's exact scaling); see the module docstring.

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part an `AgnosticServer`: the
      server optimizer's state, lambda and the window; no per-client store). The
      cohort's batches must hold a `domain_id` feature (`Int[Array, "clients steps
      batch"]`). Round metrics:
      `train/loss` (the clients' local objective: omega-weighted loss over their steps),
      `train/num_examples`, `train/delta_norm`, `agnostic/loss` (the cohort's mean loss at
      w_t), and per domain d: `agnostic/domain_loss_<d>` (L_d / N_d at w_t),
      `agnostic/domain_examples_<d>` (N_d), `agnostic/domain_weight_<d>` (the new lambda_d),
      and the aggregator's. Per-client outputs (`jit_round(..., per_client=True)`):
      `alpha` (`[domains]`, the per-example domain weights the client used) and `beta`
      (beta_k, its aggregation weight).

    Raises:
      ValueError: on inconsistent options.

    Example:
      >>> alg = agnostic_fedavg(0.1, 1.0, num_domains=2)   # optax.sgd(0.1), optax.sgd(1.0)
      >>> state = alg.init(model.init(jax.random.key(0)))
      >>> state, metrics = jit_round(alg, model)(state, cohort, round_key)
      >>> metrics["agnostic/domain_weight_1"], state.server.domain_weights

    References:
      Mohri, Sivek and Suresh 2019, "Agnostic Federated Learning" (ICML). Ro, Chen,
      Mathews, Mohri and Suresh 2021, "Communication-Efficient Agnostic Federated
      Averaging" (Interspeech), the version FedJAX implements.
    """
    client_optimizer, server_optimizer = sgd_if_rate(client_optimizer), sgd_if_rate(server_optimizer)
    num_domains = int(num_domains)
    if num_domains < 1:
        raise ValueError(f"num_domains must be at least 1, got {num_domains}")
    weights0 = np.asarray(np.full(num_domains, 1.0 / num_domains)
                          if init_domain_weights is None else init_domain_weights, np.float32)
    if weights0.shape != (num_domains,):
        raise ValueError(f"init_domain_weights has {weights0.size} entries, "
                         f"expected num_domains = {num_domains}")
    if (weights0 < 0).any() or abs(float(weights0.sum()) - 1.0) > 1e-6:
        raise ValueError("init_domain_weights must be non-negative and sum to 1")
    window0 = np.asarray(np.ones(num_domains) if init_domain_window is None
                         else init_domain_window, np.float32)
    if window0.shape != (num_domains,):
        raise ValueError(f"init_domain_window has {window0.size} entries, "
                         f"expected num_domains = {num_domains}")
    if domain_window_size < 1:
        raise ValueError(f"domain_window_size must be at least 1, got {domain_window_size}")
    if domain_algorithm not in ("eg", "none"):
        raise ValueError(f"unsupported domain_algorithm {domain_algorithm!r}; use 'eg' or 'none'")
    if batch_loss not in ("mean", "sum"):
        raise ValueError(f"batch_loss must be 'mean' or 'sum', got {batch_loss!r}")

    def init(params):
        return AgnosticServer(
            server_optimizer.init(params), jnp.asarray(weights0),
            jnp.tile(jnp.asarray(window0)[None], (domain_window_size, 1)))

    def client(ctx: ClientContext) -> ClientReport:
        if "domain_id" not in feature_names(ctx.batches):
            raise ValueError("agnostic_fedavg needs a 'domain_id' feature in every example "
                             f"(found {sorted(feature_names(ctx.batches))})")
        window_mean = jnp.mean(ctx.server.domain_window, axis=0)
        # A domain absent from the whole window counts as the initial window (1 example)
        # instead of dividing by zero (FedJAX would produce inf/nan).
        alpha = ctx.server.domain_weights / jnp.where(window_mean > 0, window_mean, 1.0)
        loss_sums, counts = domain_sums(ctx, num_domains)
        beta = jnp.sum(alpha * counts)

        def loss(w, batch, mask, key):  # mean_{j in b} omega_j l_j(w), or FedJAX's sum
            scale = jnp.sum(counts) if batch_loss == "mean" else jnp.sum(mask).astype(jnp.float32)
            omega = alpha[batch["domain_id"]] * scale / jnp.where(beta > 0, beta, 1.0)
            weighted = ctx.model.loss(batch, ctx.model.apply(w, batch, key=key, train=True)) * omega
            m = mask.astype(weighted.dtype)
            return jnp.sum(weighted * m) / jnp.maximum(jnp.sum(m), 1.0)

        w, stats = ctx.train(ctx.params, client_optimizer, loss=loss)
        return ClientReport(tree.sub(ctx.params, w), stats, weight=beta,
                            sums={"domain_loss": loss_sums, "domain_num": counts},
                            per_client={"alpha": alpha, "beta": beta})

    def server(params, s: AgnosticServer, r: RoundResult):
        updates, opt_state = server_optimizer.update(r.delta, s.opt_state, params)
        params = optax.apply_updates(params, updates)
        domain_loss_sum, domain_num = r.sums["domain_loss"], r.sums["domain_num"]
        domain_loss = jnp.where(domain_num > 0, domain_loss_sum / jnp.maximum(domain_num, 1.0), 0.0)
        domain_weights = update_domain_weights(s.domain_weights, domain_loss,
                                               domain_learning_rate, domain_algorithm)
        window = jnp.concatenate([s.domain_window[1:], domain_num[None]], axis=0)
        cohort_loss = jnp.sum(domain_loss_sum) / jnp.maximum(jnp.sum(domain_num), 1.0)
        metrics = {"agnostic/loss": cohort_loss}
        for d in range(num_domains):
            metrics[f"agnostic/domain_loss_{d}"] = domain_loss[d]
            metrics[f"agnostic/domain_examples_{d}"] = domain_num[d]
            metrics[f"agnostic/domain_weight_{d}"] = domain_weights[d]
        return params, AgnosticServer(opt_state, domain_weights, window), metrics

    return algorithm(client, server, init=init, aggregator=aggregator)


ENTRY = AlgorithmEntry(
    "agnostic_fedavg",
    "FedAvg minimising the worst lambda-mixture of domain losses (EG on domain weights)",
    agnostic_fedavg,
    "Mohri et al. 2019, Agnostic Federated Learning; Ro et al. 2021 (FedJAX's version)",
    needs=("num_domains",))
