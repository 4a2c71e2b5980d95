"""HypCluster: K cluster models; each client trains the one that fits its data best.

State: K models `w^1..w^K` (stacked, leading axis K), each with its own server
optimizer state and aggregator state. Round t, for a cohort S of clients with n_i
examples each:

    for each client i in S, in parallel:
        L_i^k = mean loss of w_t^k on client i's examples (each example once), k = 1..K
        c_i = argmin_k L_i^k                                   # maximization step
        Delta_i = w_t^{c_i} - ClientOpt-train(w_t^{c_i}, client i's data)
    for each cluster k:                                        # expectation step
        S_k = {i in S : c_i = k}
        if S_k has examples:
            Delta^k = sum_{i in S_k} n_i Delta_i / sum_{i in S_k} n_i   # aggregator (mean)
            w_{t+1}^k = w_t^k + ServerOpt_k.update(Delta^k)
        else:
            w_{t+1}^k = w_t^k                                  # and its optimizer state

Initialisation (k-means++ variant of FedJAX's `ModelKMeansInitializer`/`kmeans_init`):
`init(params)` puts `params` in all K slots and marks the state uninitialised. The first
round with at least one real client then spends its client work on choosing the centers
instead of a HypCluster update:

    every client i of the cohort trains from params:        v_i = ClientOpt-train(params, D_i)
    center_1 = v_j, j drawn uniformly among the real clients
    for m = 2..K:
        b_i = min_{l < m} L_i(center_l)                         # best loss so far
        center_m = v_j, j = argmax_{i not yet chosen} b_i      # kmeans_init="distinct"
        center_m = v_j, j = argmax_{i} b_i                     # kmeans_init="fedjax"
    w^k = center_k, fresh server optimizer states

This needs no extra step from the user (the facade just calls `init` then rounds) and
uses exactly the candidates FedJAX's initializer uses (clients trained from shared
initial params), drawn from the first round's cohort instead of a separate set of
clients. With the default `kmeans_init="distinct"`, unlike FedJAX, a client already
chosen is not chosen again (FedJAX leaves this as an open TODO; a repeated center is a
cluster that never wins a client) unless the cohort has fewer real clients than K.
`kmeans_init="fedjax"` is FedJAX 0.0.17's rule: the argmax runs over every client, so a
client whose own trained model still serves it worst (e.g. noisy labels) is chosen
again, and ties go to the first client in cohort order (FedJAX's dict order). Given the
same first center, it reproduces FedJAX's centers
(`tests/fixtures/fedjax_reference/hypcluster.json`); the first center itself is drawn
from the round key, not from FedJAX's `jax.random.choice(rng, len(clients))` over
sorted client ids. Losses are `model.loss` with `train=False`.
Both rounds are built from the round skeleton's pieces (`skeleton.round_clients`,
`for_each_client`): the clients see the usual `ClientContext` (keys, masks, slots), and
HypCluster adds only its maximization step, its per-cluster aggregation (each cluster
applies the aggregator to its own clients' deltas, stacked) and the k-means++ choice.
The round runs under `lax.cond` on the state's `initialized` flag, so it is
still one jitted call with one state shape. With K = 1 there is nothing to choose: the
single model starts at `params` and every round is FedAvg.

Starting from given cluster params (FedJAX's `hyp_cluster(...).init(cluster_params)`,
e.g. centers from FedJAX's `kmeans_init` on a separate set of clients, or from a previous
run): `init(cluster_params=[w^1, ..., w^K])`. The state is marked initialised, so no
k-means++ round runs and the first round is a HypCluster round. With the facade:
`Server(algorithm=alg, model=model, state=alg.init(cluster_params=centers),
key=jax.random.key(seed))`.

`state.params` (what the default evaluation and the facade read) is cluster 0's model;
the algorithm's own `evaluate` picks a cluster per client instead.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_core import client_state, keys, parallel, tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.aggregate.mean import mean
from fedjax_core.algorithms.base import (
    AlgorithmEntry,
    EvalClients,
    FederatedAlgorithm,
    OptimizerOrRate,
    sgd_if_rate,
)
from fedjax_core.client import ClientContext, ClientReport, first_epoch_mask, full_batch
from fedjax_core.evaluate import global_metrics, metric_totals, ratios
from fedjax_core.models.base import Model
from fedjax_core.skeleton import RoundState, client_outputs, for_each_client, round_clients
from fedjax_core.typing import Array, Float, Int, Params, PRNGKey


class HypClusterServer(NamedTuple):
    """HypCluster's server part of the `RoundState` (whose `params` is cluster 0's model)."""

    cluster_params: Params      # the K models w^1..w^K, every leaf [K, ...]
    opt_state: optax.OptState   # the K server optimizer states, stacked: leaves [K, ...]
    initialized: Array          # Bool[Array, ""]: False until the k-means++ round has run


def kmeans_first_center(round_key: PRNGKey, num_examples: Int[Array, " clients"]) -> Int[Array, ""]:
    """The cohort slot of the first k-means++ center: uniform among clients with examples.

    Slot s draws `u_s ~ U(0, 1)` from `client_key(fold_in(round_key, keys.KMEANS), s)` and
    the real client with the largest `u_s` wins, so trailing padding clients change nothing.
    """
    real = jnp.asarray(num_examples) > 0
    key = keys.stream(round_key, keys.KMEANS)
    u = jax.vmap(lambda s: jax.random.uniform(keys.client_key(key, s)))(
        jnp.arange(real.shape[0], dtype=jnp.int32))
    return jnp.argmax(jnp.where(real, u, -1.0))


def first_epoch_loss(model: Model, params: Params, batches, mask, num_examples) -> Float[Array, ""]:
    """Mean training loss of one client's examples, each counted once (`train=False`).

    A packed client's stream is its epochs one after another, so the first `n` slots
    of its steps hold each of its `n` examples once; later epochs are not counted
    (`client.first_epoch_mask`). Only the steps that hold them are computed
    (`client.full_batch`). When `max_steps` cuts even the first epoch, the loss is over
    the examples the cohort holds (FedJAX evaluates all of them). A client without
    examples gets 0. Inside a round, `ClientContext.full_batch` computes the same.

    Args:
      model: the model.
      params: one model's parameters.
      batches: feature -> `[steps, batch, ...]`, one packed client.
      mask: `Bool[Array, "steps batch"]`.
      num_examples: the client's number of examples n.

    Returns:
      A scalar.
    """
    batches, mask = jax.tree.map(jnp.asarray, batches), jnp.asarray(mask)
    loss_sum, _, count = full_batch(model, params, batches, first_epoch_mask(mask, num_examples),
                                    with_grad=False, train=False)
    return loss_sum / jnp.maximum(count, 1.0)


def _client_loss(ctx: ClientContext, params: Params) -> Float[Array, ""]:
    """`first_epoch_loss` of the client of `ctx` at `params`."""
    loss_sum, _, count = ctx.full_batch(params, with_grad=False, train=False)
    return loss_sum / jnp.maximum(count, 1.0)


def _take(stacked: Params, index) -> Params:
    return jax.tree.map(lambda x: x[index], stacked)


def _select(cond, new, old):
    """`new` where `cond` (a scalar, or `[K]` against leaves `[K, ...]`), else `old`."""
    def pick(a, b):
        c = jnp.reshape(cond, jnp.shape(cond) + (1,) * (jnp.ndim(a) - jnp.ndim(cond)))
        return jnp.where(c, a, b)
    return jax.tree.map(pick, new, old)


def _cluster_counts(assign, real, num_clusters) -> dict:
    return {f"hypcluster/cluster_{k}_clients": jnp.sum((assign == k) & real).astype(jnp.float32)
            for k in range(num_clusters)}


def _train_metrics(total: dict, delta) -> dict:
    """`train/loss`, `train/num_examples`, `train/delta_norm` from the clients' summed
    `{"loss", "seen", "n"}`, as the round skeleton reports them."""
    return {"train/loss": total["loss"] / jnp.maximum(total["seen"], 1.0),
            "train/num_examples": total["n"], "train/delta_norm": tree.l2_norm(delta)}


def _summed(ctx: ClientContext, report: ClientReport) -> dict:
    return {"loss": report.stats.loss_sum, "seen": report.stats.examples_seen,
            "n": ctx.num_examples}


KMEANS_INIT_RULES = ("distinct", "fedjax")
"""`kmeans_init` choices: skip chosen clients (default) or FedJAX 0.0.17's rule."""


