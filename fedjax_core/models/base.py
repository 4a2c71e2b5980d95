"""The `Model` record: four pure functions that every kernel calls."""

from typing import Callable, NamedTuple

import jax.numpy as jnp

from fedjax_core.typing import Array, Batch, Params, PRNGKey

MetricFn = Callable[[Batch, Array], dict[str, tuple[Array, Array]]]
"""`metrics(batch, preds) -> {name: (numerator[batch], denominator[batch])}`.

Every metric is a ratio of sums over examples, so that evaluation can mask padded
examples, add up across batches and clients, and divide once at the end. Accuracy is
`(correct, 1)`; a token accuracy is `(correct tokens, counted tokens)` per sequence.
"""


class Model(NamedTuple):
    """A model as pure functions, in the manner of optax.

    Attributes:
      init: `init(key) -> params`.
      apply: `apply(params, batch, key=None, train=False) -> preds`, predictions
        (usually logits) with a leading `batch` axis. `train=True` turns on dropout
        and selects the training code path; it then needs `key`.
      loss: `loss(batch, preds) -> Float[Array, "batch"]`, the per-example training
        loss. Client training minimises its masked mean over a batch.
      metrics: `metrics(batch, preds)`, see `MetricFn`.
    """

    init: Callable[[PRNGKey], Params]
    apply: Callable[..., Array]
    loss: Callable[[Batch, Array], Array]
    metrics: MetricFn


def masked_mean_loss(model: Model, params: Params, batch: Batch, mask: Array,
                     key: PRNGKey | None, train: bool = True) -> Array:
    """Mean of the per-example loss over the examples where `mask` is True.

    `loss = sum_i mask_i * l_i / max(1, sum_i mask_i)`: a batch with no real example
    has loss 0 and gradient 0.

    Args:
      model: the model.
      params: its parameters.
      batch: features with a leading `[batch]` axis.
      mask: `Bool[Array, "batch"]`.
      key: dropout key, or None.
      train: whether to run the training path.

    Returns:
      A scalar.
    """
    preds = model.apply(params, batch, key=key, train=train)
    per_example = model.loss(batch, preds)
    m = mask.astype(per_example.dtype)
    return jnp.sum(per_example * m) / jnp.maximum(jnp.sum(m), 1.0)
