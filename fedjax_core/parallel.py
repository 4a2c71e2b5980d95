"""Running a one-client kernel over a whole cohort: the only place that maps over clients.

A cohort of C clients is cut into chunks of `chunk_size`. Chunks run one after another
(`lax.map`), the clients of a chunk together (`vmap`), so memory grows with the chunk,
not the cohort, and the whole round stays one jitted call.

Which chunk size is fastest depends on the model and the machine (see
`docs/performance.md`). On XLA:CPU, `chunk_size=1` runs each client's step loop to its
own length (no padded steps are computed) and suits convolutional and LSTM models;
small dense models gain from larger chunks.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_core.typing import PyTree


class Plan(NamedTuple):
    """How a cohort is executed. Hashable, so it can be a static argument of `jit`.

    Attributes:
      chunk_size: clients trained together under `vmap`; 1 runs them one by one.
    """

    chunk_size: int = 1


def _leading_size(tree: PyTree) -> int:
    sizes = {x.shape[0] for x in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"client inputs disagree on the number of clients: {sorted(sizes)}")
    return sizes.pop()


def map_clients(fn: Callable[[PyTree], PyTree], inputs: PyTree, plan: Plan = Plan()) -> PyTree:
    """Applies the one-client `fn` to every client of `inputs` and stacks the results.

    `out[i] = fn(inputs[i])` for each client i. The result does not depend on
    `plan.chunk_size`, up to floating-point reassociation inside `vmap`.

    Args:
      fn: maps one client's inputs (leaves without the `clients` axis) to a pytree.
      inputs: pytree whose leaves are `[clients, ...]`. When the cohort is not a
        multiple of the chunk size it is padded with zero-filled clients, whose
        outputs are dropped; `fn` must accept an all-zero input (an all-False mask).
      plan: execution plan.

    Returns:
      Pytree of `[clients, ...]` leaves.

    Example:
      >>> out = map_clients(lambda c: c["x"].sum(), {"x": jnp.ones((5, 3))}, Plan(chunk_size=2))
      >>> out
      Array([3., 3., 3., 3., 3.], dtype=float32)
    """
    if plan.chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {plan.chunk_size}")
    n = _leading_size(inputs)
    c = min(plan.chunk_size, n)
    if c == 1:
        return jax.lax.map(fn, inputs)
    chunks = -(-n // c)
    pad = chunks * c - n

    def split(x):
        if pad:
            x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
        return x.reshape((chunks, c) + x.shape[1:])

    out = jax.lax.map(jax.vmap(fn), jax.tree.map(split, inputs))
    return jax.tree.map(lambda y: y.reshape((chunks * c,) + y.shape[2:])[:n], out)
