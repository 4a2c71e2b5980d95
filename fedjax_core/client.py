"""One client's local work: THE loop over local steps, and what a client sees in a round.

The client runs SGD-style steps with an optax optimizer over its packed batches:

    for k in 0 .. K-1:                      # K = the client's own number of steps
        g_k  = grad_w  mean_{i in batch k, mask_i} loss(w_k; x_i, y_i)
        u_k, s_{k+1} = client_optimizer.update(g_k, s_k, w_k)
        w_{k+1} = w_k + u_k
    delta = w_0 - w_K                       # a pseudo-gradient: the server descends along it

`steps_loop` is the only loop over local steps in the library: a `lax.fori_loop` whose
trip count is the number of non-empty steps, so padded steps cost nothing when clients
run one by one, and under `vmap` they leave the carry untouched (the batched loop
selects the finished clients' state). Batches are read one step at a time, straight
from the population when the data lives on the device (`data.device.step_batch`).

An algorithm's client function receives a `ClientContext` (built by the round skeleton,
`fedjax_core.skeleton`) and trains with `ctx.train(...)`, makes full passes with
`ctx.full_batch(...)`, or runs its own step with `ctx.loop(...)`.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_core import tree
from fedjax_core.data.device import step_batch
from fedjax_core.models.base import Model, masked_mean_loss
from fedjax_core.typing import Array, Float, Params, PRNGKey, PyTree

Regularizer = Callable[[Params], Array]
"""`regularizer(w) -> scalar` added to every step's loss (e.g. FedProx's
`mu/2 ||w - w_global||^2`, closing over `w_global`)."""

GradCorrection = Callable[[Params, Params], Params]
"""`correction(grads, w) -> grads` applied before the optimizer (e.g. SCAFFOLD's
`g - c_i + c`)."""

StepLoss = Callable[[Params, dict, Array, PRNGKey | None], Array]
"""`loss(w, batch, mask, key) -> scalar`: one step's training loss (default: the model's
masked mean loss with dropout on)."""

StepGradient = Callable[[Params, dict, Array, PRNGKey | None], tuple[Array, Params]]
"""`gradient(w, batch, mask, key) -> (loss, grads)`: one step's reported loss and the
gradient the optimizer follows, replacing loss, regularizer and correction (e.g.
Mime's `grad f_b(y) - grad f_b(x) + c`)."""


class TrainStats(NamedTuple):
    """What a client's local training measured.

    Attributes:
      loss_sum: scalar, sum over its training examples (all epochs) of the loss measured
        at the step that used them (without any regularizer).
      examples_seen: scalar, number of examples processed (n * epochs).
      steps: scalar float, the number of non-empty local steps run.
    """

    loss_sum: Float[Array, ""]
    examples_seen: Float[Array, ""]
    steps: Float[Array, ""]


def num_steps(mask: Array) -> Array:
    """`Int[Array, ""]`, the number of non-empty steps of one client's `[steps, batch]` mask."""
    return jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.int32)


StepKeys = PRNGKey | tuple[PRNGKey, ...] | None
"""A loop's key, several keys (each step gets each folded with its index), or None."""


def steps_loop(step: Callable[..., Any], carry: Any, batches, mask: Array,
               key: StepKeys = None) -> Any:
    """Runs `carry = step(carry, batch_k, mask_k, key_k)` over one client's non-empty steps.

    The library's one loop over local steps. Step k reads its batch with
    `data.device.step_batch` (dense arrays or rows of the device-resident population)
    and gets the key `fold_in(key, k)` (None when `key` is None; with a tuple of keys,
    the tuple of each one's `fold_in(., k)`, e.g. APFL's two passes per step).

    Args:
      step: `step(carry, batch, mask, key) -> carry`, with `batch` feature -> `[batch, ...]`
        and `mask` `Bool[Array, "batch"]`.
      carry: the initial carry (any pytree).
      batches: feature -> `[steps, batch, ...]`, or one client's `IndexedBatches`.
      mask: `Bool[Array, "steps batch"]`, non-empty steps first.
      key: the client's key, a tuple of keys, or None.

    Returns:
      The final carry.

    Example:
      >>> count = steps_loop(lambda c, b, m, k: c + jnp.sum(m), 0, batches, mask)
    """
    def body(k, c):
        sub = jax.tree.map(lambda parent: jax.random.fold_in(parent, k), key)
        return step(c, step_batch(batches, k), mask[k], sub)

    return jax.lax.fori_loop(0, num_steps(mask), body, carry)


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


