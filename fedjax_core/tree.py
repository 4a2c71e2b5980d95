"""Pytree arithmetic used by clients, aggregators and servers.

All functions take pytrees of arrays with matching structure and return new ones.
"""

import jax
import jax.numpy as jnp

from fedjax_core.typing import Array, ArrayLike, PyTree


def add(a: PyTree, b: PyTree) -> PyTree:
    """`a + b`, leaf by leaf."""
    return jax.tree.map(jnp.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """`a - b`, leaf by leaf."""
    return jax.tree.map(jnp.subtract, a, b)


def scale(tree: PyTree, factor: ArrayLike) -> PyTree:
    """`factor * tree`, leaf by leaf."""
    return jax.tree.map(lambda x: x * jnp.asarray(factor, x.dtype), tree)


def zeros_like(tree: PyTree) -> PyTree:
    """A pytree of zeros shaped like `tree`."""
    return jax.tree.map(jnp.zeros_like, tree)


EXACT = jax.lax.Precision.HIGHEST
"""The precision of every dot in aggregation: exact float32 passes, whatever the user's
`jax_default_matmul_precision` (the default is TF32 on NVIDIA GPUs, one bf16 pass on TPUs;
XLA:CPU computes f32 either way). Model training keeps the user's precision."""


def weighted_sum(stacked: PyTree, weights: ArrayLike) -> PyTree:
    """`sum_i w_i x_i` over the leading axis of every leaf, in exact f32 (`EXACT`).

    Args:
      stacked: pytree whose leaves are `[n, ...]`.
      weights: `Float[Array, "n"]`.

    Returns:
      Pytree of leaves `[...]`.
    """
    w = jnp.asarray(weights)
    return jax.tree.map(lambda x: jnp.tensordot(w.astype(x.dtype), x, axes=1,
                                                     precision=EXACT), stacked)


def weighted_mean(stacked: PyTree, weights: ArrayLike) -> PyTree:
    """`sum_i w_i x_i / sum_i w_i` over the leading axis; 0 if all weights are 0.

    Args:
      stacked: pytree whose leaves are `[n, ...]`.
      weights: `Float[Array, "n"]`, non-negative.

    Returns:
      Pytree of leaves `[...]`.

    Example:
      >>> weighted_mean(jnp.array([[1.0], [3.0]]), jnp.array([1.0, 3.0]))
      Array([2.5], dtype=float32)
    """
    w = jnp.asarray(weights, jnp.float32)
    total = jnp.sum(w)
    w = w / jnp.where(total > 0, total, 1.0)
    return weighted_sum(stacked, w)


def l2_norm(tree: PyTree) -> Array:
    """`sqrt(sum of squares of every element)`, a scalar."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_factor(norm: ArrayLike, max_norm: ArrayLike) -> Array:
    """`min(1, max_norm / norm)` (elementwise; 1 for a zero norm): the scale that clips a
    vector of that norm to `max_norm`."""
    return jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))


def clip_by_norm(tree: PyTree, max_norm: ArrayLike) -> PyTree:
    """`tree * min(1, max_norm / ||tree||_2)`: scale down to L2 norm at most `max_norm`."""
    return scale(tree, clip_factor(l2_norm(tree), max_norm))


def per_client(values: ArrayLike, x: Array) -> Array:
    """`values` `[clients]` reshaped to broadcast against `x` `[clients, ...]`."""
    return jnp.asarray(values).reshape((-1,) + (1,) * (x.ndim - 1))


def client_norms(stacked: PyTree) -> Array:
    """`||tree_i||_2` of each client of a stacked pytree (`[clients, ...]` leaves), `[clients]`."""
    return jax.vmap(l2_norm)(stacked)


def num_params(tree: PyTree) -> int:
    """Total number of elements over all leaves (works on `jax.eval_shape` output)."""
    return int(sum(x.size for x in jax.tree.leaves(tree)))
