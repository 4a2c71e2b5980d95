"""The sequential executor FedJAX 0.0.17 uses, with this library's model code.

FedJAX's FedAvg (`fedjax/algorithms/fed_avg.py` with the default `for_each_client`
"jit" backend) runs a Python loop over the cohort's clients and, for each, over its
batches, calling one jitted SGD step per batch; each client's delta is added into a
running example-weighted sum by jitted tree functions, and the server step follows.
`SequentialFedAvg` does the same over a packed `Cohort` (the batches, masks and keys of
this library's round), so for the same cohorts it computes the same FedAvg as
`fedjax_core.algorithms.fedavg` up to float rounding: the scenarios compare execution
strategies, not models. Its evaluation counterpart, `sequential_evaluate`, is FedJAX's
`evaluate_model` over `padded_batch_federated_data`: one jitted call per padded batch.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_core.data.pack import Cohort
from fedjax_core.models.base import Model, masked_mean_loss


def _dense(cohort: Cohort) -> dict:
    """The cohort's feature arrays; the baseline reads host-packed cohorts only."""
    if not isinstance(cohort.batches, dict):
        raise TypeError("the baseline reads dense cohorts (pack_cohort), not IndexedBatches")
    return cohort.batches


class SequentialFedAvg:
    """FedAvg as a Python loop: one jitted call per client batch.

    Args:
      model: the model (the same code the library's round uses).
      client_lr: client SGD learning rate.
      server_lr: server SGD learning rate (FedAvg: 1.0).

    Example:
      >>> fedavg_loop = SequentialFedAvg(model, client_lr=0.1, server_lr=1.0)
      >>> params, loss = fedavg_loop.round(params, cohort, jax.random.fold_in(key, r))
    """

    def __init__(self, model: Model, client_lr: float, server_lr: float):
        self.model = model
        opt = optax.sgd(client_lr)
        self._opt = opt

        @jax.jit
        def sgd_step(params, opt_state, loss_sum, batch, mask, round_key, slot, k):
            # The library's keys: client key fold_in(round_key, slot), step key fold_in(., k).
            key = jax.random.fold_in(jax.random.fold_in(round_key, slot), k)
            loss, grads = jax.value_and_grad(
                lambda p: masked_mean_loss(model, p, batch, mask, key, train=True))(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            n = jnp.sum(mask).astype(jnp.float32)
            return optax.apply_updates(params, updates), opt_state, loss_sum + loss * n

        @jax.jit
        def accumulate(total, start, end, weight):
            return jax.tree.map(lambda t, s, e: t + weight * (s - e), total, start, end)

        @jax.jit
        def server_step(params, total, weight_sum):
            return jax.tree.map(lambda p, t: p - server_lr * t / weight_sum, params, total)

        self.sgd_step = sgd_step
        self.init = jax.jit(opt.init)
        self._zeros = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p))
        self._accumulate = accumulate
        self._server_step = server_step

    def compile_step(self, params, cohort: Cohort, round_key) -> float:
        """Seconds to lower and compile the per-batch step for `cohort`'s batch shape."""
        batch = {n: v[0, 0] for n, v in _dense(cohort).items()}
        t = time.perf_counter()
        self.sgd_step.lower(params, self._opt.init(params), jnp.float32(0), batch,
                            cohort.mask[0, 0], round_key, 0, 0).compile()
        return time.perf_counter() - t

    def step_flops(self, params, cohort: Cohort, round_key):
        """The compiled step's executable (for `measure.xla_flops`)."""
        batch = {n: v[0, 0] for n, v in _dense(cohort).items()}
        return self.sgd_step.lower(params, self._opt.init(params), jnp.float32(0), batch,
                                   cohort.mask[0, 0], round_key, 0, 0).compile()

    def round(self, params, cohort: Cohort, round_key, clients=None):
        """One FedAvg round over `cohort` (or only the slots in `clients`).

        Returns:
          `(new params, mean training loss over the examples seen)`, both on the device.
        """
        slots = range(cohort.num_clients) if clients is None else clients
        batches = _dense(cohort)
        total = self._zeros(params)
        weight_sum, seen = 0.0, 0.0
        losses = []
        zero = jnp.float32(0)
        for c in slots:
            w, s, loss_sum = params, self.init(params), zero
            steps = int(np.count_nonzero(cohort.mask[c].any(axis=-1)))
            for k in range(steps):
                batch = {n: v[c, k] for n, v in batches.items()}
                w, s, loss_sum = self.sgd_step(w, s, loss_sum, batch, cohort.mask[c, k],
                                               round_key, c, k)
            losses.append(loss_sum)
            seen += float(cohort.mask[c].sum())
            n = float(cohort.num_examples[c])
            total = self._accumulate(total, params, w, n)
            weight_sum += n
        params = self._server_step(params, total, max(weight_sum, 1.0))
        return params, jnp.sum(jnp.stack(losses)) / max(seen, 1.0)


def sequential_evaluate(model: Model, params, data, batch_size: int = 256) -> dict[str, float]:
    """FedJAX's full evaluation: every client's examples concatenated and cut into batches
    of `batch_size` (the last padded and masked), one jitted metrics call per batch,
    running sums on the device.

    Returns:
      `{metric: sum numerator / sum denominator}`, as `fedjax_core.evaluate.evaluate`.
    """
    step = _eval_step(model)
    totals = None
    for batch, mask in _padded_batches(data, batch_size):
        totals = step(params, batch, mask, totals)
    return {k: float(n) / float(d) if float(d) > 0 else float("nan")
            for k, (n, d) in jax.device_get(totals).items()}


@functools.lru_cache(maxsize=8)
def _eval_step(model: Model):
    @jax.jit
    def step(params, batch, mask, totals):
        preds = model.apply(params, batch, train=False)
        w = mask.astype(jnp.float32)
        out = {}
        for name, (num, den) in model.metrics(batch, preds).items():
            n, d = jnp.sum(num * w), jnp.sum(den * w)
            out[name] = (n, d) if totals is None else (totals[name][0] + n, totals[name][1] + d)
        return out

    return step


def _padded_batches(data, batch_size: int):
    """Batches of `batch_size` over all clients' examples in order, the last padded."""
    buf, filled = None, 0
    for i in range(len(data.client_ids)):
        client = data.get_client(i)
        n = len(next(iter(client.values())))
        start = 0
        while start < n:
            if buf is None:
                buf = {k: np.zeros((batch_size,) + np.shape(v)[1:], np.asarray(v).dtype)
                       for k, v in client.items()}
            take = min(n - start, batch_size - filled)
            for k, v in client.items():
                buf[k][filled:filled + take] = v[start:start + take]
            filled += take
            start += take
            if filled == batch_size:
                yield buf, np.ones(batch_size, bool)
                buf, filled = None, 0
    if filled:
        mask = np.zeros(batch_size, bool)
        mask[:filled] = True
        yield buf, mask
