"""XLA:CPU kernels for `nn`'s layers: a matmul with a fast weight gradient, a fused dropout mask.

Two operations of the task models are slow on XLA:CPU when written the plain way; this
module holds their rewrites, with the same values:

| kernel | replaces | why (measured in docs/performance.md) |
| --- | --- | --- |
| `matmul(x, w)` | `jnp.dot(x, w)` | autodiff's `X^T dY` goes to Eigen: half YNNPACK's speed |
| `matmul_fused_input(x, w)` | `matmul` behind dropout / pooling | `matmul`'s `X^T` would recompute them |
| `bernoulli(key, p, shape)` | `jax.random.bernoulli` | Threefry is a rolled loop on CPU; unrolled, it fuses |

The layers in `nn` never pick these by themselves: a model chooses them when it is built,
through an `nn.Kernels` record (`nn.Kernels.cpu()`, or `kernels="auto"` on a CPU backend).
`matmul` has a custom VJP. A model built with it supports reverse mode, `vmap`, and
second derivatives through its gradient: reverse-over-reverse, and forward-over-reverse
(`jax.hessian`, a Hessian-vector product `jax.jvp(jax.grad(f), ...)`), which differentiate
the hand-written backward pass. Forward mode on the function itself (`jax.jvp(f, ...)`,
`jax.jacfwd(f)`, `jax.linearize(f, ...)`) raises JAX's `TypeError: can't apply
forward-mode autodiff (jvp) to a custom_vjp function`; build the model with
`kernels="plain"` for those.

Example:
  >>> from fedjax_core.models import cpu_kernels, nn
  >>> from fedjax_core.models.emnist_cnn import emnist_cnn
  >>> y = cpu_kernels.matmul(jnp.ones((4, 3)), jnp.ones((3, 2)))  # == jnp.dot, fast gradient
  >>> model = emnist_cnn(kernels=nn.Kernels.cpu())                # what "auto" picks on CPU
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedjax_core.typing import Array, ArrayLike, Bool, Float, PRNGKey

# ------------------------------------------------------------------------- matmul


def matmul(x: Float[ArrayLike, "... K"], w: Float[ArrayLike, "K O"]) -> Float[Array, "... O"]:
    """`x @ w` over the last axis of `x`, with a weight gradient XLA:CPU runs fast.

    `y = x @ w`, as `jnp.dot`. Autodiff of `jnp.dot(x, w)` computes `dW = X^T dY` (`X` =
    `x` with its leading axes flattened), a dot that contracts the leading axis of both
    operands; XLA:CPU hands that to Eigen at about half the speed of its YNNPACK dot
    (EMNIST CNN conv2: 4.1 vs 2.1 ms at batch 20; vmapped small MLPs lose more). This
    function's VJP computes `dW^T = dY^T X` with `dY^T` materialised (or `dW = (X^T) dY`
    with `X^T` materialised when `X` has few rows), and optimisation barriers keep XLA
    from folding the transposes back. Values equal `jnp.dot` up to float summation order,
    on every backend. Reverse mode, vmap, reverse-over-reverse and forward-over-reverse
    (`jax.hessian`) work; forward mode on it directly (`jax.jvp`, `jax.jacfwd`,
    `jax.linearize`) raises a `TypeError`: use `jnp.dot` (`nn.Kernels.plain()`) for it.

    Args:
      x: `Float[Array, "... K"]`.
      w: `Float[Array, "K O"]`.

    Returns:
      `Float[Array, "... O"]`.

    Example:
      >>> matmul(jnp.ones((4, 5, 3)), jnp.ones((3, 2))).shape
      (4, 5, 2)
    """
    return _matmul(False, jnp.asarray(x), jnp.asarray(w))


def matmul_fused_input(x: Float[ArrayLike, "... K"],
                       w: Float[ArrayLike, "K O"]) -> Float[Array, "... O"]:
    """`matmul` for an `x` made by a costly elementwise chain (dropout's hash, pooling).

    `y = x @ w`, with `matmul`'s values and its gradients up to float summation order (the
    same bits at the EMNIST CNN's 20 rows). Where `matmul` materialises `X^T` for the
    weight gradient (`X` with few rows), XLA:CPU fuses that transpose with the ops that
    produce `x` and recomputes them, in a transposed order that does not vectorise; here
    `dW = X^T dY` is one dot that reads `X` where it lies (Eigen's). The EMNIST CNN's first
    dense layer (its input is max-pooled, then dropped out: 184K Threefry hashes) uses it:
    training steps 4-6% faster with the native convolutions (medians of interleaved runs
    in one process, e.g. 9.97 against 10.42 ms). Behind a cheap producer (a relu) `matmul`
    is faster: 1.04 against 1.26 ms per step of a `[20, 9216] x [9216, 128]` layer.
    float32 only; other dtypes take `matmul`'s path.

    Args:
      x: `Float[Array, "... K"]`.
      w: `Float[Array, "K O"]`.

    Returns:
      `Float[Array, "... O"]`.

    Example:
      >>> matmul_fused_input(jnp.ones((20, 9216)), jnp.ones((9216, 128))).shape
      (20, 128)
    """
    return _matmul(True, jnp.asarray(x), jnp.asarray(w))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul(x_in_place: bool, x: Array, w: Array) -> Array:
    return jnp.dot(x, w)


def _matmul_fwd(x_in_place, x, w):
    return jnp.dot(x, w), (x, w)


def _matmul_bwd(x_in_place, residuals, dy):
    x, w = residuals
    k, o = w.shape
    # The barriers stop XLA from folding the transposes back into the dot, which would
    # bring back the leading-axis contraction.
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, o)
    n = x2.shape[0]
    if n * o + k * o <= n * k:
        # dW^T = dY^T X, then a transpose of the small [O, K] result.
        dy_t = lax.optimization_barrier(dy2.T)
        dw = lax.optimization_barrier(jnp.dot(dy_t, x2)).T
    elif x_in_place and x2.dtype == jnp.float32:
        # dW = X^T dY contracting X's rows where X lies (see matmul_fused_input; measured
        # in f32 only: in bf16 the EMNIST CNN step was no faster).
        dw = lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())))
    else:
        # dW = (X^T) dY with X^T materialised: cheaper when X has few rows.
        dw = jnp.dot(lax.optimization_barrier(x2.T), dy2)
    # Cotangents in their primal's dtype (no-ops unless x and w differ, e.g. bf16 and f32).
    return jnp.dot(dy, w.T).astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ---------------------------------------------------------------------- bernoulli


def bernoulli(key: PRNGKey, p: float, shape: tuple[int, ...]) -> Bool[Array, "..."]:
    """`jax.random.bernoulli(key, p, shape)`, bit for bit, as one fused elementwise pass.

    `mask = (hi ^ lo) >> 9 < ceil(float32(p) * 2^23)`, `(hi, lo) = threefry2x32(key,
    (0, i))` for the flat index `i` of each element: JAX's own bits with
    `jax_threefry_partitionable`. On CPU, JAX lowers Threefry as a rolled 5-iteration loop
    that copies its state arrays every iteration; for the EMNIST CNN's dropout masks that
    is ~1 ms of a ~15 ms training step. Here the 20 rounds are written out, so XLA fuses
    them with the comparison. Falls back to `jax.random.bernoulli` itself for other key
    implementations, batched keys, 64-bit mode, the non-partitionable bit layout and
    shapes of `2**32` elements or more.

    Args:
      key: a PRNG key (typed `jax.random.key` or raw `uint32[2]`).
      p: probability of True, a Python float in `[0, 1]`.
      shape: the mask's shape.

    Returns:
      `Bool[Array, "*shape"]`, equal to `jax.random.bernoulli(key, p, shape)`.

    Example:
      >>> key = jax.random.key(0)
      >>> bool(jnp.all(bernoulli(key, 0.5, (8,)) == jax.random.bernoulli(key, 0.5, (8,))))
      True
    """
    shape = tuple(shape)
    size = math.prod(shape)
    key_data = _threefry_key_data(key)
    if key_data is None or size >= 2**32:
        return jax.random.bernoulli(key, p, shape)
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    counts = sum((lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(s)
                  for d, s in enumerate(strides)), jnp.zeros(shape, jnp.uint32))
    hi, lo = threefry2x32(key_data[..., 0], key_data[..., 1],
                          jnp.zeros(shape, jnp.uint32), counts)
    # jax.random.uniform keeps the top 23 bits as the mantissa m: u = m / 2^23, and
    # bernoulli is u < float32(p), i.e. m < ceil(float32(p) * 2^23).
    threshold = math.ceil(float(np.float32(p)) * 2**23)
    return ((hi ^ lo) >> jnp.uint32(9)) < jnp.uint32(threshold)


def _threefry_key_data(key) -> Array | None:
    """The `uint32[2]` data of a Threefry key whose bits `bernoulli` can reproduce, else None."""
    config = jax.config.values
    if config["jax_enable_x64"] or not config["jax_threefry_partitionable"]:
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32" or key.shape != ():
            return None
        return jax.random.key_data(key)
    if config["jax_default_prng_impl"] != "threefry2x32" or key.shape != (2,):
        return None
    return jnp.asarray(key, jnp.uint32)


def threefry2x32(k1: ArrayLike, k2: ArrayLike, x1: ArrayLike,
                 x2: ArrayLike) -> tuple[Array, Array]:
    """Threefry-2x32 with 20 rounds, unrolled: the hash JAX's `threefry2x32` primitive computes.

    Key schedule `ks = (k1, k2, k1 ^ k2 ^ 0x1BD11BDA)`; five groups of four rounds
    `x1 += x2; x2 = rotl(x2, r) ^ x1` with rotations (13, 15, 26, 6), (17, 29, 16, 24)
    alternating; after group `i`, `x1 += ks[(i+1) % 3]`, `x2 += ks[(i+2) % 3] + i + 1`.

    Args:
      k1: `uint32` key word 0 (broadcasts against the counters).
      k2: `uint32` key word 1.
      x1: `UInt32[Array, "..."]` counter word 0.
      x2: `UInt32[Array, "..."]` counter word 1, same shape.

    Returns:
      `(y1, y2)`, two `uint32` arrays of the counters' shape.

    Example:
      >>> u32 = lambda v: jnp.asarray(v, jnp.uint32)
      >>> [hex(int(v)) for v in threefry2x32(u32(0), u32(0), u32(0), u32(0))]
      ['0x6b200159', '0x99ba4efe']

    References:
      Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3",
      SC 2011 (Random123's known-answer vectors).
    """
    k1, k2, x1, x2 = (jnp.asarray(v, jnp.uint32) for v in (k1, k2, x1, x2))
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ ((x2 << jnp.uint32(r)) | (x2 >> jnp.uint32(32 - r)))
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return jnp.asarray(x1), jnp.asarray(x2)


__all__ = ["bernoulli", "matmul", "matmul_fused_input", "threefry2x32"]
