"""The `Aggregator` record: how the server combines the clients' updates."""

from typing import Callable, NamedTuple

from fedjax_core.typing import ClientWeights, Params, State


class Aggregator(NamedTuple):
    """Combines a cohort's stacked deltas into one, possibly with state across rounds.

    Attributes:
      init: `init(params) -> state`.
      apply: `apply(deltas, weights, state) -> (aggregate, state)` with `deltas` a
        pytree of `[clients, ...]` leaves, `weights` `[clients]` (0 for padding
        clients, which must not count) and `aggregate` shaped like the params.
    """

    init: Callable[[Params], State]
    apply: Callable[[Params, ClientWeights, State], tuple[Params, State]]