def hypcluster(client_optimizer: OptimizerOrRate = optax.sgd(0.1),
               server_optimizer: OptimizerOrRate = optax.sgd(1.0), *,
               aggregator: Aggregator | None = None,
               num_clusters: int = 2,
               kmeans_init: str = "distinct") -> FederatedAlgorithm:
    """HypCluster: each client trains the cluster model with the lowest loss on its data.

    Update rule (round t, cohort S, see the module docstring for the initial round):
      `c_i = argmin_k mean-loss(w_t^k; D_i)`, `Delta_i = w_t^{c_i} - ClientOpt^K(w_t^{c_i}; D_i)`,
      `Delta^k = aggregator({Delta_i : c_i = k}, {n_i})`,
      `w_{t+1}^k = w_t^k + ServerOpt_k(Delta^k)` for clusters with clients, others unchanged.

    Args:
      client_optimizer: optax optimizer each client runs locally, fresh state each round;
        a float is `optax.sgd(that float)`.
      server_optimizer: optax optimizer applied per cluster (each its own state); a float
        is `optax.sgd(that float)`.
      aggregator: how a cluster combines its clients' deltas (each cluster keeps its own
        aggregator state; cluster k's key is `fold_in(aggregator_key, k)` when K > 1,
        the round's `keys.aggregator_key` itself when K = 1); defaults to the
        example-weighted `mean()`.
      num_clusters: K >= 1. K = 1 is FedAvg.
      kmeans_init: how the k-means++ round picks centers 2..K: `"distinct"` (the client
        with the worst best-loss among those not yet chosen) or `"fedjax"` (FedJAX
        0.0.17's `kmeans_init`: among all clients, so a center may repeat).

    Returns:
      A `FederatedAlgorithm` with `evaluate` (see `hypcluster_evaluate`). Its state is a
      `RoundState`: `params` cluster 0's model, `server` a `HypClusterServer` (the K
      models, their K server optimizer states, the `initialized` flag), `aggregator` a
      tuple of K aggregator states, no per-client store. Its
      `init(params=None, *, cluster_params=None)` takes either the initial model
      (k-means++ in the first round) or `cluster_params`, a sequence of K models with
      the same structure, to start from them (no k-means++ round). Round metrics:
      `train/loss`, `train/num_examples`, `train/delta_norm` (L2 norm of the K clusters'
      aggregated deltas together; in the k-means round, of the change of the K models),
      `hypcluster/cluster_<k>_clients` (real clients assigned to cluster k),
      `hypcluster/loss` (example-weighted mean over clients of their chosen cluster's
      loss at the round's start), and the aggregator's metrics (mean over the clusters
      that had clients; 0 in the k-means round). Per-client outputs
      (`jit_round(..., per_client=True)`), besides the skeleton's: `cluster`, each
      client's assignment c_i, and `cluster_loss`, its first-epoch loss under that
      cluster at the round's start (in the k-means round: its nearest center and the
      loss there).

    Example:
      >>> alg = hypcluster(optax.sgd(0.1), optax.sgd(1.0), num_clusters=3)
      >>> state = alg.init(model.init(jax.random.key(0)))
      >>> state, metrics = jit_round(alg, model)(state, cohort, round_key)
      >>> state = alg.init(cluster_params=[w1, w2, w3])   # or start from given clusters
      >>> alg.evaluate(model, state, test_data, 256, EvalClients(rows=None, train=train_data))

    References:
      Mansour, Mohri, Ro, Suresh 2020, "Three Approaches for Personalization with
      Applications to Federated Learning" (arXiv:2002.10619), HypCluster; FedJAX
      `fedjax/algorithms/hyp_cluster.py` (maximization/expectation steps, `kmeans_init`).
    """
    client_optimizer, server_optimizer = sgd_if_rate(client_optimizer), sgd_if_rate(server_optimizer)
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be at least 1, got {num_clusters}")
    if kmeans_init not in KMEANS_INIT_RULES:
        raise ValueError(f"hypcluster: kmeans_init must be one of {', '.join(KMEANS_INIT_RULES)}, "
                         f"got {kmeans_init!r}")
    aggregator = aggregator or mean()
    K = num_clusters
    repeat_centers = kmeans_init == "fedjax"

    def new_state(params, stacked, initialized):
        # Fresh server optimizer and aggregator states; an index only for aggregator stores.
        agg_states = tuple(aggregator.init(params) for _ in range(K))
        index = (client_state.empty_index() if client_state.has_stores(agg_states)
                 else optax.EmptyState())
        server = HypClusterServer(stacked, jax.vmap(server_optimizer.init)(stacked),
                                  jnp.asarray(initialized))
        return RoundState(params, server, agg_states, index, optax.EmptyState())

    def init(params=None, *, cluster_params=None):
        if cluster_params is not None:
            return _init_from_clusters(params, cluster_params)
        if params is None:
            raise ValueError("hypcluster init: give the initial params or cluster_params")
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (K,) + jnp.shape(x)), params)
        return new_state(params, stacked, K == 1)

    def _init_from_clusters(params, cluster_params):
        # Given clusters: already initialised, so the first round is a HypCluster round
        # (FedJAX's `init(cluster_params)`); fresh server optimizer and aggregator states.
        clusters = list(cluster_params)
        if len(clusters) != K:
            raise ValueError(f"hypcluster init: cluster_params has {len(clusters)} models but "
                             f"num_clusters is {K}; give one per cluster")
        like, what = (clusters[0], "cluster_params[0]") if params is None else (params, "params")
        for k, c in enumerate(clusters):
            if jax.tree.structure(c) != jax.tree.structure(like):
                raise ValueError(f"hypcluster init: cluster_params[{k}] does not have the "
                                 f"structure of {what}; give K models like it")
        stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *clusters)
        return new_state(_take(stacked, 0), stacked, True)

    def client(ctx: ClientContext) -> ClientReport:
        """The maximization step and local training: start from the cluster whose model
        has the lowest first-epoch loss on the client's data."""
        clusters = ctx.server.cluster_params
        losses = jax.vmap(lambda w: _client_loss(ctx, w))(clusters)
        k = jnp.argmin(losses)
        start = _take(clusters, k)
        w, stats = ctx.train(start, client_optimizer)
        return ClientReport(tree.sub(start, w), stats,
                            per_client={"cluster": k, "cluster_loss": losses[k]})

    def apply(state, cohort, key, *, model, plan=parallel.Plan(), per_client=False):
        clients = round_clients(state, cohort, key, model)
        agg_key = keys.aggregator_key(key)

        def cluster_key(k):
            return agg_key if K == 1 else jax.random.fold_in(agg_key, k)

        def outputs(ctx, report):
            n = ctx.num_examples
            return client_outputs(report, n, n) if per_client else {}

        def hyp_round(state):
            def one(ctx):
                report = client(ctx)
                return _summed(ctx, report), {"delta": report.delta, "weight": ctx.num_examples,
                                              "per_client": outputs(ctx, report),
                                              **(report.per_client or {})}

            total, out = for_each_client(one, clients, plan)
            assign, weight = out["cluster"], out["weight"]
            deltas, agg_states, agg_metrics, has = [], [], [], []
            for k in range(K):  # the expectation step: each cluster aggregates its own clients
                weights = jnp.where(assign == k, weight, 0.0)
                delta, agg_state, metrics = aggregator.apply(
                    out["delta"], weights, state.aggregator[k], cluster_key(k), clients.slots)
                used = jnp.sum(weights) > 0
                deltas.append(delta)
                agg_states.append(_select(used, agg_state, state.aggregator[k]))
                agg_metrics.append(metrics)
                has.append(used)
            has = jnp.stack(has)
            deltas = jax.tree.map(lambda *d: jnp.stack(d), *deltas)
            server = state.server
            server_updates, opt_state = jax.vmap(server_optimizer.update)(
                deltas, server.opt_state, server.cluster_params)
            stepped = optax.apply_updates(server.cluster_params, server_updates)
            cluster_params = _select(has, stepped, server.cluster_params)
            opt_state = _select(has, opt_state, server.opt_state)
            used = has.astype(jnp.float32)
            metrics = {
                **_train_metrics(total, deltas),
                **_cluster_counts(assign, weight > 0, K),
                "hypcluster/loss": _weighted(out["cluster_loss"], weight),
                **{name: jnp.sum(jnp.stack([jnp.asarray(m[name], jnp.float32) for m in agg_metrics])
                                 * used) / jnp.maximum(jnp.sum(used), 1.0)
                   for name in agg_metrics[0]},
            }
            new = RoundState(_take(cluster_params, 0),
                             HypClusterServer(cluster_params, opt_state, server.initialized),
                             tuple(agg_states), clients.index, state.store)
            return new, metrics, out["per_client"]

        def kmeans_round(state):
            def train(ctx):  # every client trains from the base model: the candidates
                trained, stats = ctx.train(ctx.params, client_optimizer)
                report = ClientReport(tree.sub(ctx.params, trained), stats)
                return _summed(ctx, report), {"candidate": trained, "weight": ctx.num_examples,
                                              "per_client": outputs(ctx, report)}

            total, out = for_each_client(train, clients, plan)
            candidates, weight = out["candidate"], out["weight"]
            real = weight > 0

            def losses_on(params):  # every client's first-epoch loss at one candidate
                return for_each_client(lambda ctx: ((), _client_loss(ctx, params)), clients,
                                       plan)[1]

            first = kmeans_first_center(key, cohort.num_examples)

            def add_center(m, carry):
                # Center m: the first draw, then the worst-served client not yet chosen
                # ("distinct"), or the worst-served client of all ("fedjax": FedJAX's rule,
                # a chosen client may be chosen again; ties go to the first one).
                best, taken, chosen, losses = carry
                if repeat_centers:
                    score = jnp.where(real, best, -jnp.inf)
                else:
                    score = jnp.where(real & ~taken, best,
                                      jnp.where(real, jnp.finfo(jnp.float32).min, -jnp.inf))
                nxt = jnp.where(m == 0, first, jnp.argmax(score))
                loss = losses_on(_take(candidates, nxt))
                return (jnp.minimum(best, loss), taken.at[nxt].set(True), chosen.at[m].set(nxt),
                        losses.at[m].set(loss))

            num = weight.shape[0]
            best, _, chosen, losses = jax.lax.fori_loop(0, K, add_center, (
                jnp.full((num,), jnp.inf, jnp.float32), jnp.zeros((num,), bool),
                jnp.zeros((K,), jnp.int32), jnp.zeros((K, num), jnp.float32)))
            centers = _take(candidates, chosen)
            assign = jnp.argmin(losses, axis=0)
            deltas = jax.tree.map(lambda c: jax.ShapeDtypeStruct(c.shape, c.dtype), candidates)
            agg_shapes = jax.eval_shape(aggregator.apply, deltas, weight, state.aggregator[0],
                                        agg_key, clients.slots)[2]
            metrics = {
                **_train_metrics(total, tree.sub(state.server.cluster_params, centers)),
                **_cluster_counts(assign, real, K),
                "hypcluster/loss": _weighted(best, weight),
                **{name: jnp.zeros(s.shape, jnp.float32) for name, s in agg_shapes.items()},
            }
            per = out["per_client"]
            if per_client:
                per = {**per, "cluster": assign, "cluster_loss": jnp.min(losses, axis=0)}
            # No client state was touched: the index stays as it was.
            new = RoundState(_take(centers, 0),
                             HypClusterServer(centers, jax.vmap(server_optimizer.init)(centers),
                                              jnp.any(real)),
                             state.aggregator, state.index, state.store)
            return new, metrics, per

        if K == 1:
            new, metrics, per = hyp_round(state)
        else:
            new, metrics, per = jax.lax.cond(state.server.initialized, hyp_round, kmeans_round,
                                             state)
        return (new, metrics, per) if per_client else (new, metrics)

    def evaluate(model, state, data, batch_size=256, clients=None):
        return hypcluster_evaluate(model, state, data, batch_size, clients)

    return FederatedAlgorithm(init, apply, evaluate)


