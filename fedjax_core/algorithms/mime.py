"""Mime and MimeLite: clients mimic a centralized optimizer whose state the server keeps.

Round t, server params x, state s of the base optimizer (momentum, Adam's moments, ...):

    c = sum_{i in S} sum_{j in D_i} grad l_j(x) / sum_{i in S} n_i     # full-batch gradient at x
    for each client i in S, in parallel:
        y = x
        for each local minibatch b:
            g = grad f_b(y) - grad f_b(x) + c        # Mime: SVRG-style correction
            g = grad f_b(y)                          # MimeLite: no correction
            y = y + U(g, s, y)                       # base optimizer step with s FROZEN
        Delta_i = x - y
    Delta = aggregator({Delta_i}, {n_i})             # mean: sum n_i Delta_i / sum n_i
    x <- x - eta_s Delta
    s <- S(c, s, x)                                  # the base optimizer's own state update

`U` and `S` are the two halves of one optax `update`: `U(g, s, y)` is the update it
returns (its new state is dropped), `S(c, s, x)` the state it returns (its update is
dropped). With plain SGD there is no state, and MimeLite is FedAvg with server SGD.

As in FedJAX (`fedjax/algorithms/mime.py`, `mime_lite.py`): `c` and the deltas are
example-weighted, `eta_s` scales the averaged delta, and `grad f_b(y)` and
`grad f_b(x)` use the same minibatch and the same dropout key. FedJAX computes `c` over
a separate padded batching of each client's data; here each client computes it over the
examples of its first local epoch (every example once, at the training batch size),
which gives the same sum (only dropout draws differ). When `max_steps` cuts a client's
stream inside its first epoch, `c` covers the examples it sees.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_core import parallel, tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.aggregate.mean import mean
from fedjax_core.algorithms.base import AlgorithmEntry, FederatedAlgorithm
from fedjax_core.algorithms.fedavg import AGGREGATOR_KEY, round_metrics
from fedjax_core.client import ClientUpdate, first_epoch_mask, full_batch
from fedjax_core.models.base import Model, masked_mean_loss
from fedjax_core.typing import Params, PyTree

FULL_GRAD_KEY = 0x7FFFFFFE
"""Client key `fold_in(client_key, FULL_GRAD_KEY)` keys the full-gradient pass (its step k
uses a further `fold_in(., k)`); local step k uses `fold_in(client_key, k)`."""


class MimeState(NamedTuple):
    """Server state of Mime / MimeLite.

    Attributes:
      params: the server model x.
      opt_state: the base optimizer's state s, updated with full-batch gradients only.
      aggregator_state: the aggregator's state.
    """

    params: Params
    opt_state: optax.OptState
    aggregator_state: PyTree


def _local_train(model: Model, base_optimizer: optax.GradientTransformation, corrected: bool):
    """`train(x, opt_state, c, batches, mask, key) -> (y, loss_sum, seen)` for one client."""
    value_and_grad = jax.value_and_grad(
        lambda p, b, m, k: masked_mean_loss(model, p, b, m, k, train=True))
    grad_fn = jax.grad(lambda p, b, m, k: masked_mean_loss(model, p, b, m, k, train=True))

    def train(x, opt_state, server_grad, batches, mask, key):
        steps = jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.int32)

        def step(k, carry):
            y, loss_sum, seen = carry
            batch = jax.tree.map(lambda a: a[k], batches)
            m = mask[k]
            step_key = jax.random.fold_in(key, k)
            loss, g = value_and_grad(y, batch, m, step_key)
            if corrected:
                g_at_x = grad_fn(x, batch, m, step_key)
                g = tree.add(tree.sub(g, g_at_x), server_grad)
            updates, _ = base_optimizer.update(g, opt_state, y)  # state stays the server's
            y = optax.apply_updates(y, updates)
            n = jnp.sum(m).astype(jnp.float32)
            return y, loss_sum + loss * n, seen + n

        zero = jnp.zeros((), jnp.float32)
        return jax.lax.fori_loop(0, steps, step, (x, zero, zero))

    return train


def _mime(base_optimizer, server_learning_rate, aggregator, corrected, client_delta_clip_norm):
    aggregator = aggregator or mean()

    def init(params):
        return MimeState(params, base_optimizer.init(params), aggregator.init(params))

    def apply(state, cohort, key, *, model, plan=parallel.Plan()):
        x = state.params
        train = _local_train(model, base_optimizer, corrected)
        gradient_sum = full_batch(model, with_grad=True, train=True)
        slots = jnp.arange(cohort.mask.shape[0], dtype=jnp.int32)
        inputs = (cohort.batches, cohort.mask, cohort.num_examples, slots)

        def full_grad(c):
            batches, mask, n, slot = c
            client_key = jax.random.fold_in(key, slot)
            _, grad_sum, count = gradient_sum(x, batches, first_epoch_mask(mask, n),
                                              jax.random.fold_in(client_key, FULL_GRAD_KEY))
            return grad_sum, count

        def local(c, server_grad):
            batches, mask, n, slot = c
            y, loss_sum, seen = train(x, state.opt_state, server_grad, batches, mask,
                                      jax.random.fold_in(key, slot))
            delta = tree.sub(x, y)
            if client_delta_clip_norm is not None:
                delta = tree.clip_by_norm(delta, client_delta_clip_norm)
            return ClientUpdate(delta, jnp.asarray(n, jnp.float32), loss_sum, seen)

        def average(grad_sums, nums):
            total = jnp.sum(nums)
            summed = jax.tree.map(lambda g: jnp.sum(g, axis=0), grad_sums)
            return tree.scale(summed, 1.0 / jnp.where(total > 0, total, 1.0))

        if corrected:  # Mime: c is needed before local training (an extra exchange).
            grad_sums, nums = parallel.map_clients(full_grad, inputs, plan)
            server_grad = average(grad_sums, nums)
            updates = parallel.map_clients(lambda c: local(c, server_grad), inputs, plan)
        else:  # MimeLite: c only updates the server state, so one pass does both.
            updates, (grad_sums, nums) = parallel.map_clients(
                lambda c: (local(c, None), full_grad(c)), inputs, plan)
            server_grad = average(grad_sums, nums)

        delta, aggregator_state, agg_metrics = aggregator.apply(
            updates.delta, updates.weight, state.aggregator_state,
            jax.random.fold_in(key, AGGREGATOR_KEY), cohort.slots)
        params = tree.sub(x, tree.scale(delta, server_learning_rate))
        _, opt_state = base_optimizer.update(server_grad, state.opt_state, x)
        metrics = {**round_metrics(updates, delta),
                   "train/full_grad_norm": tree.l2_norm(server_grad), **agg_metrics}
        return MimeState(params, opt_state, aggregator_state), metrics

    return FederatedAlgorithm(init, apply)


def mime(client_optimizer: optax.GradientTransformation = optax.sgd(0.1, momentum=0.9),
         server_learning_rate: float = 1.0,
         aggregator: Aggregator | None = None) -> FederatedAlgorithm:
    """Mime: local steps of the base optimizer with frozen server state and SVRG correction.

    Update rule (round t, cohort S, server params x, base optimizer state s):
      `c = sum_i sum_{j in D_i} grad l_j(x) / sum_i n_i` (full-batch gradient at x),
      client step on minibatch b: `g = grad f_b(y) - grad f_b(x) + c`,
      `y <- y + optimizer.update(g, s, y)[0]` (s is not advanced),
      `Delta = aggregator({x - y_i}, {n_i})`, `x <- x - eta_s Delta`,
      `s <- optimizer.update(c, s, x)[1]`.

    Args:
      client_optimizer: the base optimizer to mimic, e.g. `optax.sgd(lr, momentum=0.9)`
        or `optax.adam(lr)`; its state lives on the server.
      server_learning_rate: eta_s, scaling the aggregated delta (1.0: plain averaging).
      aggregator: how deltas are combined; defaults to the example-weighted `mean()`.
        The full-batch gradient `c` is always the example-weighted sum.

    Returns:
      A `FederatedAlgorithm` with `MimeState`. Round metrics: `train/loss`,
      `train/num_examples`, `train/delta_norm`, `train/full_grad_norm` (`||c||`).

    Example:
      >>> alg = mime(optax.sgd(0.1, momentum=0.9), server_learning_rate=1.0)
      >>> state = alg.init(model.init(jax.random.key(0)))
      >>> state, metrics = alg.apply(state, cohort, round_key, model=model)

    References:
      Karimireddy et al. 2020, "Mime: Mimicking Centralized Stochastic Algorithms in
      Federated Learning" (arXiv:2008.03606), Algorithm 1.
    """
    return _mime(client_optimizer, server_learning_rate, aggregator, True, None)


def mimelite(client_optimizer: optax.GradientTransformation = optax.sgd(0.1, momentum=0.9),
             server_learning_rate: float = 1.0, client_delta_clip_norm: float | None = None,
             aggregator: Aggregator | None = None) -> FederatedAlgorithm:
    """MimeLite: local steps of the base optimizer with the server's frozen state.

    Update rule (round t, cohort S, server params x, base optimizer state s):
      client step on minibatch b: `y <- y + optimizer.update(grad f_b(y), s, y)[0]`,
      `Delta = aggregator({x - y_i}, {n_i})`, `x <- x - eta_s Delta`,
      `s <- optimizer.update(c, s, x)[1]` with `c` the full-batch gradient at x over the
      cohort (computed by the clients in the same pass, no extra exchange).

    Args:
      client_optimizer: the base optimizer to mimic; its state lives on the server.
      server_learning_rate: eta_s, scaling the aggregated delta.
      client_delta_clip_norm: clip each client's delta to this L2 norm before
        aggregation (FedJAX's option); None: no clipping.
      aggregator: how deltas are combined; defaults to the example-weighted `mean()`.

    Returns:
      A `FederatedAlgorithm` with `MimeState`. Round metrics as `mime`. With
      `optax.sgd(lr)` (no momentum) it equals `fedavg(optax.sgd(lr), optax.sgd(eta_s))`.

    Example:
      >>> alg = mimelite(optax.adam(1e-3), server_learning_rate=1.0)

    References:
      Karimireddy et al. 2020, "Mime: Mimicking Centralized Stochastic Algorithms in
      Federated Learning" (arXiv:2008.03606), MimeLite.
    """
    return _mime(client_optimizer, server_learning_rate, aggregator, False,
                 client_delta_clip_norm)


_PAPER = "Karimireddy et al. 2020, Mime: Mimicking Centralized Stochastic Algorithms in FL"
ENTRIES = [
    AlgorithmEntry("mime", "clients run the base optimizer with frozen server state and "
                   "SVRG-corrected gradients", mime, _PAPER),
    AlgorithmEntry("mimelite", "clients run the base optimizer with frozen server state "
                   "(no correction)", mimelite, _PAPER),
]
