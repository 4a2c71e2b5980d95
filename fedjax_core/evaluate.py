"""Batched, masked evaluation of a model over a whole `FederatedData`.

Every metric of a model is a ratio of sums over examples (`Model.metrics`), so the
examples of all clients are streamed in fixed-shape groups of padded batches; one
jitted call per group adds each example's numerator and denominator to its client's
running totals. Global metrics divide the totals summed over clients; per-client
metrics divide each client's own.

With a `parallel.Plan` whose mesh has several devices, each group's batches are split over
the devices (`parallel.sum_clients` over the group's batch axis): every device adds its
share into its own totals and one `psum` adds the devices' totals, equal to the
one-device totals up to float summation order. A `progress(done, total)` callback hears
how many examples have been evaluated, for a progress bar on long passes.
"""

import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_core import parallel
from fedjax_core.data.federated_data import FederatedData
from fedjax_core.models.base import Model
from fedjax_core.typing import Params

Progress = Callable[[int, int], object]
"""`progress(done, total)`: `done` of the pass's `total` examples have been evaluated."""

GROUP_BATCHES = 16
"""Batches per jitted call: bounds device memory and keeps one compiled shape."""


def _groups(data: FederatedData, batch_size: int, group: int) -> Iterator[tuple[dict, np.ndarray]]:
    """Yields `(features [g, batch, ...], client id [g, batch])`, -1 = padding.

    Full groups have `g = group` batches. The examples left at the end go out in one
    group of the next power of two of their number of batches (e.g. 5 batches: 8), so a
    dataset compiles at most two shapes and the last group is at least half full."""
    size = group * batch_size
    buf: dict[str, list[np.ndarray]] = {}
    seg: list[np.ndarray] = []
    filled = 0

    def emit(feats_all, seg_all, start, g):
        n = min(g * batch_size, len(seg_all) - start)
        feats = {}
        for name, x in feats_all.items():
            out = np.zeros((g * batch_size,) + x.shape[1:], x.dtype)
            out[:n] = x[start:start + n]
            feats[name] = out.reshape((g, batch_size) + x.shape[1:])
        s = np.full(g * batch_size, -1, np.int32)
        s[:n] = seg_all[start:start + n]
        return feats, s.reshape(g, batch_size)

    def concat(parts, segs):
        return {name: np.concatenate(arrs) for name, arrs in parts.items()}, np.concatenate(segs)

    for ci in range(len(data.client_ids)):
        arrays = data.get_client(ci)
        n = len(next(iter(arrays.values())))
        start = 0
        while start < n:
            take = min(n - start, size - filled)
            for name, x in arrays.items():
                buf.setdefault(name, []).append(np.asarray(x[start:start + take]))
            seg.append(np.full(take, ci, np.int32))
            filled += take
            start += take
            if filled == size:
                yield emit(*concat(buf, seg), 0, group)
                buf, seg, filled = {}, [], 0
    if filled:
        feats, segs = concat(buf, seg)
        batches = -(-filled // batch_size)
        yield emit(feats, segs, 0, min(group, 1 << (batches - 1).bit_length()))


@functools.partial(jax.jit, static_argnames=("model", "num_clients"))
def _accumulate(model: Model, params, totals, features, segments, num_clients: int):
    def body(totals, inputs):
        batch, seg = inputs
        preds = model.apply(params, batch, train=False)
        valid = seg >= 0
        ids = jnp.where(valid, seg, 0)
        new = {}
        for name, (num, den) in model.metrics(batch, preds).items():
            w = valid.astype(jnp.float32)
            n = jax.ops.segment_sum(num.astype(jnp.float32) * w, ids, num_segments=num_clients)
            d = jax.ops.segment_sum(den.astype(jnp.float32) * w, ids, num_segments=num_clients)
            new[name] = (totals[name][0] + n, totals[name][1] + d)
        return new, None

    totals, _ = jax.lax.scan(body, totals, (features, segments))
    return totals


@functools.partial(jax.jit, static_argnames=("model", "num_clients", "plan"))
def _accumulate_sharded(model: Model, params, totals, features, segments, num_clients: int,
                        plan: parallel.Plan):
    """`_accumulate` with the group's batches split over the mesh's devices: each device
    sums its batches' per-client sums, one `psum` adds the devices' (`sum_clients`)."""
    def one_batch(inputs):
        batch, seg = inputs
        preds = model.apply(params, batch, train=False)
        valid = seg >= 0
        ids = jnp.where(valid, seg, 0)
        w = valid.astype(jnp.float32)
        return {name: (jax.ops.segment_sum(num.astype(jnp.float32) * w, ids,
                                           num_segments=num_clients),
                       jax.ops.segment_sum(den.astype(jnp.float32) * w, ids,
                                           num_segments=num_clients))
                for name, (num, den) in model.metrics(batch, preds).items()}

    added = parallel.sum_clients(one_batch, (features, segments), plan)
    return jax.tree.map(jnp.add, totals, added)


def _spreads(plan: parallel.Plan | None) -> bool:
    """Whether `plan` splits evaluation over several devices of this process."""
    if plan is None or plan.mesh is None or parallel.num_shards(plan) < 2:
        return False
    return all(d.process_index == jax.process_index() for d in plan.mesh.devices.flat)


def metric_totals(model: Model, params: Params, data: FederatedData,
                  batch_size: int = 256, *, plan: parallel.Plan | None = None,
                  progress: Progress | None = None
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-client sums `name -> (numerator[clients], denominator[clients])`.

    The examples of all clients stream in groups of `GROUP_BATCHES` padded batches (per
    device), packed across clients: one jitted call per group.

    Args:
      model: the model (evaluated with `train=False`).
      params: its parameters.
      data: the clients to evaluate.
      batch_size: examples per forward pass.
      plan: with a mesh of several devices (of this process), each group's batches are
        split over them; None or no mesh: one device.
      progress: called as `progress(done, total)` after each group has been evaluated
        (its result waited for one group late, so the device is never idle).

    Returns:
      numpy float arrays of shape `[num_clients]`.

    Example:
      >>> totals = metric_totals(model, params, test, 256, plan=Plan(mesh=client_mesh(8)))
      >>> global_metrics(totals, test)["accuracy"]
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    total = int(np.sum(data.client_sizes))
    num_clients = len(data.client_ids)
    sum_plan = plan._replace(chunk_size=1) if plan is not None and _spreads(plan) else None
    width = 1 if sum_plan is None else parallel.num_shards(sum_plan)
    group = max(1, min(GROUP_BATCHES * width, -(-total // batch_size)))
    if sum_plan is not None:
        params = parallel.replicate(params, sum_plan)
    totals = None
    done = pending = 0
    for features, segments in _groups(data, batch_size, group):
        if totals is None:
            shapes = jax.eval_shape(
                lambda f: model.metrics(f, model.apply(params, f, train=False)),
                jax.tree.map(lambda x: x[0], features))
            zeros = jnp.zeros((num_clients,), jnp.float32)
            totals = {name: (zeros, zeros) for name in shapes}
            if sum_plan is not None:
                totals = parallel.replicate(totals, sum_plan)
        before = totals
        if sum_plan is not None:
            totals = _accumulate_sharded(model, params, totals, features, segments,
                                         num_clients, sum_plan)
        else:
            totals = _accumulate(model, params, totals, features, segments, num_clients)
        if progress is not None:  # the previous group is done once its totals are
            jax.block_until_ready(before)
            done += pending
            progress(done, total)
            pending = int(np.sum(segments >= 0))
    if totals is None:
        raise ValueError("cannot evaluate on a dataset with no examples")
    out = {k: (np.asarray(n), np.asarray(d)) for k, (n, d) in totals.items()}
    if progress is not None:
        progress(total, total)
    return out


def evaluate(model: Model, params: Params, data: FederatedData,
             batch_size: int = 256, *, plan: parallel.Plan | None = None,
             progress: Progress | None = None) -> dict[str, float]:
    """Global metrics over all examples of all clients.

    `metric = sum_{clients, examples} numerator / sum_{clients, examples} denominator`
    (e.g. accuracy over all examples, not a mean of client accuracies).

    Args:
      model: the model.
      params: its parameters.
      data: the clients.
      batch_size: examples per forward pass; padding is masked out.
      plan, progress: as in `metric_totals` (several devices; a progress callback).

    Returns:
      `{metric name: float}` plus `num_examples`.

    Example:
      >>> evaluate(model, state.params, test_data)
      {'loss': 2.31, 'accuracy': 0.42, 'num_examples': 10000.0}
    """
    return global_metrics(metric_totals(model, params, data, batch_size, plan=plan,
                                        progress=progress), data)


def evaluate_per_client(model: Model, params: Params, data: FederatedData,
                        batch_size: int = 256, *, plan: parallel.Plan | None = None,
                        progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Each client's own metrics: `numerator_c / denominator_c`, NaN where it is 0.

    Args:
      model, params, data, batch_size: as in `evaluate`.
      plan, progress: as in `metric_totals`.

    Returns:
      `{metric name: Float[ndarray, "clients"]}` in `data.client_ids` order, plus
      `num_examples`.
    """
    out = ratios(metric_totals(model, params, data, batch_size, plan=plan, progress=progress))
    out["num_examples"] = np.asarray(data.client_sizes, np.float64)
    return out


def global_metrics(totals: dict[str, tuple[np.ndarray, np.ndarray]],
                   data: FederatedData) -> dict[str, float]:
    """`sum_c numerator_c / sum_c denominator_c` for each metric of `metric_totals`
    (NaN where the denominator is 0), plus `num_examples` of `data`."""
    out = {}
    for name, (num, den) in totals.items():
        d = float(np.sum(den))
        out[name] = float(np.sum(num)) / d if d > 0 else float("nan")
    out["num_examples"] = float(np.sum(data.client_sizes))
    return out


def ratios(totals: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each client's own `numerator_c / denominator_c`, NaN where it is 0."""
    out = {}
    for name, (num, den) in totals.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    return out