def _weighted(values, weights):
    w = jnp.asarray(weights, jnp.float32)
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


@functools.lru_cache(maxsize=64)
def _loss_model(model: Model) -> Model:
    """`model` whose only metric is its training loss (cached: one compile per model)."""
    def metrics(batch, preds):
        per_example = model.loss(batch, preds)
        return {"loss": (per_example, jnp.ones(per_example.shape, jnp.float32))}
    return Model(model.init, model.apply, model.loss, metrics)


def cluster_assignment(model: Model, state: RoundState, data,
                       batch_size: int = 256) -> np.ndarray:
    """Each client's cluster: `argmin_k` of its mean loss (`model.loss`) on `data`.

    Args:
      model: the model.
      state: a HypCluster `RoundState`.
      data: a `FederatedData`; clients without examples get cluster 0.
      batch_size: examples per forward pass.

    Returns:
      `Int[ndarray, " clients"]` in `data.client_ids` order.
    """
    num_clients = len(data.client_ids)
    if num_clients == 0 or int(np.sum(data.client_sizes)) == 0:
        return np.zeros(num_clients, np.int64)
    K = jax.tree.leaves(state.server.cluster_params)[0].shape[0]
    losses = [ratios(metric_totals(_loss_model(model), _take(state.server.cluster_params, k), data,
                                   batch_size))["loss"] for k in range(K)]
    return np.argmin(np.nan_to_num(np.stack(losses), nan=np.inf), axis=0)


