"""The `Aggregator` record: how the server combines the clients' updates."""

from typing import Callable, NamedTuple

import jax.numpy as jnp

from fedjax_core.typing import Array, Params, PyTree, State


class Stream(NamedTuple):
    """How an aggregator adds clients up one at a time, so that a round never holds
    every client's delta (its memory does not grow with the cohort).

    Attributes:
      contribution: `contribution(delta, weight) -> addend`, one client's part (a pytree
        of arrays); the round sums the real clients' addends chunk by chunk.
      finalize: `finalize(total, params, state, key) -> (aggregate, state, metrics)`,
        from the summed addends (`params` gives the aggregate's structure and dtypes).
    """

    contribution: Callable[[Params, Array], PyTree]
    finalize: Callable[..., tuple[Params, State, dict]]


class Aggregator(NamedTuple):
    """Combines a cohort's deltas into one, possibly with state across rounds.

    Attributes:
      init: `init(params) -> state`.
      apply: `apply(deltas, weights, state, key, clients) -> (aggregate, state, metrics)`
        with `deltas` a pytree of `[clients, ...]` leaves, `weights` `[clients]` (0 for
        clients that must not count, e.g. padding), `key` a PRNG key for randomised
        aggregators, `clients` the cohort's `ClientSlots` (for per-client state; None
        when the state keeps none), `aggregate` shaped like the params and `metrics` a
        dict of scalars (e.g. `aggregate/bits_per_client`).
      stream: how to accumulate clients one at a time and finalize (`Stream`), when the
        aggregator can (a mean, a clipped sum); the round skeleton then streams the
        deltas and never stacks them. None: the aggregator needs every delta at once
        (median, Krum, trimmed mean, ...), and the skeleton stacks them for `apply`.
        Both must give the same aggregate.
      bits_per_client: `bits_per_client(d) -> int`, the bits one client uploads for a
        model of d parameters (a compression aggregator's message size; what the
        simulated clock charges for the upload, `fedjax_core.simtime`); None: full
        precision, `32 d`.
    """

    init: Callable[[Params], State]
    apply: Callable[..., tuple[Params, State, dict]]
    stream: Stream | None = None
    bits_per_client: Callable[[int], int] | None = None


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
