"""The `FederatedAlgorithm` record: one round of federated training as a pure function."""

import functools
from typing import Any, Callable, NamedTuple, Protocol

import optax

from fedjax_core import client_state, client_store, parallel
from fedjax_core.data.pack import Cohort
from fedjax_core.models.base import Model
from fedjax_core.parallel import Plan
from fedjax_core.typing import Array, Params, PRNGKey, State

Rate = float | Array
"""A learning rate: a float, or a scalar array (traced in a sweep)."""

OptimizerOrRate = optax.GradientTransformation | Rate
"""What every algorithm factory takes as `client_optimizer` and `server_optimizer`: an optax
`GradientTransformation`, or a learning rate."""


class ApplyFn(Protocol):
    """`apply(state, cohort, key, *, model, plan, per_client=False) -> (state, metrics)`, or
    `(state, metrics, per_client)` when asked for per-client outputs."""

    def __call__(self, state: State, cohort: Cohort, key: PRNGKey, *, model: Model,
                 plan: Plan = Plan(), per_client: bool = False) -> tuple[Any, ...]: ...


class FederatedAlgorithm(NamedTuple):
    """A federated algorithm, in the manner of an optax `GradientTransformation`.

    Attributes:
      init: `init(params) -> state`. Every state has a field `params`, the global
        model that evaluation uses.
      apply: `apply(state, cohort, key, *, model, plan) -> (state, metrics)`, one
        round on a packed cohort. `key` is the round key; client `s` of the cohort
        uses `fold_in(key, s)`. Pure and jittable (`model` and `plan` static). Run it
        through `jit_round`, which also fits per-client stores to the cohort.
      evaluate: optional `evaluate(model, state, data, batch_size, clients=None) ->
        {name: float}` for algorithms whose model is not one global `state.params`
        (HypCluster's clusters, Ditto's and APFL's personal models); `clients` is an
        `EvalClients` or None. None evaluates `state.params` with `fedjax_core.evaluate`.
    """

    init: Callable[[Params], State]
    apply: ApplyFn
    evaluate: Callable | None = None


class EvalClients(NamedTuple):
    """What an algorithm's own `evaluate` may know about the evaluated clients.

    Attributes:
      rows: `Int[ndarray, "clients"]`, for each client of the evaluated data (in its
        order), its row in the algorithm's per-client stores, or -1 when the client never
        trained (it has no personal state; use the global model).
      train: a `FederatedData` aligned with the evaluated data (same clients, same
        order; a client without training data has 0 examples) holding the clients'
        training examples, e.g. for HypCluster to choose each client's cluster; or None.
    """

    rows: Any
    train: Any = None


class AlgorithmEntry(NamedTuple):
    """A registered algorithm.

    Attributes:
      name: registry key.
      description: one line for `fedjax algorithms`.
      build: `build(client_optimizer, server_learning_rate, aggregator=None, **options)`.
      paper: the reference.
      needs: facts about the run the builder must be given as options, which the facade
        supplies: `"num_clients"` (the population size), `"num_domains"`.
    """

    name: str
    description: str
    build: Callable[..., FederatedAlgorithm]
    paper: str
    needs: tuple[str, ...] = ()


def is_rate(optimizer: Any) -> bool:
    """Whether `optimizer` is a learning rate (a number or a scalar array, traced or not)
    rather than an optax `GradientTransformation`; raises `TypeError` if it is neither."""
    if isinstance(optimizer, optax.GradientTransformation):
        return False
    if isinstance(optimizer, bool) or not (isinstance(optimizer, (int, float))
                                           or getattr(optimizer, "shape", None) == ()):
        raise TypeError("expected an optax.GradientTransformation or a learning rate (a float), "
                        f"got {optimizer!r}")
    return True


def _rate(optimizer: OptimizerOrRate) -> Rate:
    """`optimizer`, checked to be a learning rate (`TypeError` when it is neither a rate nor
    a transformation; the callers refuse a transformation first)."""
    assert not isinstance(optimizer, optax.GradientTransformation)
    is_rate(optimizer)
    return optimizer


def sgd_if_rate(optimizer: OptimizerOrRate) -> optax.GradientTransformation:
    """The shorthand of every algorithm factory: a learning rate means plain SGD.

    Returns `optax.sgd(optimizer)` when `optimizer` is a learning rate (`is_rate`), else
    `optimizer` itself, so `fedavg(0.1, 1.0)` is `fedavg(optax.sgd(0.1), optax.sgd(1.0))`.

    Args:
      optimizer: an optax `GradientTransformation`, or a learning rate (a float or a
        scalar array).

    Returns:
      An optax `GradientTransformation`.

    Example:
      >>> sgd_if_rate(0.1)              # optax.sgd(0.1)
      >>> sgd_if_rate(optax.adam(1e-3))  # unchanged
    """
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    return optax.sgd(_rate(optimizer))