def train_steps(model: Model, optimizer: optax.GradientTransformation, params: Params,
                batches, mask: Array, key: PRNGKey | None, *,
                loss: StepLoss | None = None, regularizer: Regularizer | None = None,
                correction: GradCorrection | None = None,
                gradient: StepGradient | None = None) -> tuple[Params, TrainStats]:
    """Local training of one client from `params`: `steps_loop` of optimizer steps.

    Update rule, for each non-empty step k:
      `g_k = grad_w [L_k(w_k) + R(w_k)]`, `g_k <- C(g_k, w_k)`,
      `w_{k+1} = w_k + optimizer.update(g_k)`,
    where `L_k` is the step's loss (default: the masked mean loss of batch k), `R` the
    optional regularizer and `C` the optional gradient correction; the optimizer state
    starts fresh from `optimizer.init(w_0)`. Step k's dropout key is `fold_in(key, k)`.
    `loss_sum` adds up `L_k` (without `R`) times the examples of step k.

    Args:
      model: the model.
      optimizer: the client optimizer, e.g. `optax.sgd(0.1)`.
      params: the starting point w_0.
      batches: feature -> `[steps, batch, ...]` (or one client's `IndexedBatches`).
      mask: `Bool[Array, "steps batch"]`, non-empty steps first.
      key: the client key.
      loss: `L(w, batch, mask, key)`, or None for the model's masked mean loss.
      regularizer: `R(w)`, or None.
      correction: `C(g, w)`, or None.
      gradient: `(loss, g) = gradient(w, batch, mask, key)` replacing the three above.

    Returns:
      `(w_K, TrainStats)`.

    Example:
      >>> w, stats = train_steps(model, optax.sgd(0.1), params, batches, mask, key)

    References:
      McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
      Decentralized Data" (ClientUpdate in Algorithm 1).
    """
    if gradient is None:
        step_loss = loss or (lambda p, b, m, k: masked_mean_loss(model, p, b, m, k, train=True))

        def objective(p, b, m, k):
            value = step_loss(p, b, m, k)
            total = value if regularizer is None else value + regularizer(p)
            return total, value

        value_and_grad = jax.value_and_grad(objective, has_aux=True)

        def corrected(w, b, m, k):
            (_, value), grads = value_and_grad(w, b, m, k)
            return value, grads if correction is None else correction(grads, w)

        gradient = corrected

    def step(carry, batch, m, k):
        w, opt_state, loss_sum, seen, steps = carry
        value, grads = gradient(w, batch, m, k)
        updates, opt_state = optimizer.update(grads, opt_state, w)
        w = optax.apply_updates(w, updates)
        n = jnp.sum(m).astype(jnp.float32)
        return w, opt_state, loss_sum + value * n, seen + n, steps + 1.0

    zero = jnp.zeros((), jnp.float32)
    w, _, loss_sum, seen, steps = steps_loop(
        step, (params, optimizer.init(params), zero, zero, zero), batches, mask, key)
    return w, TrainStats(loss_sum, seen, steps)


def local_train(model: Model, optimizer: optax.GradientTransformation, **options):
    """Builds `train(params, batches, mask, key) -> (params, loss_sum, seen)` for one
    client: `train_steps` with fixed options (`loss`, `regularizer`, `correction`,
    `gradient`), e.g. for fine-tuning in `fedjax_core.personalization`.

    Example:
      >>> train = local_train(model, optax.sgd(0.1))
      >>> new_params, loss_sum, seen = train(params, batches, mask, jax.random.key(0))
    """
    def train(params, batches, mask, key):
        w, stats = train_steps(model, optimizer, params, batches, mask, key, **options)
        return w, stats.loss_sum, stats.examples_seen

    return train


def full_batch(model: Model, params: Params, batches, mask: Array, key: PRNGKey | None = None,
               *, with_grad: bool = True, train: bool = True):
    """`(loss_sum, grad_sum, count)` of one client at fixed `params`, over every masked slot.

    `loss_sum = sum_j m_j loss_j(params)` and `grad_sum = grad_params loss_sum` (None
    when `with_grad` is False); `count = sum_j m_j`. Runs `steps_loop`; step k's dropout
    key is `fold_in(key, k)`. Pass `first_epoch_mask(...)` as `mask` to get the client's
    empirical loss `F_i = loss_sum / count`.

    Args:
      model: the model.
      params: the point of evaluation.
      batches: feature -> `[steps, batch, ...]` (or one client's `IndexedBatches`).
      mask: `Bool[Array, "steps batch"]` (non-empty steps first).
      key: the pass's key (needed when `train` is True and the model uses dropout).
      with_grad: also accumulate the gradient.
      train: run the model's training path (dropout on).

    Returns:
      `(loss_sum, grad_sum or None, count)`.

    Example:
      >>> loss_sum, grad_sum, count = full_batch(model, w, batches, first_epoch_mask(mask, n))
    """
    def loss_sum(p, batch, m, k):
        per_example = model.loss(batch, model.apply(p, batch, key=k, train=train))
        return jnp.sum(per_example * m.astype(per_example.dtype))

    value_and_grad = jax.value_and_grad(loss_sum)

    def step(carry, batch, m, k):
        total, grads = carry
        if with_grad:
            value, g = value_and_grad(params, batch, m, k)
            return total + value, tree.add(grads, g)
        return total + loss_sum(params, batch, m, k), grads

    zero = jnp.zeros((), jnp.float32)
    grads0 = tree.zeros_like(params) if with_grad else None
    total, grads = steps_loop(step, (zero, grads0), batches, mask, key)
    return total, grads, jnp.sum(mask).astype(jnp.float32)


