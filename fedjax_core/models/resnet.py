"""CIFAR-100 models: ResNet-18 with group norm (Reddi et al. 2021 / TFF), logistic regression.

FedJAX ships no CIFAR-100 ResNet (only `create_logistic_model`, on 24x24x3 inputs,
172,900 parameters). The ResNet here is the one of Reddi et al., "Adaptive Federated
Optimization" (code: google-research/federated `utils/models/resnet_models.py`; the same
network is TFF's `tff.simulation.baselines.cifar100.resnet_models.create_resnet18`): a
ResNet v2 (pre-activation, He et al. 2016) whose batch norms are group norms with 2 groups.

    stem     conv 7x7/2 (64) -> GN -> ReLU -> max pool 3x3/2          ('SAME' padding)
    stages   filters 64, 128, 256, 512; 2 basic blocks each; stride 1 in every stage
             (the reference passes no stage strides, so a 24x24 input is 12x12 after the
             stem conv and 6x6 from the max pool to the end)
    block    [GN -> ReLU ->] conv 3x3 -> GN -> ReLU -> conv 3x3, plus the shortcut: identity,
             or conv 1x1 -> GN when the channels change; the very first block of the network
             has no GN/ReLU before its first conv
    head     GN -> ReLU -> global average pool -> dense(num_classes)

Convolutions have no bias; their kernels are He-normal (truncated normal, variance
`2 / fan_in`); the dense kernel is `N(0, 0.01^2)`, its bias 0. GN: 2 groups, epsilon 1e-3,
population variance; with `affine=True` (tfa's `GroupNormalization`, used by Reddi et
al.) a per-channel scale (init 1) and offset (init 0); TFF's later baselines use a GN
without them (`affine=False`). Parameters for 100 classes: 11,227,812 with affine GN,
11,218,212 without (the 9,600 GN scales and offsets); any input size (global pooling).

Left out on purpose: the reference's L2 regulariser (1e-4 on every kernel and the dense
bias, added to the Keras loss); use weight decay in the client optimizer if wanted.
The reference's dense layer ends in a softmax and trains on probabilities; this model
returns logits and uses softmax cross-entropy, the same loss.

Convolutions go through `nn.conv2d` with 'SAME' padding (`conv_impl="auto"`: the native
oneDNN kernels on CPU when built, else im2col for training on CPU, `lax.conv` otherwise). The
im2col products and the dense layer multiply with the model's `nn.Kernels`
(`kernels="auto"`: the XLA:CPU kernels on a CPU backend).
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_core.models import linear, nn
from fedjax_core.models.base import Model
from fedjax_core.models.linear import classification_loss, classification_metrics
from fedjax_core.models.native.conv import explicit_padding
from fedjax_core.typing import Array, ArrayLike, Batch, Float, Params, PRNGKey

GROUPS = 2
"""Group norm groups in Reddi et al. 2021 and TFF."""
EPSILON = 1e-3
"""Group norm epsilon (tfa / TFF `GroupNormalization` default)."""


# ------------------------------------------------------------------------ layers


def he_normal_conv_init(key: PRNGKey, in_channels: int, out_channels: int,
                        kernel_size: int) -> Array:
    """Keras' `he_normal` kernel: truncated normal (at 2 std) with variance `2 / fan_in`.

    Args:
      key: PRNG key.
      in_channels: `C`.
      out_channels: `O`.
      kernel_size: `k`.

    Returns:
      `Float[Array, "k k C O"]` (HWIO).
    """
    fan_in = kernel_size * kernel_size * in_channels
    stddev = math.sqrt(2.0 / fan_in) / nn.TRUNCATED_NORMAL_STDDEV
    return stddev * jax.random.truncated_normal(
        key, -2.0, 2.0, (kernel_size, kernel_size, in_channels, out_channels), jnp.float32)


def conv_same(w: Array, x: Float[ArrayLike, "B H W C"], stride: int = 1, *,
              impl: nn.ConvImpl = "auto", train: bool = False,
              kernels: nn.Kernels | None = None) -> Float[Array, "B Ho Wo O"]:
    """A bias-free convolution with TensorFlow's 'SAME' padding, through `nn.conv2d`.

    `y = conv_valid(zero_pad(x), w)`, pads `((out - 1) * stride + k - size)` split with the
    extra pixel after; `Ho = ceil(H / stride)` (`nn.conv2d(padding="SAME")`).

    Args:
      w: `Float[Array, "k k C O"]`.
      x: `Float[Array, "B H W C"]`.
      stride: the same in both spatial axes.
      impl: see `nn.conv2d`.
      train: whether this is a training pass (for `impl="auto"`).
      kernels: the model's `nn.Kernels`; None for `nn.Kernels.plain()`.

    Returns:
      `Float[Array, "B Ho Wo O"]`.
    """
    zero_bias = jnp.zeros((), w.dtype)
    return nn.conv2d({"w": w, "b": zero_bias}, x, impl=impl, train=train,
                     strides=(stride, stride), padding="SAME", kernels=kernels)


def max_pool_same(x: Float[ArrayLike, "B H W C"], window: int = 3,
                  stride: int = 2) -> Float[Array, "B Ho Wo C"]:
    """Max pooling with TensorFlow's 'SAME' padding (padded cells never win).

    `y[b, i, j, c] = max_{di, dj < window} xp[b, i*stride + di, j*stride + dj, c]`, `xp` = x
    padded with -inf. Written as a max over `window**2` strided slices, whose gradient is
    cheap inside XLA:CPU loops.

    Args:
      x: `Float[Array, "B H W C"]`.
      window: window height and width.
      stride: stride in both spatial axes.

    Returns:
      `Float[Array, "B Ho Wo C"]`, `Ho = ceil(H / stride)`.
    """
    x = jnp.asarray(x)
    b, h, w, c = x.shape
    ph, pw = explicit_padding("SAME", (h, w), (window, window), (stride, stride))
    xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)), constant_values=-jnp.inf)
    ho, wo = -(-h // stride), -(-w // stride)
    out = None
    for i in range(window):
        for j in range(window):
            s = lax.slice(xp, (0, i, j, 0),
                          (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                          (1, stride, stride, 1))
            out = s if out is None else jnp.maximum(out, s)
    assert out is not None  # window >= 1
    return out


def group_norm_init(channels: int, affine: bool = True) -> dict[str, Array]:
    """Group norm parameters: `{'scale': 1[C], 'offset': 0[C]}`, or `{}` without affine."""
    if not affine:
        return {}
    return {"scale": jnp.ones((channels,), jnp.float32),
            "offset": jnp.zeros((channels,), jnp.float32)}


def group_norm(params: dict[str, Array], x: Float[ArrayLike, "B H W C"], groups: int = GROUPS,
               epsilon: float = EPSILON) -> Float[Array, "B H W C"]:
    """Group normalisation over NHWC, as tfa's / TFF's `GroupNormalization(axis=3)`.

    Channels split into `groups` contiguous groups; per example and group,
    `y = (x - mean) / sqrt(var + epsilon)` over (H, W, channels of the group), population
    variance; then `y * scale + offset` per channel when `params` has them. The statistics
    are computed in float32 for a bfloat16 `x` (mixed precision), the result in `x`'s dtype.

    Args:
      params: from `group_norm_init`.
      x: `Float[Array, "B H W C"]`, `C` divisible by `groups`.
      groups: number of groups.
      epsilon: added to the variance.

    Returns:
      `Float[Array, "B H W C"]`.
    """
    x = jnp.asarray(x)
    b, h, w, c = x.shape
    if c % groups:
        raise ValueError(f"group_norm: {c} channels are not divisible by {groups} groups")
    # Statistics in f32 at least (bfloat16's 8-bit mantissa loses the variance of
    # near-equal values); the result in x's dtype. A no-op for f32 inputs.
    g = x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(b, h, w, groups, c // groups)
    mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) * lax.rsqrt(var + epsilon)).reshape(b, h, w, c)
    if "scale" in params:
        y = y * params["scale"] + params["offset"]
    return y.astype(x.dtype)


# ------------------------------------------------------------------------- model


def resnet(num_classes: int = 100, repetitions: Sequence[int] = (2, 2, 2, 2),
           initial_filters: int = 64, groups: int = GROUPS, affine: bool = True,
           in_channels: int = 3, conv_impl: nn.ConvImpl = "auto",
           kernels: nn.KernelChoice = "auto") -> Model:
    """A ResNet v2 with basic blocks and group norm, in the layout of Reddi et al. / TFF.

    See the module docstring for the layers. `resnet18` is `repetitions=(2, 2, 2, 2)`,
    `initial_filters=64`; smaller `initial_filters` give a thin network of the same layout
    (handy in tests).

    Args:
      num_classes: number of classes `K`.
      repetitions: basic blocks per stage; stage `s` has `initial_filters * 2**s` filters.
      initial_filters: filters of the stem and the first stage.
      groups: group norm groups (must divide `initial_filters`).
      affine: group norms with a learned per-channel scale and offset.
      in_channels: input channels.
      conv_impl: `"auto"`, `"native"`, `"lax"` or `"im2col"`, see `nn.conv2d`.
      kernels: `"auto"` (the XLA:CPU kernels on a CPU backend, plain ones elsewhere),
        `"plain"` (`jnp.dot`, `jax.random.bernoulli`: forward mode such as `jax.jvp` /
        `jax.jacfwd` works too), `"cpu"`, or an `nn.Kernels`; see `nn.Kernels`.
        Chosen once, here.

    Returns:
      A `Model`; `batch['x']` is `Float[Array, "B H W in_channels"]`, `batch['y']` is
      `Int[Array, "B"]`, logits `[B, K]`. Metrics: `{'loss': (ce, 1), 'accuracy': (correct, 1)}`.
    """
    stages = [(initial_filters * 2**s, int(r)) for s, r in enumerate(repetitions)]
    if any(r < 1 for _, r in stages) or not stages:
        raise ValueError(f"repetitions must be positive, got {tuple(repetitions)}")
    kern = nn.resolve_kernels(kernels)

    def init(key: PRNGKey) -> Params:
        keys = iter(jax.random.split(key, 2 + 3 * sum(r for _, r in stages)))
        params: dict = {"stem": {"conv": he_normal_conv_init(next(keys), in_channels,
                                                             initial_filters, 7),
                                 "norm": group_norm_init(initial_filters, affine)}}
        channels = initial_filters
        for s, (filters, reps) in enumerate(stages):
            for r in range(reps):
                block: dict = {}
                if not (s == 0 and r == 0):
                    block["norm_0"] = group_norm_init(channels, affine)
                block["conv_0"] = he_normal_conv_init(next(keys), channels, filters, 3)
                block["norm_1"] = group_norm_init(filters, affine)
                block["conv_1"] = he_normal_conv_init(next(keys), filters, filters, 3)
                if channels != filters:
                    block["shortcut_conv"] = he_normal_conv_init(next(keys), channels, filters, 1)
                    block["shortcut_norm"] = group_norm_init(filters, affine)
                params[f"stage_{s}_block_{r}"] = block
                channels = filters
        params["final_norm"] = group_norm_init(channels, affine)
        params["dense"] = {
            "w": 0.01 * jax.random.normal(next(keys), (channels, num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}
        return params

    def apply(params: Params, batch: Batch, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        del key

        def conv(w, x, stride=1):
            return conv_same(w, x, stride, impl=conv_impl, train=train, kernels=kern)

        def norm_relu(p, x):
            return jax.nn.relu(group_norm(p, x, groups))

        x = jnp.asarray(batch["x"], params["stem"]["conv"].dtype)  # f32, or a policy's
        x = norm_relu(params["stem"]["norm"], conv(params["stem"]["conv"], x, 2))
        x = max_pool_same(x, 3, 2)
        for s, (_, reps) in enumerate(stages):
            for r in range(reps):
                p = params[f"stage_{s}_block_{r}"]
                h = x if "norm_0" not in p else norm_relu(p["norm_0"], x)
                h = conv(p["conv_0"], h)
                h = conv(p["conv_1"], norm_relu(p["norm_1"], h))
                shortcut = x
                if "shortcut_conv" in p:
                    shortcut = group_norm(p["shortcut_norm"], conv(p["shortcut_conv"], x),
                                          groups)
                x = shortcut + h
        x = norm_relu(params["final_norm"], x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.dense(params["dense"], x, kernels=kern)

    return Model(init=init, apply=apply, loss=classification_loss,
                 metrics=classification_metrics)


def resnet18(num_classes: int = 100, groups: int = GROUPS, affine: bool = True,
             conv_impl: nn.ConvImpl = "auto", kernels: nn.KernelChoice = "auto") -> Model:
    """ResNet-18 with group norm for CIFAR-100 (Reddi et al. 2021): 11,227,812 parameters.

    `resnet(num_classes, (2, 2, 2, 2), 64, groups, affine, 3, conv_impl, kernels)`; 11,218,212
    parameters with `affine=False` (TFF's later GN). Inputs are TFF's standardised 24x24
    crops (`fedjax_core.data.cifar100.preprocess_train` / `preprocess_eval`); 32x32 inputs
    work too.

    Example:
      >>> model = resnet18()
      >>> logits = model.apply(model.init(jax.random.key(0)), {'x': x})  # x: [B, 24, 24, 3]

    References:
      Reddi et al., "Adaptive Federated Optimization", ICLR 2021; He et al., "Identity
      Mappings in Deep Residual Networks", 2016; Wu & He, "Group Normalization", 2018;
      Hsieh et al., "The Non-IID Data Quagmire of Decentralized Machine Learning", 2020.
    """
    return resnet(num_classes, (2, 2, 2, 2), 64, groups, affine, 3, conv_impl, kernels)


def cifar100_logistic(input_shape: Sequence[int] = (24, 24, 3), num_classes: int = 100, *,
                      kernels: nn.KernelChoice = "auto") -> Model:
    """FedJAX's CIFAR-100 logistic regression: 172,900 parameters on 24x24x3 crops.

    `linear.logistic_regression(input_shape, num_classes)`; FedJAX's
    `models/cifar100.create_logistic_model` is built on 24x24x3 (TFF's crops), 307,300
    parameters on full 32x32x3 images.
    """
    return linear.logistic_regression(input_shape, num_classes, kernels=kernels)


__all__ = ["EPSILON", "GROUPS", "cifar100_logistic", "conv_same", "group_norm",
           "group_norm_init", "he_normal_conv_init", "max_pool_same", "resnet", "resnet18"]