def server_sgd(server_optimizer: OptimizerOrRate, server_momentum: float,
               algorithm: str) -> optax.GradientTransformation:
    """`server_optimizer`, or `optax.sgd(server_optimizer, momentum=server_momentum)` when it
    is a learning rate (no momentum when `server_momentum` is 0). The option
    `server_momentum` belongs to the float form: with a transformation it must be 0
    (`ValueError`)."""
    if not isinstance(server_optimizer, optax.GradientTransformation):
        return optax.sgd(_rate(server_optimizer),
                         momentum=server_momentum if server_momentum else None)
    if server_momentum:
        raise ValueError(f"{algorithm}: server_momentum applies when server_optimizer is a "
                         "learning rate; with an optax transformation, put the momentum in it "
                         "(e.g. optax.sgd(1.0, momentum=0.9))")
    return server_optimizer


def server_rate(server_optimizer: OptimizerOrRate, algorithm: str, why: str) -> Rate:
    """`server_optimizer` when it is a learning rate; `ValueError` for a transformation, an
    algorithm whose server step is its own rule (`why` says which), not an optimizer."""
    if isinstance(server_optimizer, optax.GradientTransformation):
        raise ValueError(f"{algorithm}: server_optimizer must be a learning rate (a float), "
                         f"not an optax transformation: {why}")
    return _rate(server_optimizer)


def client_rate(client_optimizer: OptimizerOrRate, client_learning_rate: Rate | None,
                algorithm: str) -> Rate:
    """The clients' learning rate of an algorithm whose maths uses it: `client_optimizer`
    when it is a learning rate, else `client_learning_rate`.

    `ValueError` when `client_optimizer` is a transformation and `client_learning_rate` is
    None, or when both are numbers that differ."""
    if not isinstance(client_optimizer, optax.GradientTransformation):
        rate = _rate(client_optimizer)
        if client_learning_rate is not None and client_learning_rate != rate:
            raise ValueError(f"{algorithm}: client_learning_rate={client_learning_rate} differs "
                             f"from the client_optimizer's learning rate {rate}; "
                             "give one of them")
        return rate
    if client_learning_rate is None:
        raise ValueError(f"{algorithm}: client_optimizer is an optax transformation, so pass its "
                         "learning rate as client_learning_rate=..., or pass the learning rate "
                         "itself as client_optimizer (plain SGD)")
    return client_learning_rate


def jit_round(algorithm: FederatedAlgorithm, model: Model, plan: Plan = Plan(),
              per_client: bool = False, donate_state: bool = False):
    """The round as one jitted call: `round(state, cohort, round_key) -> (state, metrics)`.

    It compiles once per distinct cohort shape (clients, bucketed steps, batch). Before
    each call it grows the state's per-client index and stores on the host when the
    cohort would not fit (`client_state.fit`; a recompile each time a store doubles).
    A state whose stores live on the host or disk (`fedjax_core.client_store.attach`)
    gets cohort-sized stores of the cohort's rows instead (`HostStore.step`): its shapes
    depend on the cohort size only.
    With a device mesh in `plan`, the cohort's clients are split over the devices and
    the outputs replicated on all of them (`parallel.jit_replicated`).

    Args:
      algorithm: the algorithm.
      model: the model.
      plan: how the cohort is executed.
      per_client: also return per-client outputs, `(state, metrics, per_client)` with
        `per_client` a dict of `[clients]` arrays (algorithms built on the round
        skeleton: `num_examples`, `weight`, `loss`, `delta_norm` and their own).
      donate_state: donate the state's buffers to the round, so that the new state
        (per-client stores included) is written in place of the old one rather than
        beside it. The state passed in is then deleted: keep only the returned one (a
        `Server` does not donate, since its old servers stay valid after `step`).

    Example:
      >>> step = jit_round(fedavg(), model)
      >>> for r in range(rounds):
      ...     state, metrics = step(state, cohorts[r], jax.random.fold_in(key, r))
    """
    options = {"model": model, "plan": plan, **({"per_client": True} if per_client else {})}
    fn = functools.partial(algorithm.apply, **options)
    return _Round(parallel.jit_replicated(fn, plan, donate_argnums=(0,) if donate_state else ()),
                  plan)


class _Round:
    """`jit_round`'s callable: fits the per-client stores, then runs the jitted round;
    `lower(...)` lowers it (one device) for inspection, e.g. `memory_analysis()`."""

    def __init__(self, jitted, plan: Plan):
        self._jitted, self._plan = jitted, plan

    def _fit(self, state, cohort):
        grown = client_state.fit(state, cohort.client_index)
        if grown is not state and self._plan.mesh is not None:
            grown = parallel.replicate(grown, self._plan)
        return grown

    def __call__(self, state, cohort, key):
        index = client_store.host_index(state)
        if index is not None:  # rows on the host or disk: the round sees the cohort's only
            place = ((lambda s: s) if self._plan.mesh is None
                     else (lambda s: parallel.replicate(s, self._plan)))
            return index.host.step(self._jitted, state, cohort, key, place)
        return self._jitted(self._fit(state, cohort), cohort, key)

    def lower(self, state, cohort, key):
        return self._jitted.lower(self._fit(state, cohort), cohort, key)
