"""The round skeleton: every algorithm is a client function and a server update on it.

One round, for a cohort S with round key k (what the skeleton owns, once, for all):

    rows, new   = the cohort's rows of the per-client store (framework-owned index)
    [first pass: for each client i: a_i = first_pass(ctx_i);  A = sum_{i real} a_i]
    for each client i in S (chunked, vmapped, over devices):
        ctx_i     = ClientContext(w_t, server state, row_i or its initial value,
                                  key fold_in(k, slot_i), batches, masks, [A])
        report_i  = client(ctx_i)              # ALGORITHM: local training, what to send
        row_i    <- report_i.state
        sums     += report_i.sums              # streamed, real clients only
        the aggregator accumulates (delta_i, weight_i), or stacks them if it must
    Delta       = the aggregator's result      # key fold_in(k, AGGREGATOR)
    w_{t+1}, server state = server(w_t, server state, RoundResult(Delta, sums, ...))   # ALGORITHM

Whether deltas stream into a running sum (bounded memory at any cohort size) or are
stacked `[clients, ...]` is decided by the aggregator (`Aggregator.stream`), never by
the algorithm. Writing an algorithm takes `algorithm`, `ClientContext`, `ClientReport`
and `RoundResult` (docs/writing_algorithms.md).

Example (FedAvg with server SGD):
  >>> def client(c):
  ...     w, stats = c.train(c.params, optax.sgd(0.1))
  ...     return ClientReport(tree.sub(c.params, w), stats)
  >>> def server(w, s, r):
  ...     return tree.sub(w, r.delta), s, {}
  >>> alg = algorithm(client, server)
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_core import client_state, keys, parallel, tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.aggregate.mean import mean
from fedjax_core.algorithms.base import FederatedAlgorithm
from fedjax_core.client import ClientContext, ClientReport
from fedjax_core.client_state import ClientIndex, ClientStore
from fedjax_core.data.pack import Cohort
from fedjax_core.parallel import Plan
from fedjax_core.typing import Array, Params, PyTree

ClientFn = Callable[[ClientContext], ClientReport]
ServerFn = Callable[[Params, Any, "RoundResult"], tuple[Params, Any, dict]]


class RoundState(NamedTuple):
    """The state of any algorithm built with `algorithm`.

    Attributes:
      params: the global model w_t (what evaluation uses).
      server: the algorithm's own server state (e.g. optimizer state, SCAFFOLD's c).
      aggregator: the aggregator's state.
      index: the `ClientIndex` of the per-client stores (`optax.EmptyState()` when
        neither the algorithm nor the aggregator keeps per-client state).
      store: the algorithm's per-client `ClientStore` (`optax.EmptyState()` without one).
    """

    params: Params
    server: Any
    aggregator: Any
    index: Any
    store: Any


class RoundResult(NamedTuple):
    """What the server update sees of a round.

    Attributes:
      delta: the aggregated delta, shaped like the params.
      sums: the clients' `ClientReport.sums`, summed over the real clients.
      num_clients: `Float[Array, ""]`, the number of real clients (n_i > 0).
      num_examples: `Float[Array, ""]`, `sum_i n_i`.
      first_pass: the sums of the clients' first pass (empty dict without one).
      key: the round key.
    """

    delta: Params
    sums: dict
    num_clients: Array
    num_examples: Array
    first_pass: dict
    key: Array


def descend(params: Params, server: Any, result: RoundResult) -> tuple[Params, Any, dict]:
    """The plain server update `w_{t+1} = w_t - Delta` (FedAvg with server SGD at 1.0)."""
    return tree.sub(params, result.delta), server, {}


def algorithm(client: ClientFn, server: ServerFn = descend, *,
              init: Callable[[Params], Any] | None = None,
              client_init: Callable[[Params], PyTree] | None = None,
              first_pass: Callable[[ClientContext], dict] | None = None,
              aggregator: Aggregator | None = None,
              evaluate: Callable | None = None) -> FederatedAlgorithm:
    """A `FederatedAlgorithm` from a client function and a server update.

    Update rule (round t, cohort S of real clients):
      `report_i = client(ctx_i)` for i in S, from the global model w_t;
      `Delta = aggregator({report_i.delta}, {report_i.weight})`;
      `w_{t+1}, s_{t+1} = server(w_t, s_t, RoundResult(Delta, sum_i report_i.sums, ...))`.

    Args:
      client: `client(ctx: ClientContext) -> ClientReport` for ONE client (jittable).
      server: `server(params, server_state, result: RoundResult) -> (params,
        server_state, metrics)`; default: `w - Delta`.
      init: `init(params) -> server_state`; default: no server state (`EmptyState`).
      client_init: `client_init(params) -> one client's initial state` (its row of the
        per-client store before it first trains, e.g. zeros for SCAFFOLD's c_i, or
        `params` for Ditto's personal model); None: no per-client state.
      first_pass: `first_pass(ctx) -> dict` of arrays, run over every client before
        training (an extra exchange, e.g. Mime's full-batch gradient); their sum over the
        real clients reaches every client as `ctx.first_pass` and the server as
        `result.first_pass`.
      aggregator: combines the deltas; default: the weighted `mean()`.
      evaluate: optional `evaluate(model, state, data, batch_size, clients)` (see
        `FederatedAlgorithm`).

    Returns:
      A `FederatedAlgorithm` whose state is a `RoundState`. Its `apply(state, cohort,
      key, *, model, plan, per_client=False)` returns `(state, metrics)`, with metrics
      `train/loss`, `train/num_examples`, `train/delta_norm`, the server's and the
      aggregator's; with `per_client=True` also a dict of `[clients]` arrays
      (`num_examples`, `weight`, `loss`, `delta_norm` and the reports' `per_client`).

    Example:
      >>> alg = algorithm(client, server, init=lambda p: optax.sgd(1.0).init(p))
      >>> state = alg.init(params)
      >>> state, metrics = jit_round(alg, model)(state, cohort, round_key)

    References:
      McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
      Decentralized Data" (Algorithm 1); the client_init / client_step / client_final
      shape of FedJAX's `for_each_client` (Ro et al. 2021, "FedJAX: Federated learning
      simulation with JAX").
    """
    aggregator = aggregator or mean()

    def init_state(params):
        agg_state = aggregator.init(params)
        store = (optax.EmptyState() if client_init is None
                 else client_state.empty_store(client_init(params)))
        keeps_state = client_init is not None or client_state.has_stores(agg_state)
        index = client_state.empty_index() if keeps_state else optax.EmptyState()
        server_state = optax.EmptyState() if init is None else init(params)
        return RoundState(params, server_state, agg_state, index, store)

    def apply(state, cohort: Cohort, key, *, model, plan: Plan = Plan(), per_client=False):
        clients = round_clients(state, cohort, key, model, client_init)
        index, slots, inputs, context = clients

        pre = {}
        if first_pass is not None:
            passing = first_pass
            pre = for_each_client(lambda c: (_real_only(c, passing(c)), ()), clients, plan)[0]

        store = state.store if isinstance(state.store, ClientStore) else None

        def one(c, row):
            ctx = context(c, row, pre)
            report = client(ctx)
            n = ctx.num_examples
            real = n > 0
            weight = n if report.weight is None else jnp.asarray(report.weight, jnp.float32)
            summed = {"loss": report.stats.loss_sum, "seen": report.stats.examples_seen,
                      "n": n, "real": real.astype(jnp.float32),
                      "sums": _real_only(ctx, report.sums or {})}
            stacked = {}
            if aggregator.stream is not None:
                summed["agg"] = aggregator.stream.contribution(report.delta, weight)
            else:
                stacked = {"delta": report.delta, "weight": weight}
            if per_client:
                stacked["per_client"] = client_outputs(report, n, weight)
            new_row = None
            if store is not None:
                new_row = ctx.state if report.state is None else report.state
                new_row = jax.tree.map(lambda v, r: jnp.where(real | ctx.is_new, v, r),
                                       new_row, ctx.state)
            return summed, stacked, new_row

        run = parallel.run_clients(
            one, inputs, plan, table=None if store is None else store.rows,
            rows=None if slots is None else slots.row, gather_batches=False)
        total = run.total
        agg_key = keys.aggregator_key(key)
        if aggregator.stream is not None:
            delta, agg_state, agg_metrics = aggregator.stream.finalize(
                total["agg"], state.params, state.aggregator, agg_key)
        else:
            delta, agg_state, agg_metrics = aggregator.apply(
                run.stacked["delta"], run.stacked["weight"], state.aggregator, agg_key, slots)
        result = RoundResult(delta, total["sums"], total["real"], total["n"], pre, key)
        params, server_state, server_metrics = server(state.params, state.server, result)
        metrics = {"train/loss": total["loss"] / jnp.maximum(total["seen"], 1.0),
                   "train/num_examples": total["n"], "train/delta_norm": tree.l2_norm(delta),
                   **server_metrics, **agg_metrics}
        new_store = state.store if store is None else ClientStore(run.table)
        new_state = RoundState(params, server_state, agg_state, index, new_store)
        if per_client:
            return new_state, metrics, run.stacked["per_client"]
        return new_state, metrics

    return FederatedAlgorithm(init_state, apply, evaluate)


def _real_only(ctx: ClientContext, sums: dict) -> dict:
    """`sums` zeroed for a padding client (no examples), so that it adds nothing."""
    real = ctx.num_examples > 0
    return jax.tree.map(lambda v: jnp.where(real, v, jnp.zeros_like(v)), sums)


def client_outputs(report: ClientReport, num_examples, weight) -> dict:
    """One client's per-client outputs of a round (`per_client=True`): `num_examples`,
    `weight`, `loss` (its mean training loss), `delta_norm` and its report's `per_client`."""
    stats = report.stats
    return {"num_examples": num_examples, "weight": weight,
            "loss": stats.loss_sum / jnp.maximum(stats.examples_seen, 1.0),
            "delta_norm": tree.l2_norm(report.delta), **(report.per_client or {})}


class RoundClients(NamedTuple):
    """A round's cohort as the skeleton hands it to the clients (`round_clients`).

    Attributes:
      index: the state's `ClientIndex` with the cohort's new clients recorded: the next
        state's index (`state.index` as it is when the state keeps none).
      slots: the cohort's `ClientSlots` (rows in the stores; for the aggregator), or None.
      inputs: the per-client inputs, `[clients, ...]` leaves (for `parallel.run_clients`).
      context: `context(inputs_i, row_i, first_pass) -> ClientContext` of client i.
    """

    index: Any
    slots: client_state.ClientSlots | None
    inputs: tuple
    context: Callable[..., ClientContext]


def round_clients(state: RoundState, cohort: Cohort, key, model,
                  client_init: Callable[[Params], PyTree] | None = None) -> RoundClients:
    """The cohort's clients as every round sees them: rows, slots, keys and contexts.

    Client i of the cohort gets `ClientContext(params=state.params, server=state.server,
    state=its row or client_init(state.params) when new, key=keys.client_key(key, i),
    ...)`. `algorithm` builds its rounds on it; an algorithm whose round is not
    `algorithm`'s (HypCluster's per-cluster and k-means++ rounds) runs its passes over
    the clients with `for_each_client(fn, round_clients(...), plan)`.

    Example:
      >>> clients = round_clients(state, cohort, key, model)
      >>> losses = for_each_client(lambda c: ((), c.full_batch(w, with_grad=False)[0]),
      ...                          clients, plan)[1]
    """
    index, slots = state.index, None
    if isinstance(index, ClientIndex):
        index, slots = client_state.assign(index, cohort.client_index)
    num = cohort.mask.shape[0]
    is_new = (jnp.ones((num,), bool) if slots is None else slots.is_new)
    staleness = getattr(cohort, "staleness", None)  # a simulated asynchronous run's
    inputs = (cohort.batches, cohort.mask, jnp.asarray(cohort.num_examples, jnp.float32),
              jnp.arange(num, dtype=jnp.int32), is_new,
              None if staleness is None else jnp.asarray(staleness, jnp.int32))
    fresh = None if client_init is None else client_init(state.params)

    def context(c, row, pre):
        batches, mask, n, slot, new, tau = c
        if fresh is not None and row is not None:
            row = jax.tree.map(lambda r, f: jnp.where(new, f, r), row, fresh)
        return ClientContext(params=state.params, server=state.server, state=row,
                             is_new=new, key=keys.client_key(key, slot), num_examples=n,
                             batches=batches, mask=mask, model=model, slot=slot,
                             round_key=key, first_pass=pre, staleness=tau)

    return RoundClients(index, slots, inputs, context)


def for_each_client(fn: Callable[[ClientContext], tuple[PyTree, PyTree]], clients: RoundClients,
                    plan: Plan) -> tuple[PyTree, PyTree]:
    """`(sum_i summed_i, [stacked_i])` of `fn(ctx_i) -> (summed, stacked)` over a cohort.

    For a pass over the clients besides training (the skeleton's first pass;
    HypCluster's rounds): `clients` from `round_clients`; `ctx_i.state` is None (no
    store rows are read or written). The sum runs over every client: zero a padding
    client's part (`ctx.num_examples == 0`) where it must not count."""
    run = parallel.run_clients(lambda c, _: (*fn(clients.context(c, None, {})), None),
                               clients.inputs, plan, gather_batches=False)
    return run.total, run.stacked
