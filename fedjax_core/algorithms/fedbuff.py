"""FedBuff: buffered asynchronous aggregation, simulated one buffer per round.

The asynchronous protocol (Nguyen et al. 2022, Algorithm 1): clients download the
current model w_{t'} whenever they start, train locally, and upload
`Delta_i = w_{t'} - ClientOpt-train(w_{t'}, D_i)`; the server adds arriving updates to
a buffer and, once it holds K of them, steps

    Delta = (1/K) sum_{i in buffer} s(tau_i) Delta_i,   w_{t+1} = w_t - eta_g Delta

(optionally with server momentum), where `tau_i = t - t'` is the update's staleness,
the number of server steps taken while client i trained. Algorithm 1 averages the K
buffered updates; the experiments down-weight stale ones by `s(tau) = 1/sqrt(1 + tau)`.

How the round engine simulates it. One round is one server step, i.e. one full buffer:

- buffer size K = the cohort size; the cohort's clients are the K clients whose updates
  land in this buffer;
- client i's staleness `tau_i` is drawn from a delay distribution with the round key
  (`slot_staleness`), clipped to `max_staleness` and to the versions that exist
  (`tau_i <= t`), and it trains from `w_{t - tau_i}`, which the server keeps in a ring
  buffer of the last `max_staleness + 1` versions;
- its delta is applied to the current `w_t`, weighted as below.

Concurrency is implicit: with K arrivals per server step and an update in flight for
about `tau + 1` steps, about `K (E[tau] + 1)` clients train at any time (Little's law).
What the drawn staleness does not model is the event timeline itself: the paper's simulator,
FLSim, draws training start times and per-client training durations (optionally
proportional to the client's number of examples), so a client's staleness depends on
the other clients' speeds and may correlate with its data. Here `tau_i` is drawn per
cohort slot, independently of the client and of the other slots, and is bounded by
`max_staleness` (the paper's analysis assumes bounded staleness too). Delay
distributions (`delay`), in server steps, with `tau = min(floor(d), max_staleness)`:

    "uniform":      tau ~ Uniform{0, ..., max_staleness}   (d uniform, no clipping needed)
    "half_normal":  d = delay_scale |N(0, 1)|              (FLSim's per-user half-normal durations)
    "exponential":  d ~ Exponential(mean delay_scale)      (FLSim's per-user exponential durations)

with `delay_scale` defaulting to `max_staleness / 2`.

On the simulated clock (`fedjax_core.simtime`, docs/simulated_time.md) the event timeline
replaces the draw: the host computes which K updates arrive first, which version each
client downloaded and so its staleness, and the cohort carries it (`Cohort.staleness`,
read as `ClientContext.staleness`). With `staleness_source="timeline"` (default) a
cohort's timeline staleness is used when it carries one, and the draw above otherwise
(every run without simulated time: unchanged); `"drawn"` always draws.

Weighting. FLSim (the authors' simulator) weighs an update by `example_weight(n_i) *
s(tau_i)` and reduces the buffer with a weighted average. With `staleness_in="weight"`
(default) this file does the same with example weights: the aggregator gets `Delta_i`
and weights `n_i s(tau_i)`, so the mean is `sum n_i s_i Delta_i / sum n_i s_i` (relative
down-weighting; a buffer of equally stale updates steps as far as a fresh one). With
`staleness_in="delta"` the aggregator gets `s(tau_i) Delta_i` and weights `n_i`, so the
mean is `sum n_i s_i Delta_i / sum n_i`, which with equal `n_i` is `(1/K) sum s_i Delta_i`,
Algorithm 1's buffer average of staleness-scaled updates (stale buffers take shorter
steps). With `max_staleness = 0`
both are FedAvg.

FedAsync (Xie et al. 2019, Algorithm 1), `rule="fedasync"`: the server mixes each arriving
model into the current one,

    x_{t+1} = (1 - alpha_t) x_t + alpha_t x_new,   alpha_t = alpha s(t - tau),

with x_new trained from the stale x_tau and a staleness function s: "polynomial"
`s(d) = (d + 1)^(-a)` (a = `staleness_exponent`), "hinge" `s(d) = 1` for `d <= b`, else
`1 / (a (d - b) + 1)` (a, b = `hinge_a`, `hinge_b`), or "constant" `s = 1`. It runs on the
same machinery with a buffer of one update: client i reports `s(tau_i) (x_t - x_new_i)`
(against the current model, not its start) with weight n_i, and server SGD at
`server_learning_rate = alpha` steps `x_t - alpha s (x_t - x_new) = (1 - alpha s) x_t +
alpha s x_new`, exactly the paper's update when the cohort (buffer) holds one client
(`clients_per_round=1`; on the simulated clock each server step is then one arrival). With a
larger cohort each step mixes in the example-weighted mean of the K arrivals' scaled
differences. `staleness_in` is not used by it. The paper's proximal local term (its rho) is
not included: combine with a FedProx-style client if needed.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_core import keys, tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.algorithms.base import (
    AlgorithmEntry,
    FederatedAlgorithm,
    OptimizerOrRate,
    server_sgd,
    sgd_if_rate,
)
from fedjax_core.client import ClientContext, ClientReport
from fedjax_core.skeleton import RoundResult, algorithm
from fedjax_core.typing import Array, Float, Int, Params, PRNGKey

DELAYS = ("uniform", "half_normal", "exponential")
STALENESS_IN = ("weight", "delta")
STALENESS_SOURCES = ("timeline", "drawn")
RULES = ("fedbuff", "fedasync")
STALENESS_FNS = ("polynomial", "hinge", "constant")


class FedBuffServer(NamedTuple):
    """The server part of FedBuff's state.

    Attributes:
      opt_state: the server optimizer state.
      history: the last `max_staleness + 1` global models, every leaf
        `[max_staleness + 1, ...]`; version v sits in row `v mod (max_staleness + 1)`
        (the row of t holds the current params).
      version: `Int[Array, ""]`, t, the number of server steps so far.
    """

    opt_state: optax.OptState
    history: Params
    version: Array


def slot_staleness(round_key: PRNGKey, slot, max_staleness: int = 4, delay: str = "uniform",
                   delay_scale: float | None = None) -> Int[Array, ""]:
    """The simulated staleness `tau` of cohort slot `slot`, before clamping to `t`.

    Drawn from `fold_in(keys.stream(round_key, keys.DELAY), slot)`: the same round key
    gives the same delays whatever the chunk size, and trailing padding clients change
    no other slot's delay. See the module docstring for the distributions.

    Args:
      round_key: the round key.
      slot: the client's slot in the cohort (`ClientContext.slot`).
      max_staleness: largest staleness, in server steps.
      delay: "uniform", "half_normal" or "exponential".
      delay_scale: the half-normal scale or the exponential mean, in server steps;
        None: `max_staleness / 2`.

    Returns:
      `Int[Array, ""]`, in `[0, max_staleness]`.

    Example:
      >>> slot_staleness(jax.random.key(0), 3, max_staleness=4)
    """
    if max_staleness == 0:
        return jnp.zeros((), jnp.int32)
    k = jax.random.fold_in(keys.stream(round_key, keys.DELAY), slot)
    if delay == "uniform":
        return jax.random.randint(k, (), 0, max_staleness + 1, dtype=jnp.int32)
    scale = max_staleness / 2 if delay_scale is None else float(delay_scale)
    if delay == "half_normal":
        d = scale * jnp.abs(jax.random.normal(k, ()))
    else:
        d = scale * jax.random.exponential(k, ())
    return jnp.minimum(jnp.floor(d), max_staleness).astype(jnp.int32)


def client_staleness(round_key: PRNGKey, num_clients: int, max_staleness: int = 4,
                     delay: str = "uniform", delay_scale: float | None = None
                     ) -> Int[Array, " clients"]:
    """`slot_staleness` of every slot of a cohort of `num_clients`.

    Returns:
      `Int[Array, " clients"]`, values in `[0, max_staleness]`.

    Example:
      >>> client_staleness(jax.random.key(0), 5, max_staleness=4)
    """
    _check(max_staleness, delay, delay_scale)
    return jax.vmap(lambda s: slot_staleness(round_key, s, max_staleness, delay, delay_scale))(
        jnp.arange(num_clients, dtype=jnp.int32))


def staleness_weight(tau, exponent: float = 0.5) -> Float[Array, "..."]:
    """`s(tau) = (1 + tau)^(-exponent)`; the paper's `1/sqrt(1 + tau)` at 0.5."""
    return jnp.power(1.0 + jnp.asarray(tau, jnp.float32), -exponent)


