"""Array type aliases shared by every kernel.

Shapes are written in jaxtyping notation. A cohort is a stack of clients, each a
stack of steps, each a batch of examples: `[clients, steps, batch, ...]`.
"""

from typing import Any

from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

Params = PyTree[Float[Array, "..."]]
"""Model parameters: any pytree of float arrays."""

Batch = dict[str, Array]
"""One batch of examples: feature name -> array with a leading `batch` axis."""

Mask = Bool[Array, "clients steps batch"]
"""True where a slot of a packed cohort holds a real example."""

ClientWeights = Float[Array, "clients"]
"""Aggregation weight of each client of a cohort (its number of examples)."""

PRNGKey = PRNGKeyArray
"""A typed key from `jax.random.key`."""

Metrics = dict[str, Array]
"""Scalar metrics by name."""

State = Any
"""Algorithm or aggregator state: a NamedTuple of arrays."""

__all__ = [
    "Array",
    "ArrayLike",
    "Batch",
    "Bool",
    "ClientWeights",
    "Float",
    "Int",
    "Mask",
    "Metrics",
    "Params",
    "PRNGKey",
    "PyTree",
    "State",
]