class ClientContext:
    """What one client of a round sees, handed to an algorithm's client function.

    Built by the round skeleton (`fedjax_core.skeleton`) for each client, inside the
    jitted round; every array has no `clients` axis.

    Attributes:
      params: the global model w_t the server sent.
      server: the algorithm's server state (read-only; e.g. SCAFFOLD's control c).
      state: the client's row of the algorithm's per-client store (its initial value
        when the client has never trained), or None when the algorithm keeps none.
      is_new: `Bool[Array, ""]`, True when the client has never been seen.
      key: the client key `fold_in(round_key, slot)`.
      num_examples: `Float[Array, ""]`, the client's number of examples n (0 for a
        padding client).
      batches: feature -> `[steps, batch, ...]` (or its `IndexedBatches`).
      mask: `Bool[Array, "steps batch"]`.
      model: the model.
      slot: `Int[Array, ""]`, the client's slot in the cohort.
      round_key: the round key (for draws shared by the whole cohort, e.g. FedBuff's
        staleness of every slot).
      first_pass: the cohort's sums of the algorithm's first pass (Mime's full-batch
        gradient), or an empty dict.
      staleness: `Int[Array, ""]`, the server versions that passed while the client
        trained, from the simulated clock's event timeline (`Cohort.staleness`), or None
        when the round has no timeline.

    Example:
      >>> def client(c: ClientContext) -> ClientReport:
      ...     w, stats = c.train(c.params, optax.sgd(0.1))
      ...     return ClientReport(tree.sub(c.params, w), stats)
    """

    def __init__(self, *, params: Params, server: Any, state: PyTree, is_new: Array,
                 key: PRNGKey, num_examples: Array, batches, mask: Array, model: Model,
                 slot: Array, round_key: PRNGKey, first_pass: dict | None = None,
                 staleness: Array | None = None):
        self.params, self.server, self.state, self.is_new = params, server, state, is_new
        self.staleness = staleness
        self.key, self.num_examples, self.batches, self.mask = key, num_examples, batches, mask
        self.model, self.slot, self.round_key = model, slot, round_key
        self.first_pass = {} if first_pass is None else first_pass

    @property
    def first_epoch(self) -> Array:
        """`Bool[Array, "steps batch"]`: the mask of the first epoch (each example once)."""
        return first_epoch_mask(self.mask, self.num_examples)

    def train(self, params: Params, optimizer: optax.GradientTransformation, *,
              key: PRNGKey | None = None, **options) -> tuple[Params, TrainStats]:
        """Local training from `params` over the client's batches: `train_steps` with this
        client's data and key (or `key`). Options: `loss`, `regularizer`, `correction`,
        `gradient`."""
        return train_steps(self.model, optimizer, params, self.batches, self.mask,
                           self.key if key is None else key, **options)

    def full_batch(self, params: Params, *, key: PRNGKey | None = None, mask: Array | None = None,
                   with_grad: bool = True, train: bool = True):
        """`full_batch` of this client at `params`, over its first epoch unless `mask` is
        given: `(loss_sum, grad_sum, count)`."""
        return full_batch(self.model, params, self.batches,
                          self.first_epoch if mask is None else mask, key,
                          with_grad=with_grad, train=train)

    def loop(self, step, carry, *, key: StepKeys = None, mask: Array | None = None):
        """`steps_loop(step, carry, ...)` over this client's batches (all its steps unless
        `mask` is given); step k's key is `fold_in(key, k)` (None when `key` is None; a
        tuple of keys gives a tuple)."""
        return steps_loop(step, carry, self.batches, self.mask if mask is None else mask, key)


class ClientReport(NamedTuple):
    """What a client sends back at the end of a round.

    Attributes:
      delta: the model update Delta_i, shaped like the params; combined by the
        algorithm's aggregator.
      stats: its `TrainStats` (for `train/loss`).
      weight: its aggregation weight; None: its number of examples n_i.
      state: its new row of the per-client store (None: unchanged / no store).
      sums: a dict of arrays summed over the cohort's real clients, for the server
        (e.g. `{"control_change": c_i+ - c_i}`); None: nothing.
      per_client: a dict of scalars reported per client when the round is asked for
        per-client outputs (e.g. `{"cluster": k}`); None: nothing beyond the defaults.
    """

    delta: Params
    stats: TrainStats
    weight: Any = None
    state: PyTree = None
    sums: dict | None = None
    per_client: dict | None = None
