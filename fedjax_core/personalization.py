"""Personalization and fairness metrics: per-client evaluation, with local fine-tuning.

A global model can be good on average and bad for many clients. Two views measure it:

- the distribution over clients of a per-client metric (mean over clients, 10th
  percentile, worst), where each client's value is its own ratio of sums
  (`fedjax_core.evaluate.evaluate_per_client`);
- the same after each client fine-tunes the global model for `k` local steps on its own
  training examples ("fine-tuning" personalization, Wang et al. 2019; Yu et al. 2020):

      for each client c:   w_c = ClientOpt^k(w; train_c)      # k steps, batch B
                           m_c = metric(w_c; test_c)
      report mean_c m_c, percentile_10(m_c), min_c m_c

Clients are fine-tuned and evaluated in groups of fixed size under `map_clients`, so a
call compiles once per (group, bucketed step count) shape, not once per client.
"""

import functools
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_core import parallel
from fedjax_core.client import local_train
from fedjax_core.data.federated_data import FederatedData
from fedjax_core.data.pack import pack_clients
from fedjax_core.data.sampling import FINETUNE_STREAM, host_rng
from fedjax_core.evaluate import GROUP_BATCHES, metric_totals, ratios
from fedjax_core.models.base import Model
from fedjax_core.typing import Params, PyTree


def client_distribution(values, prefix: str = "") -> dict[str, float]:
    """Summary of a per-client metric over the clients where it is defined (not NaN).

    Args:
      values: `Float[ndarray, "clients"]`, one value per client, NaN for clients without
        examples.
      prefix: prepended to the keys, e.g. `"accuracy_"`.

    Returns:
      `{prefix+"clients_mean", prefix+"clients_p10", prefix+"clients_worst"}`: the
      unweighted mean over clients, the 10th percentile (linear interpolation) and the
      minimum; NaN when no client has a value.

    Example:
      >>> client_distribution(np.array([0.2, 0.9, np.nan, 0.5]), "accuracy_")
      {'accuracy_clients_mean': 0.533..., 'accuracy_clients_p10': 0.26, 'accuracy_clients_worst': 0.2}
    """
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {f"{prefix}clients_{k}": float("nan") for k in ("mean", "p10", "worst")}
    return {f"{prefix}clients_mean": float(np.mean(v)),
            f"{prefix}clients_p10": float(np.percentile(v, 10)),
            f"{prefix}clients_worst": float(np.min(v))}


@functools.lru_cache(maxsize=32)
def _group_fn(model: Model, optimizer: optax.GradientTransformation, plan: parallel.Plan):
    """Jitted: fine-tune each client of a group, then sum its test metrics."""
    train = local_train(model, optimizer)

    def one_client(params, c):
        tb, tm, eb, em, key = c
        w, _, _ = train(params, tb, tm, key)

        def body(acc, inp):
            batch, m = inp
            preds = model.apply(w, batch, train=False)
            valid = m.astype(jnp.float32)
            out = {}
            for name, (num, den) in model.metrics(batch, preds).items():
                out[name] = (acc[name][0] + jnp.sum(num.astype(jnp.float32) * valid),
                             acc[name][1] + jnp.sum(den.astype(jnp.float32) * valid))
            return out, None

        shapes = jax.eval_shape(lambda b: model.metrics(b, model.apply(w, b, train=False)),
                                jax.tree.map(lambda x: x[0], eb))
        zero = jnp.zeros((), jnp.float32)
        sums, _ = jax.lax.scan(body, {k: (zero, zero) for k in shapes}, (eb, em))
        return sums

    @jax.jit
    def run(params, tb, tm, eb, em, keys):
        return parallel.map_clients(lambda c: one_client(params, c), (tb, tm, eb, em, keys), plan)

    return run


