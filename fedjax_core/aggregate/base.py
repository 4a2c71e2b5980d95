"""The `Aggregator` record: how the server combines the clients' updates."""

from typing import Callable, NamedTuple

import jax.numpy as jnp

from fedjax_core.typing import Array, Params, State


class Aggregator(NamedTuple):
    """Combines a cohort's stacked deltas into one, possibly with state across rounds.

    Attributes:
      init: `init(params) -> state`.
      apply: `apply(deltas, weights, state, key, clients) -> (aggregate, state, metrics)`
        with `deltas` a pytree of `[clients, ...]` leaves, `weights` `[clients]` (0 for
        clients that must not count, e.g. padding), `key` a PRNG key for randomised
        aggregators, `clients` the cohort's `ClientSlots` (for per-client state; None
        when the algorithm keeps none), `aggregate` shaped like the params and
        `metrics` a dict of scalars (e.g. `aggregate/bits_per_client`).
      weighted_mean: True when `apply` is exactly `(sum_i w_i Delta_i / sum_i w_i, state,
        {})` (0 when all weights are 0): algorithms may then add the weighted deltas up
        chunk by chunk (`parallel.sum_clients`) instead of stacking them, which keeps a
        round's memory independent of the cohort size.
    """

    init: Callable[[Params], State]
    apply: Callable[..., tuple[Params, State, dict]]
    weighted_mean: bool = False


def real_clients(weights) -> tuple[Array, Array]:
    """`(is_real [clients] bool, m int32 scalar)`: the slots holding real clients (weight
    > 0; padding clients have weight 0) and how many there are."""
    real = jnp.asarray(weights) > 0
    return real, jnp.sum(real.astype(jnp.int32))


class AggregatorEntry(NamedTuple):
    """A registered aggregator: `build(**options) -> Aggregator`, listed by `fedjax algorithms`.

    Attributes:
      name: registry key (`--aggregator NAME`).
      description: one line.
      build: makes the aggregator; every option has a default.
      paper: the reference.
    """

    name: str
    description: str
    build: Callable[..., Aggregator]
    paper: str
