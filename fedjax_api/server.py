"""`Server`: the global model and the algorithm's state, one round at a time."""

from typing import Any, Callable

import attrs
import jax
import numpy as np

from fedjax_api.dataset import FederatedDataset
from fedjax_core import client_state, keys, parallel
from fedjax_core import evaluate as core_evaluate
from fedjax_core.algorithms.base import EvalClients, FederatedAlgorithm, jit_round
from fedjax_core.data import Cohort, FederatedData
from fedjax_core.models.base import Model
from fedjax_core.parallel import Plan
from fedjax_core.typing import Params, PRNGKey


@attrs.frozen(kw_only=True)
class Server:
    """The server of a federated run: immutable; `step` returns the next one.

    Round r uses the key `fold_in(key(seed), r)`; client s of its cohort uses
    `fold_in(round key, s)`.

    Attributes:
      algorithm: the federated algorithm.
      model: the model.
      state: the algorithm's state (has `.params`).
      key: the experiment key.
      round: rounds done so far.
      plan: how cohorts are executed (chunk size; with a mesh, the devices the clients are
        split over, the state then being replicated on each of them).
      metrics: metrics of the last round (device arrays until read).

    Example:
      >>> server = Server.create(fedavg(optax.sgd(1.0), optax.adam(1e-2)), task.model, seed=0)
      >>> for r in range(1200):
      ...     server = server.step(task.train.sample(clients=10, round=r))
      >>> server.evaluate(task.test)
    """

    algorithm: FederatedAlgorithm
    model: Model
    state: Any
    key: PRNGKey
    round: int = 0
    plan: Plan = Plan()
    metrics: dict = attrs.field(factory=dict, repr=False)
    _round_fn: Callable = attrs.field(default=None, repr=False, eq=False, alias="round_fn")

    def __attrs_post_init__(self):
        if self._round_fn is None:
            object.__setattr__(self, "_round_fn", jit_round(self.algorithm, self.model, self.plan))

    @classmethod
    def create(cls, algorithm: FederatedAlgorithm, model: Model, seed: int = 0,
               params: Params | None = None, plan: Plan = Plan()) -> "Server":
        """A server at round 0. Parameters come from `model.init(keys.init_key(key))`
        unless given."""
        key = jax.random.key(seed)
        if params is None:
            params = jax.jit(model.init)(keys.init_key(key))
        return cls(algorithm=algorithm, model=model,
                   state=parallel.replicate(algorithm.init(params), plan), key=key, plan=plan)

    @property
    def params(self) -> Params:
        return self.state.params

    def step(self, cohort: Cohort) -> "Server":
        """Runs one round on `cohort` (one jitted call) and returns the next server; this
        server is left unchanged. Per-client state is the algorithm's business: its
        stores grow with the clients seen (`algorithms.base.jit_round`)."""
        state = self.state
        if self.plan.mesh is not None:  # state on every device, the clients split over them
            state = parallel.replicate(state, self.plan)
            if isinstance(cohort.batches, dict):
                batches, mask, n = parallel.shard_clients(
                    (cohort.batches, cohort.mask, cohort.num_examples), self.plan)
                cohort = cohort._replace(batches=batches, mask=mask, num_examples=n)
        state, metrics = self._round_fn(state, cohort, jax.random.fold_in(self.key, self.round))
        return attrs.evolve(self, state=state, round=self.round + 1, metrics=metrics)

    def store_rows(self, positions) -> np.ndarray:
        """`Int[ndarray, "clients"]`: each training-data position's row in the algorithm's
        per-client stores, -1 where the client never trained (e.g. for `EvalClients`)."""
        return client_state.rows_of(parallel.local_copy(self.state), positions)

    def evaluate(self, data: FederatedDataset | FederatedData, batch_size: int = 256,
                 clients: EvalClients | None = None) -> dict[str, float]:
        """Global metrics of the current model over all examples of `data`.

        Algorithms with their own models (HypCluster, Ditto, APFL) evaluate those; `clients`
        tells them each client's row in their per-client state and its training examples
        (`Experiment` supplies it)."""
        if isinstance(data, FederatedDataset):
            data = data.data
        state = parallel.local_copy(self.state)  # one device evaluates, not every one
        if self.algorithm.evaluate is not None:
            return self.algorithm.evaluate(self.model, state, data, batch_size, clients)
        return core_evaluate.evaluate(self.model, state.params, data, batch_size)

    def evaluate_per_client(self, data: FederatedDataset | FederatedData, batch_size: int = 256):
        """Each client's own metrics, `{name: Float[ndarray, "clients"]}`."""
        if isinstance(data, FederatedDataset):
            data = data.data
        return core_evaluate.evaluate_per_client(self.model, parallel.local_copy(self.params),
                                                 data, batch_size)
