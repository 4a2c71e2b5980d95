"""Logistic regression and a multi-layer perceptron for flat classification tasks."""

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from fedjax_core.models import metrics as metrics_lib
from fedjax_core.models import nn
from fedjax_core.models.base import Model
from fedjax_core.typing import Array, Batch, Params, PRNGKey


def classification_loss(batch: Batch, logits: Array) -> Array:
    """Per-example softmax cross-entropy with integer labels `batch['y']`.

    Args:
      batch: with `'y'`: `Int[Array, "B"]`.
      logits: `Float[Array, "B C"]`.

    Returns:
      `Float[Array, "B"]`.
    """
    return metrics_lib.softmax_cross_entropy(logits, batch["y"])


def classification_metrics(batch: Batch, logits: Array) -> dict[str, tuple[Array, Array]]:
    """`{'loss': (ce, 1), 'accuracy': (correct, 1)}`, per example.

    Args:
      batch: with `'y'`: `Int[Array, "B"]`.
      logits: `Float[Array, "B C"]`.

    Returns:
      A dict of `(numerator[B], denominator[B])` pairs.
    """
    ce = metrics_lib.softmax_cross_entropy(logits, batch["y"])
    ones = jnp.ones_like(ce)
    return {"loss": (ce, ones), "accuracy": (metrics_lib.accuracy(logits, batch["y"]), ones)}


def _flatten(x: Array, dtype) -> Array:
    x = jnp.asarray(x)
    return x.reshape(x.shape[0], -1).astype(dtype)


def mlp(input_shape: Sequence[int], hidden: Sequence[int] = (200, 200), *,
        num_classes: int, kernels: nn.KernelChoice = "auto") -> Model:
    """A multi-layer perceptron on flattened inputs.

    `h_0 = flatten(x)`; `h_{k+1} = relu(dense_k(h_k))`; `logits = dense_out(h_K)`.

    Args:
      input_shape: shape of one example's `x`, e.g. `(28, 28, 1)`.
      hidden: widths of the hidden layers; `()` gives logistic regression.
      num_classes: number of classes `C`.
      kernels: `"auto"` (the XLA:CPU kernels on a CPU backend, plain ones elsewhere),
        `"plain"` (`jnp.dot`, `jax.random.bernoulli`: forward mode such as `jax.jvp` /
        `jax.jacfwd` works too), `"cpu"`, or an `nn.Kernels`; see `nn.Kernels`.
        Chosen once, here.

    Returns:
      A `Model`; `apply` maps `x: Float[Array, "B *input_shape"]` to logits `[B, C]`,
      `batch['y']` is `Int[Array, "B"]`.

    Example:
      >>> model = mlp((28, 28, 1), num_classes=62)
      >>> params = model.init(jax.random.key(0))
    """
    if isinstance(hidden, int):
        raise TypeError("hidden must be a sequence of widths; pass num_classes= by keyword")
    widths = [math.prod(input_shape), *hidden, num_classes]
    names = [f"dense_{i}" for i in range(len(widths) - 1)]
    k = nn.resolve_kernels(kernels)

    def init(key: PRNGKey) -> Params:
        keys = jax.random.split(key, len(names))
        return {name: nn.dense_init(k, a, b)
                for name, k, a, b in zip(names, keys, widths[:-1], widths[1:])}

    def apply(params: Params, batch: Batch, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        del key, train
        h = _flatten(batch["x"], params[names[0]]["w"].dtype)
        for name in names[:-1]:
            h = jax.nn.relu(nn.dense(params[name], h, kernels=k))
        return nn.dense(params[names[-1]], h, kernels=k)

    return Model(init=init, apply=apply, loss=classification_loss,
                 metrics=classification_metrics)


def logistic_regression(input_shape: Sequence[int], num_classes: int, *,
                        kernels: nn.KernelChoice = "auto") -> Model:
    """Multinomial logistic regression on flattened inputs.

    `logits = flatten(x) @ w + b`.

    Args:
      input_shape: shape of one example's `x`, e.g. `(28, 28, 1)`.
      num_classes: number of classes `C`.
      kernels: see `mlp`.

    Returns:
      A `Model` (params `{'dense_0': {'w', 'b'}}`); see `mlp`.

    Example:
      >>> model = logistic_regression((28, 28, 1), 62)  # 48,670 parameters
    """
    return mlp(input_shape, (), num_classes=num_classes, kernels=kernels)


__all__ = ["classification_loss", "classification_metrics", "logistic_regression", "mlp"]