def finetune_evaluate(model: Model, params: Params, optimizer: optax.GradientTransformation,
                      steps: int, train: FederatedData, test: FederatedData,
                      batch_size: int, eval_batch_size: int = 64, seed: int = 0,
                      round_num: int = 0, group_size: int = 16,
                      plan: parallel.Plan = parallel.Plan()) -> dict[str, np.ndarray]:
    """Each test client's metrics after `steps` local steps of fine-tuning from `params`.

    Client c of `test` fine-tunes on client c of `train` (the two must be aligned: same
    clients in the same order; see `data.AlignedFederatedData`), cycling through its
    shuffled examples for exactly `steps` batches of `batch_size` (fewer only for a client
    with no training examples, which is evaluated with `params` itself).

    Args:
      model: the model.
      params: the global parameters `w`.
      optimizer: the fine-tuning optimizer, fresh state per client, e.g. `optax.sgd(0.1)`.
      steps: k >= 0, local steps; 0 evaluates `params` per client.
      train: training examples of each test client, aligned with `test`.
      test: the clients to evaluate.
      batch_size: fine-tuning batch size B.
      eval_batch_size: examples per forward pass when evaluating.
      seed: with `round_num`, seeds the fine-tuning shuffles and dropout keys.
      round_num: the round being evaluated.
      group_size: clients fine-tuned per jitted call.
      plan: how a group is executed (chunk size).

    Returns:
      `{metric: Float[ndarray, "clients"]}`, each client's own ratio of sums (NaN for
      clients without test examples), plus `num_examples`.

    Example:
      >>> per_client = finetune_evaluate(model, server.params, optax.sgd(0.1), 5,
      ...                                AlignedFederatedData(train, test.client_ids), test, 10)
      >>> client_distribution(per_client["accuracy"], "accuracy_")

    References:
      Wang et al. 2019, "Federated Evaluation of On-device Personalization";
      Yu et al. 2020, "Salvaging Federated Learning by Local Adaptation".
    """
    if steps < 0:
        raise ValueError(f"fine-tuning steps must be at least 0, got {steps}")
    if list(train.client_ids) != list(test.client_ids):
        raise ValueError("train and test clients are not aligned; wrap the training data in "
                         "AlignedFederatedData(train, test.client_ids)")
    n = len(test.client_ids)
    run = _group_fn(model, optimizer, plan)
    train_sizes = np.asarray(train.client_sizes)
    nums: dict[str, list[np.ndarray]] = {}
    dens: dict[str, list[np.ndarray]] = {}
    base_key = jax.random.fold_in(
        jax.random.fold_in(jax.random.key(seed), FINETUNE_STREAM), round_num)
    for start in range(0, n, group_size):
        idx = list(range(start, min(start + group_size, n)))
        pad = group_size - len(idx)
        tr = [train.get_client(i) for i in idx]
        te = [test.get_client(i) for i in idx]
        smallest = min([int(s) for s in train_sizes[idx] if s > 0], default=1)
        k = max(steps, 1)
        epochs = max(1, math.ceil(k * batch_size / smallest))
        rngs = [host_rng(seed, round_num, FINETUNE_STREAM, i) for i in idx]
        empty_tr = {key: v[:0] for key, v in tr[0].items()}
        empty_te = {key: v[:0] for key, v in te[0].items()}
        tcoh = pack_clients(tr + [empty_tr] * pad, batch_size, epochs,
                            rngs=rngs + [None] * pad, steps=k, max_steps=k)
        mask = tcoh.mask if steps > 0 else np.zeros_like(tcoh.mask)
        ecoh = pack_clients(te + [empty_te] * pad, eval_batch_size, 1, rngs=None)
        keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(
            jnp.arange(start, start + group_size))
        sums = run(params, tcoh.batches, mask, ecoh.batches, ecoh.mask, keys)
        for name, (num, den) in sums.items():
            nums.setdefault(name, []).append(np.asarray(num)[:len(idx)])
            dens.setdefault(name, []).append(np.asarray(den)[:len(idx)])
    out = ratios({name: (np.concatenate(nums[name]), np.concatenate(dens[name]))
                  for name in nums})
    out["num_examples"] = np.asarray(test.client_sizes, np.float64)
    return out


# ----------------------------------------------------------------------------------------
# Evaluation with one model per client (Ditto, APFL), compiled once.

SelectFn = Callable[[PyTree, Params, jax.Array], Params]
"""`select(personal, global_params, row) -> params`: the model of store row `row` (a traced
int32 scalar; `row < 0` must give `global_params`). A module-level function, so that it is
hashable and the evaluation compiles once."""


