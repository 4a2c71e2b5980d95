"""Local training of ONE client: the kernel that `parallel.py` maps over a cohort.

The client runs SGD-style steps with an optax optimizer over its packed batches:

    for k in 0 .. K-1:                      # K = the client's own number of steps
        g_k  = grad_w  mean_{i in batch k, mask_i} loss(w_k; x_i, y_i)
        u_k, s_{k+1} = client_optimizer.update(g_k, s_k, w_k)
        w_{k+1} = w_k + u_k
    delta = w_0 - w_K                       # a pseudo-gradient: the server descends along it

The loop is a `lax.fori_loop` whose trip count is the number of non-empty steps, so
padded steps cost nothing when clients run one by one, and under `vmap` they leave the
parameters untouched (the batched loop selects the finished clients' state).
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_core import tree
from fedjax_core.data.device import step_batch
from fedjax_core.models.base import Model, masked_mean_loss
from fedjax_core.typing import Array, Float, Params, PyTree


class ClientUpdate(NamedTuple):
    """What a client sends back.

    Attributes:
      delta: `w_0 - w_K`, shaped like the params.
      weight: scalar float, the client's number of examples (its aggregation weight).
      loss_sum: scalar, sum over its training examples (all epochs) of the loss
        measured at the step that used them.
      examples_seen: scalar, number of examples processed (n * epochs).
    """

    delta: Params
    weight: Float[Array, ""]
    loss_sum: Float[Array, ""]
    examples_seen: Float[Array, ""]


TrainFn = Callable[..., tuple[Params, Float[Array, ""], Float[Array, ""]]]

Regularizer = Callable[[Params, PyTree], Array]
"""`regularizer(w, context) -> scalar` added to every step's loss (e.g. FedProx's
`mu/2 ||w - w_global||^2` with `context = w_global`)."""

GradCorrection = Callable[[Params, Params, PyTree], Params]
"""`correction(grads, w, context) -> grads` applied before the optimizer (e.g. SCAFFOLD's
`g - c_i + c`)."""


def local_train(model: Model, optimizer: optax.GradientTransformation,
                regularizer: Regularizer | None = None,
                grad_correction: GradCorrection | None = None) -> TrainFn:
    """Builds `train(params, batches, mask, key, context=None) -> (params, loss_sum, seen)`.

    Update rule, for each non-empty step k:
      `g_k = grad_w [L_k(w_k) + R(w_k, context)]`, `g_k <- C(g_k, w_k, context)`,
      `w_{k+1} = w_k + optimizer.update(g_k)`,
    where `L_k` is the masked mean loss of batch k, `R` the optional regularizer and `C`
    the optional gradient correction; the optimizer state starts fresh from
    `optimizer.init(w_0)`. Step k's dropout key is `fold_in(key, k)`. `loss_sum` adds up
    `L_k` (without `R`) times the examples of step k.

    Args:
      model: the model.
      optimizer: the client optimizer, e.g. `optax.sgd(0.1)`.
      regularizer: `R(w, context)`, or None.
      grad_correction: `C(g, w, context)`, or None.

    Returns:
      `train` with `batches` feature -> `[steps, batch, ...]` (or one client's
        `IndexedBatches`, read one step at a time), `mask` `[steps, batch]`
      (non-empty steps first), `key` the client key, `context` any pytree the
      regularizer and correction read.

    Example:
      >>> train = local_train(model, optax.sgd(0.1))
      >>> new_params, loss_sum, seen = train(params, batches, mask, jax.random.key(0))

    References:
      McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
      Decentralized Data" (ClientUpdate in Algorithm 1).
    """
    def objective(p, b, m, k, context):
        loss = masked_mean_loss(model, p, b, m, k, train=True)
        total = loss if regularizer is None else loss + regularizer(p, context)
        return total, loss

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train(params, batches, mask, key, context=None):
        steps = jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.int32)

        def step(k, carry):
            w, opt_state, loss_sum, seen = carry
            batch = step_batch(batches, k)
            m = mask[k]
            (_, loss), grads = grad_fn(w, batch, m, jax.random.fold_in(key, k), context)
            if grad_correction is not None:
                grads = grad_correction(grads, w, context)
            updates, opt_state = optimizer.update(grads, opt_state, w)
            w = optax.apply_updates(w, updates)
            n = jnp.sum(m).astype(jnp.float32)
            return w, opt_state, loss_sum + loss * n, seen + n

        zero = jnp.zeros((), jnp.float32)
        w, _, loss_sum, seen = jax.lax.fori_loop(
            0, steps, step, (params, optimizer.init(params), zero, zero))
        return w, loss_sum, seen

    return train


def client_update(model: Model, optimizer: optax.GradientTransformation,
                  regularizer: Regularizer | None = None,
                  grad_correction: GradCorrection | None = None):
    """Builds `update(params, batches, mask, num_examples, key, context=None) -> ClientUpdate`.

    `delta = w_0 - train(w_0)`, `weight = num_examples`. See `local_train`.

    Example:
      >>> update = client_update(model, optax.sgd(0.1))
      >>> u = update(params, batches, mask, jnp.float32(17), key)
      >>> new_params = tree.sub(params, u.delta)
    """
    train = local_train(model, optimizer, regularizer, grad_correction)

    def update(params, batches, mask, num_examples, key, context=None) -> ClientUpdate:
        trained, loss_sum, seen = train(params, batches, mask, key, context)
        return ClientUpdate(
            delta=tree.sub(params, trained),
            weight=jnp.asarray(num_examples, jnp.float32),
            loss_sum=loss_sum,
            examples_seen=seen,
        )

    return update


def first_epoch_mask(mask: Array, num_examples: Array) -> Array:
    """The client's mask restricted to its first `num_examples` slots: each example once.

    Args:
      mask: `Bool[Array, "steps batch"]`, one packed client.
      num_examples: scalar, the client's number of examples n.

    Returns:
      `Bool[Array, "steps batch"]`, True at the real slots whose flat position
      `step * batch + b` is below n.
    """
    steps, batch = mask.shape
    position = jnp.arange(steps * batch, dtype=jnp.int32).reshape(steps, batch)
    return mask & (position < jnp.asarray(num_examples, jnp.int32))


def full_batch(model: Model, with_grad: bool = True, train: bool = True):
    """Builds `f(params, batches, mask, key) -> (loss_sum, grad_sum, count)` for one client.

    `loss_sum = sum_j m_j loss_j(params)` and `grad_sum = grad_params loss_sum` over
    every masked slot of every step (`grad_sum` is None when `with_grad` is False);
    `count = sum_j m_j`. The steps run in a `lax.fori_loop` up to the last non-empty
    one; step k's dropout key is `fold_in(key, k)`. Pass `first_epoch_mask(...)` as
    `mask` to get the client's empirical loss `F_i = loss_sum / count`.

    Args:
      model: the model.
      with_grad: also accumulate the gradient.
      train: run the model's training path (dropout on; needs `key`).

    Returns:
      The function, for `batches` feature -> `[steps, batch, ...]` and `mask`
      `[steps, batch]` (non-empty steps first).
    """

    def loss_sum(p, batch, m, k):
        preds = model.apply(p, batch, key=k, train=train)
        per_example = model.loss(batch, preds)
        return jnp.sum(per_example * m.astype(per_example.dtype))

    value_and_grad = jax.value_and_grad(loss_sum)

    def f(params, batches, mask, key=None):
        steps = jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.int32)

        def step(k, carry):
            total, grads = carry
            batch = jax.tree.map(lambda x: x[k], batches)
            sub = None if key is None else jax.random.fold_in(key, k)
            if with_grad:
                value, g = value_and_grad(params, batch, mask[k], sub)
                return total + value, tree.add(grads, g)
            return total + loss_sum(params, batch, mask[k], sub), grads

        zero = jnp.zeros((), jnp.float32)
        grads0 = tree.zeros_like(params) if with_grad else None
        total, grads = jax.lax.fori_loop(0, steps, step, (zero, grads0))
        return total, grads, jnp.sum(mask).astype(jnp.float32)

    return f
