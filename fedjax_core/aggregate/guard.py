"""Dropping clients whose updates are not finite (a diverging client must not poison the model)."""

import jax
import jax.numpy as jnp

from fedjax_core import tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.aggregate.mean import mean


def skip_nonfinite(inner: Aggregator | None = None) -> Aggregator:
    """Wraps `inner` so that clients with a NaN or infinite delta count as absent.

    Update rule: `ok_i = all(isfinite(Delta_i))`; the inner aggregator sees
    `Delta_i' = Delta_i if ok_i else 0` and `n_i' = n_i if ok_i else 0`, i.e. a client
    that diverged is treated like a padding client. Metric `train/nonfinite_clients`
    counts the real clients dropped this round.

    Args:
      inner: the aggregator to protect (default: the weighted mean).

    Returns:
      An `Aggregator` with the inner aggregator's state.

    Example:
      >>> alg = fedavg(optax.sgd(0.1), optax.sgd(1.0), aggregator=skip_nonfinite())
    """
    inner = inner or mean()

    def apply(deltas, weights, state, key=None, clients=None):
        leaves = jax.tree.leaves(deltas)
        ok = jnp.ones(weights.shape, bool)
        for x in leaves:
            ok &= jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
        clean = jax.tree.map(
            lambda x: jnp.where(tree.per_client(ok, x), x, jnp.zeros_like(x)),
            deltas)
        out, state, metrics = inner.apply(clean, jnp.where(ok, weights, 0.0), state, key, clients)
        dropped = jnp.sum((weights > 0) & ~ok).astype(jnp.float32)
        return out, state, {**metrics, "train/nonfinite_clients": dropped}

    return Aggregator(inner.init, apply, bits_per_client=inner.bits_per_client)