def _personal_batches(data: FederatedData, rows: np.ndarray, batch_size: int
                      ) -> Iterator[tuple[dict, np.ndarray, int]]:
    """Yields `(features [batch, ...], client id [batch] (-1: padding), row)`: batches in
    which every example is evaluated with store row `row`'s model. The clients with row
    -1 (the global model) are packed together; each other client fills batches of its own."""
    sizes = np.asarray(data.client_sizes)
    shared = [c for c in range(len(sizes)) if rows[c] < 0 and sizes[c] > 0]
    personal = [c for c in range(len(sizes)) if rows[c] >= 0 and sizes[c] > 0]

    def emit(parts, segs, n, row):
        feats = {}
        for name, arrs in parts.items():
            x = np.concatenate(arrs)
            out = np.zeros((batch_size,) + x.shape[1:], x.dtype)
            out[:n] = x
            feats[name] = out
        s = np.full(batch_size, -1, np.int32)
        s[:n] = np.concatenate(segs)
        return feats, s, row

    buf: dict[str, list] = {}
    seg: list[np.ndarray] = []
    filled = 0
    for c in shared:
        arrays = data.get_client(c)
        start = 0
        while start < sizes[c]:
            take = min(int(sizes[c]) - start, batch_size - filled)
            for name, x in arrays.items():
                buf.setdefault(name, []).append(np.asarray(x[start:start + take]))
            seg.append(np.full(take, c, np.int32))
            filled += take
            start += take
            if filled == batch_size:
                yield emit(buf, seg, filled, -1)
                buf, seg, filled = {}, [], 0
    if filled:
        yield emit(buf, seg, filled, -1)
    for c in personal:
        arrays = data.get_client(c)
        for start in range(0, int(sizes[c]), batch_size):
            stop = min(int(sizes[c]), start + batch_size)
            yield emit({k: [np.asarray(x[start:stop])] for k, x in arrays.items()},
                       [np.full(stop - start, c, np.int32)], stop - start, int(rows[c]))


@functools.partial(jax.jit, static_argnames=("model", "select", "num_clients"))
def _accumulate_personal(model: Model, select, personal, global_params, totals, features, segments,
                rows, num_clients: int):
    def body(totals, inputs):
        batch, seg, row = inputs
        preds = model.apply(select(personal, global_params, row), batch, train=False)
        valid = (seg >= 0).astype(jnp.float32)
        ids = jnp.where(seg >= 0, seg, 0)
        new = {}
        for name, (num, den) in model.metrics(batch, preds).items():
            n = jax.ops.segment_sum(num.astype(jnp.float32) * valid, ids, num_segments=num_clients)
            d = jax.ops.segment_sum(den.astype(jnp.float32) * valid, ids, num_segments=num_clients)
            new[name] = (totals[name][0] + n, totals[name][1] + d)
        return new, None

    totals, _ = jax.lax.scan(body, totals, (features, segments, rows))
    return totals