def staleness_scale(tau, fn: str = "polynomial", exponent: float = 0.5, hinge_a: float = 10.0,
                    hinge_b: int = 4) -> Float[Array, "..."]:
    """FedAsync's staleness function s(tau) (Xie et al. 2019): "polynomial"
    `(1 + tau)^(-exponent)` (`staleness_weight`), "hinge" `1` for `tau <= hinge_b`, else
    `1 / (hinge_a (tau - hinge_b) + 1)`, or "constant" `1`.

    Example:
      >>> staleness_scale(jnp.arange(8), "hinge", hinge_a=10.0, hinge_b=4)
    """
    if fn == "polynomial":
        return staleness_weight(tau, exponent)
    tau = jnp.asarray(tau, jnp.float32)
    if fn == "constant":
        return jnp.ones_like(tau)
    return jnp.where(tau <= hinge_b, 1.0, 1.0 / (hinge_a * (tau - hinge_b) + 1.0))


def _check(max_staleness, delay, delay_scale=None):
    if delay_scale is not None and not delay_scale > 0:
        raise ValueError(f"delay_scale must be positive, got {delay_scale}")
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be at least 0, got {max_staleness}")
    if delay not in DELAYS:
        raise ValueError(f"unknown delay distribution {delay!r}; choose one of: "
                         f"{', '.join(DELAYS)}")