def hypcluster_evaluate(model: Model, state: RoundState, data, batch_size: int = 256,
                        clients: EvalClients | None = None) -> dict[str, float]:
    """Global metrics when each client uses its own cluster.

    Client c uses cluster `argmin_k mean-loss(w^k; T_c)`, where `T_c` is its training
    data `clients.train` when given (FedJAX's `HypClusterEvaluator`: the maximization
    step on training data); clients with no training examples use cluster 0 (the
    global `state.params`). Without `clients.train`, `T_c` is the evaluated data itself,
    which is optimistic: the cluster is chosen with the labels it is scored on.
    Every metric is a ratio of sums over all examples, as `fedjax_core.evaluate.evaluate`:
    `sum_c num_c(w^{k_c}) / sum_c den_c(w^{k_c})`. Each cluster is evaluated on every
    client with `metric_totals` (one compiled kernel), then each client's row is picked.

    Args:
      model: the model.
      state: a HypCluster `RoundState`.
      data: a `FederatedData`, the clients to evaluate.
      batch_size: examples per forward pass.
      clients: an `EvalClients` whose `train` is aligned with `data`, or None.

    Returns:
      `{metric name: float}` plus `num_examples`.
    """
    train = getattr(clients, "train", None) if clients is not None else None
    if train is not None and len(train.client_ids) != len(data.client_ids):
        raise ValueError(f"clients.train has {len(train.client_ids)} clients but the evaluated "
                         f"data has {len(data.client_ids)}; they must be aligned")
    assign = cluster_assignment(model, state, train if train is not None else data, batch_size)
    K = jax.tree.leaves(state.server.cluster_params)[0].shape[0]
    totals = [metric_totals(model, _take(state.server.cluster_params, k), data, batch_size)
              for k in range(K)]
    rows = np.arange(len(data.client_ids))
    picked = {name: (np.stack([t[name][0] for t in totals])[assign, rows],
                     np.stack([t[name][1] for t in totals])[assign, rows])
              for name in totals[0]}
    return global_metrics(picked, data)


ENTRY = AlgorithmEntry(
    "hypcluster",
    "HypCluster: K cluster models, each client trains the one with its lowest loss",
    hypcluster,
    "Mansour et al. 2020, Three Approaches for Personalization with Applications to FL")