def personal_metric_totals(model: Model, select: SelectFn, personal: PyTree,
                           global_params: Params, data: FederatedData, rows,
                           batch_size: int = 256) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-client metric sums `name -> (numerator[clients], denominator[clients])`, each
    client evaluated with its own model `select(personal, global_params, rows[c])`.

    Batches never mix models: the clients with `rows[c] = -1` share batches (the global
    model), each other client's examples fill batches of their own (its last one padded).
    Groups of `fedjax_core.evaluate.GROUP_BATCHES` batches go through one jitted scan that
    picks each batch's model from the stacked `personal` table on the device, so the
    evaluation compiles once per dataset and batch size, whatever the clients' rows (and
    the store's capacity, which changes only when it grows). Each personal client's last
    batch is padded, so a batch size near the typical client size wastes least.

    Args:
      model: the model.
      select: see `SelectFn`.
      personal: the algorithm's stacked per-client state (a `ClientStore`'s rows).
      global_params: the global model.
      data: the clients to evaluate.
      rows: `Int[ndarray, "clients"]`, each client's store row, -1 for the global model.
      batch_size: examples per forward pass.

    Returns:
      numpy float arrays of shape `[num_clients]`, as `fedjax_core.evaluate.metric_totals`.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    sizes = np.asarray(data.client_sizes, np.int64)
    rows = np.asarray(rows, np.int64).reshape(-1)
    if rows.shape != sizes.shape:
        raise ValueError(f"rows has {rows.size} entries but the data has {sizes.size} clients")
    num_clients = len(sizes)
    if int(np.sum(sizes)) == 0:
        raise ValueError("cannot evaluate on a dataset with no examples")
    # The most batches any `rows` can give (every client on its own): the group shape
    # depends on the data and the batch size only, not on which clients are personal.
    most = int(np.sum(-(-sizes // batch_size)))
    group = max(1, min(GROUP_BATCHES, most))
    totals = None
    pending: list[tuple[dict, np.ndarray, int]] = []

    def run(pending, totals):
        while len(pending) < group:  # pad the last group with empty batches
            feats, _, _ = pending[0]
            pending.append(({k: np.zeros_like(x) for k, x in feats.items()},
                            np.full(batch_size, -1, np.int32), -1))
        features = {k: np.stack([b[0][k] for b in pending]) for k in pending[0][0]}
        segments = np.stack([b[1] for b in pending])
        batch_rows = np.asarray([b[2] for b in pending], np.int32)
        if totals is None:
            shapes = jax.eval_shape(
                lambda f: model.metrics(f, model.apply(global_params, f, train=False)),
                pending[0][0])
            zeros = jnp.zeros((num_clients,), jnp.float32)
            totals = {name: (zeros, zeros) for name in shapes}
        return _accumulate_personal(model, select, personal, global_params, totals, features, segments,
                           batch_rows, num_clients)

    for batch in _personal_batches(data, rows, batch_size):
        pending.append(batch)
        if len(pending) == group:
            totals = run(pending, totals)
            pending = []
    if pending:
        totals = run(pending, totals)
    assert totals is not None  # the data has examples, so at least one group ran
    return {k: (np.asarray(n), np.asarray(d)) for k, (n, d) in totals.items()}


def evaluate_personal(model: Model, select: SelectFn, personal: PyTree, global_params: Params,
                      data: FederatedData, batch_size: int = 256,
                      rows=None) -> dict[str, float]:
    """Metrics of a personalized algorithm: each client with its own model.

    A client with `rows[c] >= 0` is evaluated with its personal model
    `select(personal, global_params, rows[c])`; a client with row -1 (it never trained),
    or every client when `rows` is None, with the global model.

    Args:
      model: the model.
      select: picks a client's model from the stacked per-client state (`SelectFn`).
      personal: the algorithm's per-client store rows (`state.store.rows` of an
        algorithm on the round skeleton), `[capacity, ...]` leaves.
      global_params: the global model.
      data: the clients to evaluate.
      batch_size: examples per forward pass.
      rows: `Int[ndarray, "clients"]` store rows in data order (-1: global), or None;
        `EvalClients.rows` as the facade gives it (`client_state.rows_of(state,
        positions)`).

    Example:
      >>> evaluate_personal(model, select_v, state.store.rows, state.params, test,
      ...                   rows=eval_clients.rows)

    Returns:
      `{metric: float}` over all examples of all clients (ratio of sums, as
      `fedjax_core.evaluate.evaluate`; with `clients=None` exactly its result), plus
      `num_examples`; and `personal/<metric>`, `personal/num_examples` over the clients
      evaluated with a personal model only (NaN and 0 when there are none).
    """
    sizes = np.asarray(data.client_sizes, np.int64)
    if rows is None:
        rows = np.full(len(sizes), -1, np.int64)
    else:
        rows = np.asarray(rows, np.int64).reshape(-1)
    if rows.shape != sizes.shape:
        raise ValueError(f"rows has {rows.size} entries but the data has {sizes.size} "
                         "clients; give one row (or -1) per evaluated client, in data order")
    if np.all(rows < 0):
        totals = metric_totals(model, global_params, data, batch_size)
    else:
        totals = personal_metric_totals(model, select, personal, global_params, data, rows,
                                        batch_size)
    has = rows >= 0

    def ratio(num, den):
        d = float(np.sum(den))
        return float(np.sum(num)) / d if d > 0 else float("nan")

    out = {name: ratio(num, den) for name, (num, den) in totals.items()}
    out["num_examples"] = float(np.sum(sizes))
    out.update({f"personal/{name}": ratio(num[has], den[has])
                for name, (num, den) in totals.items()})
    out["personal/num_examples"] = float(np.sum(sizes[has]))
    return out
