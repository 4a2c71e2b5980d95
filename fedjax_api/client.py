"""`Client`: one client's data and local training, for debugging and personalization."""

import functools

import attrs
import jax
import optax

from fedjax_core import keys, tree
from fedjax_core.client import ClientReport, train_steps
from fedjax_core.data import ClientArrays, pack_clients
from fedjax_core.data.sampling import SHUFFLE_STREAM, host_rng
from fedjax_core.models.base import Model
from fedjax_core.typing import Params


@functools.lru_cache(maxsize=32)
def _jitted_update(model: Model, optimizer: optax.GradientTransformation):
    def update(params, batches, mask, num_examples, key) -> ClientReport:
        trained, stats = train_steps(model, optimizer, params, batches, mask, key)
        return ClientReport(tree.sub(params, trained), stats,
                            weight=jax.numpy.asarray(num_examples, jax.numpy.float32))
    return jax.jit(update)


@attrs.frozen(kw_only=True)
class Client:
    """One client: an id and its examples.

    Example:
      >>> client = Client(id="hamlet:HAMLET", data=task.train.data.get_client(0))
      >>> update = client.train(server.params, model=task.model, optimizer=optax.sgd(1.0),
      ...                       batch_size=4)
      >>> update.delta, update.stats.loss_sum  # w_0 - w_K, its training loss summed
    """

    id: str
    data: ClientArrays = attrs.field(repr=False)

    @property
    def num_examples(self) -> int:
        return len(next(iter(self.data.values())))

    def train(self, params: Params, *, model: Model, optimizer: optax.GradientTransformation,
              batch_size: int, epochs: int = 1, seed: int = 0, round: int = 0,  # noqa: A002
              slot: int = 0) -> ClientReport:
        """Trains on this client alone, exactly as it would train in cohort slot `slot`
        of round `round` of a run seeded with `seed` (FedAvg's local training).

        Returns:
          A `ClientReport`: `delta` (`w_0 - w_K`), `stats` (`TrainStats`), `weight` (its
          number of examples)."""
        cohort = pack_clients([self.data], batch_size, epochs,
                              rngs=[host_rng(seed, round, SHUFFLE_STREAM, slot)])
        key = keys.client_key(keys.round_key(jax.random.key(seed), round), slot)
        return _jitted_update(model, optimizer)(
            params, jax.tree.map(lambda x: x[0], cohort.batches), cohort.mask[0],
            cohort.num_examples[0], key)