def fedbuff(client_optimizer: OptimizerOrRate = optax.sgd(0.1),
            server_optimizer: OptimizerOrRate = optax.sgd(1.0), *,
            aggregator: Aggregator | None = None,
            max_staleness: int = 4, staleness_exponent: float = 0.5,
            delay: str = "uniform", delay_scale: float | None = None,
            staleness_in: str = "weight", server_momentum: float = 0.0,
            staleness_source: str = "timeline", rule: str = "fedbuff",
            staleness_fn: str = "polynomial", hinge_a: float = 10.0,
            hinge_b: int = 4) -> FederatedAlgorithm:
    """FedBuff: a buffer of K = cohort-size updates, each trained from a stale model.

    Update rule (round t = server step t, cohort S = the buffer):
      `tau_i = min(client_staleness(key)_i, t)`,
      `Delta_i = w_{t-tau_i} - ClientOpt^K(w_{t-tau_i}; D_i)`, `s_i = (1 + tau_i)^(-a)`,
      `Delta = aggregator({Delta_i}, {n_i s_i})` (mean: `sum n_i s_i Delta_i / sum n_i s_i`)
      or, with `staleness_in="delta"`, `aggregator({s_i Delta_i}, {n_i})`,
      `w_{t+1} = w_t + ServerOpt(Delta)`.
      With `rule="fedasync"` (FedAsync): `Delta_i = s_i (w_t - ClientOpt^K(w_{t-tau_i}; D_i))`
      with weight n_i, so with one client per round and server SGD(alpha)
      `w_{t+1} = (1 - alpha s_i) w_t + alpha s_i x_new` (module docstring).

    Args:
      client_optimizer: optax optimizer each client runs locally, fresh state each round;
        a float is `optax.sgd(that float)`.
      server_optimizer: optax optimizer on the aggregated delta, or a float eta_g: the
        paper's server SGD with learning rate eta_g (and `server_momentum`).
      aggregator: how the buffer is combined; defaults to the weighted `mean()`.
      max_staleness: largest simulated staleness; 0 is FedAvg. The state keeps
        `max_staleness + 1` model versions.
      staleness_exponent: a in `s(tau) = (1 + tau)^(-a)` (paper: 0.5; 0 turns it off).
      delay: staleness distribution, "uniform", "half_normal" or "exponential".
      delay_scale: half-normal scale / exponential mean in server steps (default
        `max_staleness / 2`); unused by "uniform".
      staleness_in: "weight" (FLSim's weighted average) or "delta" (Algorithm 1's scaled
        deltas averaged over the buffer); see the module docstring.
      server_momentum: heavy-ball momentum of the server SGD when `server_optimizer` is
        a float (0: none).
      staleness_source: "timeline": the simulated clock's staleness when the cohort
        carries one (`Cohort.staleness`, clipped to `max_staleness` and `t`), else drawn;
        "drawn": always drawn from `delay`.
      rule: "fedbuff" (deltas against each client's start) or "fedasync" (Xie et al.'s
        mixing: differences against the current model, scaled by s(tau)).
      staleness_fn: s: "polynomial" (exponent `staleness_exponent`), "hinge" or "constant"
        (`staleness_scale`).
      hinge_a, hinge_b: the hinge function's slope a and its staleness threshold b.

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part a `FedBuffServer`: the
      server optimizer's state, the ring buffer of past models and the version t; no
      per-client store). Round metrics: `train/loss`, `train/num_examples`,
      `train/delta_norm`, `fedbuff/mean_staleness` (mean of `tau_i` over the real clients
      of the buffer), and the aggregator's. Per-client outputs
      (`jit_round(..., per_client=True)`): `staleness` (`tau_i`).

    Example:
      >>> alg = fedbuff(optax.sgd(0.1), optax.sgd(1.0, momentum=0.9), max_staleness=4)
      >>> alg = fedbuff(0.1, 1.0, max_staleness=4, server_momentum=0.9)   # the same
      >>> state = alg.init(model.init(jax.random.key(0)))
      >>> state, metrics = jit_round(alg, model)(state, cohort, round_key)

    References:
      Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba 2022, "Federated Learning
      with Buffered Asynchronous Aggregation" (AISTATS), Algorithm 1; staleness weight
      as in Xie et al. 2019, "Asynchronous Federated Optimization" (arXiv:1903.03934),
      whose Algorithm 1 (FedAsync) `rule="fedasync"` is.
    """
    client_optimizer = sgd_if_rate(client_optimizer)
    server_optimizer = server_sgd(server_optimizer, server_momentum, "fedbuff")
    _check(max_staleness, delay, delay_scale)
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of: {', '.join(RULES)}")
    if staleness_fn not in STALENESS_FNS:
        raise ValueError(f"unknown staleness_fn {staleness_fn!r}; choose one of: "
                         f"{', '.join(STALENESS_FNS)}")
    if hinge_a < 0 or hinge_b < 0:
        raise ValueError(f"hinge_a and hinge_b must be at least 0, got {hinge_a}, {hinge_b}")
    if staleness_in not in STALENESS_IN:
        raise ValueError(f"unknown staleness_in {staleness_in!r}; choose one of: "
                         f"{', '.join(STALENESS_IN)}")
    if staleness_source not in STALENESS_SOURCES:
        raise ValueError(f"unknown staleness_source {staleness_source!r}; choose one of: "
                         f"{', '.join(STALENESS_SOURCES)}")
    versions = max_staleness + 1

    def init(params):
        history = jax.tree.map(lambda x: jnp.broadcast_to(x, (versions,) + jnp.shape(x)), params)
        return FedBuffServer(server_optimizer.init(params), history, jnp.zeros((), jnp.int32))

    def client(ctx: ClientContext) -> ClientReport:
        t = ctx.server.version
        if ctx.staleness is not None and staleness_source == "timeline":
            drawn = jnp.minimum(jnp.asarray(ctx.staleness, jnp.int32), max_staleness)
        else:
            drawn = slot_staleness(ctx.round_key, ctx.slot, max_staleness, delay, delay_scale)
        tau = jnp.minimum(drawn, t)
        start = jax.tree.map(lambda h: h[(t - tau) % versions], ctx.server.history)
        w, stats = ctx.train(start, client_optimizer)
        s = staleness_scale(tau, staleness_fn, staleness_exponent, hinge_a, hinge_b)
        if rule == "fedasync":  # Xie et al.: s_i (w_t - x_new) with weight n_i
            current = jax.tree.map(lambda h: h[t % versions], ctx.server.history)
            delta = jax.tree.map(lambda d: d * s.astype(d.dtype), tree.sub(current, w))
            return ClientReport(delta, stats, weight=None,
                                sums={"staleness": tau.astype(jnp.float32)},
                                per_client={"staleness": tau})
        delta = tree.sub(start, w)
        if staleness_in == "weight":  # FLSim: Delta_i with weight n_i s_i
            weight = ctx.num_examples * s
        else:  # Algorithm 1: s_i Delta_i with weight n_i
            delta, weight = jax.tree.map(lambda d: d * s.astype(d.dtype), delta), None
        return ClientReport(delta, stats, weight=weight,
                            sums={"staleness": tau.astype(jnp.float32)},
                            per_client={"staleness": tau})

    def server(params, s: FedBuffServer, r: RoundResult):
        updates, opt_state = server_optimizer.update(r.delta, s.opt_state, params)
        params = optax.apply_updates(params, updates)
        version = s.version + 1
        history = jax.tree.map(lambda h, p: h.at[version % versions].set(p), s.history, params)
        mean_staleness = r.sums["staleness"] / jnp.maximum(r.num_clients, 1.0)
        return (params, FedBuffServer(opt_state, history, version),
                {"fedbuff/mean_staleness": mean_staleness})

    return algorithm(client, server, init=init, aggregator=aggregator)


ENTRY = AlgorithmEntry(
    "fedbuff",
    "FedBuff: asynchronous buffered aggregation, stale client starts simulated per round",
    fedbuff,
    "Nguyen et al. 2022, Federated Learning with Buffered Asynchronous Aggregation")
