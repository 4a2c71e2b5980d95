"""`Server`: the global model and the algorithm's state, one round at a time; `SweepServer`:
the states of a sweep's members, stacked, one round at a time."""

import warnings
from pathlib import Path
from typing import Any, Callable

import attrs
import jax
import numpy as np

from fedjax_api import checkpoint, state_store
from fedjax_api.dataset import FederatedDataset
from fedjax_core import client_state, client_store, keys, parallel, sweep
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
               params: Params | None = None, plan: Plan = Plan(),
               store: client_store.StoreSpec | None = None) -> "Server":
        """A server at round 0. Parameters come from `model.init(keys.init_key(key))`
        unless given. `store` says where per-client state lives (default: the device;
        host or disk: `fedjax_core.client_store`; such a server's state is a view of
        the host tables, so step and read only the newest server)."""
        key = jax.random.key(seed)
        if params is None:
            params = jax.jit(model.init)(keys.init_key(key))
        state = algorithm.init(params)
        if store is not None:
            state = client_store.attach(state, store)
        return cls(algorithm=algorithm, model=model,
                   state=parallel.replicate(state, plan), key=key, plan=plan)

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

    def evaluate(self, data: FederatedDataset | FederatedData, batch_size: int = 256,
                 clients: EvalClients | None = None) -> dict[str, float]:
        """Global metrics of the current model over all examples of `data`.

        Algorithms with their own models (HypCluster, Ditto, APFL) evaluate those; `clients`
        tells them each client's row in their per-client state and its training examples
        (`Experiment` supplies it)."""
        if isinstance(data, FederatedDataset):
            data = data.data
        state = parallel.local_copy(self.state)  # one device evaluates, not every one
        if (self.algorithm.evaluate is not None and clients is not None
                and client_store.is_hosted(state)):  # the evaluated clients' rows, on the device
            state, rows = client_store.eval_state(state, clients.rows)
            clients = clients._replace(rows=rows)
        if self.algorithm.evaluate is not None:
            return self.algorithm.evaluate(self.model, state, data, batch_size, clients)
        return core_evaluate.evaluate(self.model, state.params, data, batch_size)

    def evaluate_per_client(self, data: FederatedDataset | FederatedData, batch_size: int = 256):
        """Each client's own metrics, `{name: Float[ndarray, "clients"]}`."""
        if isinstance(data, FederatedDataset):
            data = data.data
        return core_evaluate.evaluate_per_client(self.model, parallel.local_copy(self.params),
                                                 data, batch_size)

    def eval_rows(self, positions: np.ndarray) -> np.ndarray:
        """Each client's row in the algorithm's per-client state, for evaluation
        (`EvalClients.rows`), read from the state's `ClientIndex`.

        Args:
          positions: Int[ndarray, "clients"], positions in the training population
            (negative: a client without training data).

        Returns:
          Int[ndarray, "clients"]: the rows; -1 for a client never trained (or none).
        """
        index = client_store.host_index(self.state)
        if index is not None:
            return index.host.rows_of(positions, index.version)
        return client_state.rows_of(parallel.local_copy(self.state), positions)

    def save_checkpoint(self, run_dir: Path, meta: dict, keep: int = 3) -> Path:
        """Writes the checkpoint of this round (`fedjax_api.checkpoint.save`): the state
        (per-client stores and their index included) and `meta` in the manifest.

        Example:
          >>> server.save_checkpoint(run_dir, {"history": records}, keep=3)
        """
        index = client_store.host_index(self.state)
        if index is not None:  # the rows changed since the last checkpoint, written first
            meta = {**meta, "client_store": state_store.save_delta(
                run_dir, self.round, index.host, index.version, index.host.checkpoints)}
            index.host.checkpoints = meta["client_store"]["deltas"]
        return checkpoint.save(run_dir, self.round, self.state, meta, keep=keep)

    def restore(self, run_dir: Path) -> tuple["Server", dict]:
        """This server continued from the newest good checkpoint of `run_dir`: its state
        (per-client stores and index included) and round, and the checkpoint's `meta` (a
        damaged newer checkpoint is skipped with a warning). This server is the template
        (structure and dtypes; stores may have grown).

        Example:
          >>> server, meta = Server.create(algorithm, model, seed=0).restore(run_dir)
        """
        done, state, meta = checkpoint.load(run_dir, template=self.state)
        for reason in meta.get("skipped", []):
            warnings.warn(f"skipped a damaged checkpoint: {reason}", stacklevel=2)
        index = client_store.host_index(state)
        if index is not None:  # the store as of round `done`: its deltas, in order
            listed = meta.get("client_store")
            if not isinstance(listed, dict):
                raise checkpoint.CheckpointError(
                    f"the checkpoint of round {done} in {str(run_dir)!r} holds no host or disk "
                    "client store; resume it with --client-store device")
            index.host.checkpoints = state_store.restore(Path(run_dir), done, index.host, listed)
            state = client_store.at_version(state, done)
        return attrs.evolve(self, state=state, round=done), meta


def keeps_client_state(algorithm: FederatedAlgorithm, model: Model) -> bool:
    """Whether `algorithm` keeps state per client (SCAFFOLD's controls, Ditto's models)."""
    params = jax.eval_shape(model.init, jax.random.key(0))
    return client_state.has_stores(jax.eval_shape(algorithm.init, params))


@attrs.frozen(kw_only=True)
class SweepServer:
    """The members' states, stacked `[S, H, ...]` (`fedjax_core.sweep`) and stepped as one
    jitted program per round: what a sweep's `Loop` trains (a `fedjax_api.loop.Trainer`).

    Attributes:
      step_fn: `fedjax_core.sweep.sweep_round(...)`.
      state, layout, keys, hparams: the stacked state, where each member sits in it, the
        seeds' keys and the swept values (traced).
      algorithms, seeds: each member's algorithm and seed (to evaluate it as a `Server`).
      model, plan, round: the model, the execution plan, the rounds done.
      metrics: the last round's metrics, `[S, H]` each.
    """

    step_fn: Callable = attrs.field(repr=False)
    state: Any = attrs.field(repr=False)
    layout: sweep.Layout
    keys: Any = attrs.field(repr=False)
    hparams: dict[str, Any]
    algorithms: list[FederatedAlgorithm] = attrs.field(repr=False)
    seeds: list[int]
    model: Model = attrs.field(repr=False)
    plan: Plan
    round: int = 0
    metrics: dict = attrs.field(factory=dict, repr=False)

    def step(self, cohorts: Any) -> "SweepServer":
        state, metrics = self.step_fn(self.state, cohorts, self.keys, self.round, self.hparams)
        return attrs.evolve(self, state=state, metrics=metrics, round=self.round + 1)

    def read_metrics(self) -> list[dict[str, float]]:
        metrics = jax.device_get(self.metrics)
        return [{name: float(v[s, h]) for name, v in metrics.items()}
                for s, h in self.layout.cells]

    def servers(self) -> list[Server]:
        return [Server(algorithm=a, model=self.model, key=jax.random.key(seed), plan=self.plan,
                       state=sweep.member(self.state, self.layout, k), round=self.round)
                for k, (a, seed) in enumerate(zip(self.algorithms, self.seeds))]
