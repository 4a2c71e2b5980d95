"""Example-weighted mean of client deltas."""

import jax
import jax.numpy as jnp
import optax

from fedjax_core import tree
from fedjax_core.aggregate.base import Aggregator, Stream


def mean() -> Aggregator:
    """The weighted mean `Delta = sum_i n_i Delta_i / sum_i n_i`.

    Clients with weight 0 (padding) do not count; an all-zero cohort gives 0.

    Returns:
      A stateless `Aggregator` that streams: each client adds `(n_i Delta_i, n_i)` to a
      running sum, so a round's memory does not grow with the cohort.

    Example:
      >>> agg = mean()
      >>> delta, _, _ = agg.apply(stacked_deltas, jnp.array([10.0, 30.0]), agg.init(params),
      ...                         key, None)

    References:
      McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
      Decentralized Data" (Algorithm 1, weights n_k / n).
    """

    def init(params):
        del params
        return optax.EmptyState()

    def apply(deltas, weights, state, key=None, clients=None):
        del key, clients
        return tree.weighted_mean(deltas, weights), state, {}

    def contribution(delta, weight):
        return jax.tree.map(lambda d: weight * d, delta), weight

    def finalize(total, params, state, key=None):
        del key
        weighted, weight = total
        divisor = jnp.where(weight > 0, weight, 1.0)
        return (jax.tree.map(lambda t, p: (t / divisor).astype(p.dtype), weighted, params),
                state, {})

    return Aggregator(init, apply, Stream(contribution, finalize))
