"""FedJAX's EMNIST convolutional network (1,206,590 parameters for 62 classes)."""

import jax

from fedjax_core.models import cpu_kernels, nn
from fedjax_core.models.base import Model
from fedjax_core.models.linear import classification_loss, classification_metrics
from fedjax_core.typing import Array, Batch, Params, PRNGKey


def emnist_cnn(num_classes: int = 62, conv_impl: nn.ConvImpl = "auto",
               kernels: nn.KernelChoice = "auto") -> Model:
    """The CNN of FedJAX's EMNIST task (Reddi et al., Adaptive Federated Optimization).

    `conv3x3(32) -> relu -> conv3x3(64) -> relu -> maxpool 2x2/2 -> dropout .25 ->
    flatten -> dense 128 -> relu -> dropout .5 -> dense num_classes`, VALID padding.

    Args:
      num_classes: number of classes `C` (62 for EMNIST-62).
      conv_impl: `"auto"`, `"native"`, `"lax"` or `"im2col"`, see `nn.conv2d`. `"auto"`
        uses the native oneDNN kernels on CPU when they are built (`kernels.native_conv`),
        else im2col for training on CPU (fast inside `lax.scan`), `lax.conv` otherwise.
      kernels: `"auto"` (the XLA:CPU kernels on a CPU backend, plain ones elsewhere),
        `"plain"` (`jnp.dot`, `jax.random.bernoulli`: forward mode such as `jax.jvp` /
        `jax.jacfwd` works too), `"cpu"`, or an `nn.Kernels`; see `nn.Kernels`.
        Chosen once, here.

    Returns:
      A `Model`; `batch['x']` is `Float[Array, "B 28 28 1"]`, `batch['y']` is
      `Int[Array, "B"]`, logits are `[B, C]`. Dropout runs only when `train=True`, which
      then needs `key`. Metrics: `{'loss': (ce, 1), 'accuracy': (correct, 1)}`.

    Example:
      >>> model = emnist_cnn()
      >>> params = model.init(jax.random.key(0))
      >>> logits = model.apply(params, {'x': x, 'y': y}, key=k, train=True)
      >>> plain = emnist_cnn(kernels="plain")  # for forward mode on the loss itself:
      >>> loss = lambda p: masked_mean_loss(plain, p, batch, mask, None, train=False)
      >>> directional = jax.jvp(loss, (params,), (v,))[1]

    References:
      Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
    """
    k = nn.resolve_kernels(kernels)
    # The first dense layer's input is pooled, then dropped out; with the CPU kernels its
    # weight gradient reads that input in place instead of a transposed copy that XLA:CPU
    # would recompute the dropout hash for (same bits, see cpu_kernels.matmul_fused_input).
    k_flat = (k._replace(matmul=cpu_kernels.matmul_fused_input)
              if k.matmul is cpu_kernels.matmul else k)

    def init(key: PRNGKey) -> Params:
        k1, k2, k3, k4 = jax.random.split(key, 4)
        return {
            "conv_0": nn.conv2d_init(k1, 1, 32, 3),
            "conv_1": nn.conv2d_init(k2, 32, 64, 3),
            "dense_0": nn.dense_init(k3, 12 * 12 * 64, 128),
            "dense_1": nn.dense_init(k4, 128, num_classes),
        }

    def apply(params: Params, batch: Batch, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        if train and key is None:
            raise ValueError("emnist_cnn: train=True needs a dropout key")
        k1, k2 = jax.random.split(key) if train and key is not None else (None, None)
        x = batch["x"]
        x = jax.nn.relu(nn.conv2d(params["conv_0"], x, impl=conv_impl, train=train, kernels=k))
        x = jax.nn.relu(nn.conv2d(params["conv_1"], x, impl=conv_impl, train=train, kernels=k))
        x = nn.max_pool(x, 2, 2)
        x = nn.dropout(x, 0.25, k1, train, kernels=k)
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(nn.dense(params["dense_0"], x, kernels=k_flat))
        x = nn.dropout(x, 0.5, k2, train, kernels=k)
        return nn.dense(params["dense_1"], x, kernels=k)

    return Model(init=init, apply=apply, loss=classification_loss,
                 metrics=classification_metrics)


__all__ = ["emnist_cnn"]
