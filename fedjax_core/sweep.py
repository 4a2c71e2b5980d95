"""Hyperparameter sweeps as one program: K runs of an algorithm trained together.

A sweep member is one setting of the swept hyperparameters (e.g. the client and server
learning rates) and a seed. The members are laid out on a grid `[S, H]`: one row per
distinct seed (`S` rows), the members of a seed side by side (`H` columns, rows padded
with copies of their first member). A member at `(s, h)` computes what a separate run of
its own would (`jit_round` with the same seed), up to floating-point reassociation in the
wider matrix products (the tests check 1e-5):

    key_s          = key(seed_s)
    state_{s,h}    = build(hparams_{s,h}).init(model.init(fold_in(key_s, INIT_KEY)))
    round t:       state_{s,h}, metrics_{s,h} = build(hparams_{s,h}).apply(
                       state_{s,h}, cohort_{s,t}, fold_in(key_s, t))

The members of a row share their seed, so they share the cohort of every round and their
round keys: the cohort is sampled and packed once per row (as indices into the examples
when they live on the device, `fedjax_core.data.device`), and within a row the members
run under `vmap` with the cohort unbatched. Each member's model is then a batch of
weights against shared data, which `vmap` turns into wider matrix products rather than
batched ones (on XLA:CPU a batched product of small matrices costs about as much as one
product per member). The rows run one after another (`lax.map`), or `seeds_together`
rows at a time under `vmap`, like `parallel.Plan.chunk_size` for clients.

The algorithm is built inside the traced function from traced scalar hyperparameters
(`build(hparams) -> FederatedAlgorithm`, e.g. `fedavg(optax.sgd(hparams["client_lr"]),
...)`), so a hyperparameter can be swept only if the algorithm uses it as a number.
One that sets a shape or a Python branch (a cluster count, a `if lr > 0`) is refused
with a `SweepError` naming it. So is an algorithm (or aggregator) that keeps state per
client (SCAFFOLD's control variates, Ditto's personal models, error feedback): its
store grows on the host between rounds (`client_state.fit`), outside the program.
"""

from typing import Callable, Mapping, NamedTuple, Sequence, overload

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Shaped

from fedjax_core import client_state
from fedjax_core import keys as streams  # not `keys`: the rounds' argument of seed keys
from fedjax_core.algorithms.base import FederatedAlgorithm
from fedjax_core.data.device import IndexedBatches
from fedjax_core.data.pack import Cohort, pad_cohort
from fedjax_core.models.base import Model
from fedjax_core.parallel import Plan
from fedjax_core.typing import Array, PyTree, State

INIT_KEY = streams.INIT
"""`model.init(fold_in(key(seed), INIT_KEY))` (`keys.init_key`), as `fedjax_api.Server.create`
does."""

Build = Callable[[dict[str, Array]], FederatedAlgorithm]
"""`build(hparams) -> FederatedAlgorithm`, with `hparams` the swept hyperparameters by
name, each a scalar (traced inside the sweep)."""


class SweepError(ValueError):
    """A sweep that cannot run as one program: a hyperparameter that sets a shape or a
    Python branch of the algorithm, or an algorithm that keeps state per client."""


def _refuse_client_state(state: State) -> None:
    """Raises a `SweepError` when `state` holds per-client stores (`client_state.has_stores`)."""
    if client_state.has_stores(state):
        raise SweepError("cannot sweep an algorithm that keeps state per client (its "
                         "per-client store grows between rounds, outside one program); "
                         "run its settings as separate runs")


class Layout(NamedTuple):
    """Where each of K members sits on the `[S, H]` grid.

    Attributes:
      seeds: the S distinct seeds, in order of first appearance.
      cells: `Int[ndarray, "K 2"]`, member k's `(row, column)`.
      width: H, the most members sharing one seed.
      filler: `Bool[ndarray, "S H"]`, True where a cell only repeats its row's first
        member to fill the row (its results are dropped).
    """

    seeds: tuple[int, ...]
    cells: np.ndarray
    width: int
    filler: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.seeds), self.width


def layout(member_seeds: Sequence[int]) -> Layout:
    """Lays K members out on a grid of one row per distinct seed.

    Args:
      member_seeds: each member's seed, length K.

    Returns:
      The `Layout`.

    Example:
      >>> lay = layout([0, 0, 1, 1, 1])
      >>> lay.seeds, lay.width, lay.cells.tolist()
      ((0, 1), 3, [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]])
    """
    if len(member_seeds) == 0:
        raise ValueError("a sweep needs at least one member")
    seeds: list[int] = []
    cells = []
    count: dict[int, int] = {}
    for seed in member_seeds:
        seed = int(seed)
        if seed not in count:
            seeds.append(seed)
            count[seed] = 0
        cells.append((seeds.index(seed), count[seed]))
        count[seed] += 1
    width = max(count.values())
    filler = np.ones((len(seeds), width), bool)
    for s, h in cells:
        filler[s, h] = False
    return Layout(tuple(seeds), np.asarray(cells, np.int32).reshape(-1, 2), width, filler)


def on_grid(lay: Layout, values: Sequence[float]) -> np.ndarray:
    """Member values `[K]` placed on the grid `[S, H]`; a filler cell takes its row's
    first member's value. Floats become float32, integers int32 (the dtypes a traced
    hyperparameter has in the program).

    Example:
      >>> on_grid(layout([0, 0, 1]), [0.5, 0.25, 2.0]).tolist()
      [[0.5, 0.25], [2.0, 2.0]]
    """
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    elif arr.dtype.kind in "iu":
        arr = arr.astype(np.int32)
    if arr.shape[:1] != (len(lay.cells),):
        raise ValueError(f"expected one value per member ({len(lay.cells)}), got "
                         f"{arr.shape[:1]}")
    grid = np.empty(lay.shape + arr.shape[1:], arr.dtype)
    for s in range(lay.shape[0]):
        grid[s] = arr[int(np.flatnonzero(lay.cells[:, 0] == s)[0])]
    grid[lay.cells[:, 0], lay.cells[:, 1]] = arr
    return grid


def member(tree: PyTree, lay: Layout, k: int) -> PyTree:
    """Member k's slice of a pytree whose leaves are `[S, H, ...]` (a state, metrics)."""
    s, h = (int(i) for i in lay.cells[k])
    return jax.tree.map(lambda x: x[s, h], tree)


def seed_keys(seeds: Sequence[int]) -> Array:
    """`key(seed)` of each seed, stacked: the same bits as `jax.random.key(seed)`.

    Returns:
      A typed key array of shape `[S]`.
    """
    return jax.random.wrap_key_data(
        jnp.stack([jax.random.key_data(jax.random.key(int(s))) for s in seeds]))


def stack_cohorts(cohorts: Sequence[Cohort]) -> Cohort:
    """Stacks S cohorts along a new leading axis, padding them to one shape first.

    Cohorts with fewer clients (Poisson sampling) get empty clients (weight 0,
    `client_index` -1) and those with fewer steps get empty steps (all-False mask):
    neither changes what a round computes, as `pad_cohort` explains. Cohorts of
    device-resident data (`IndexedBatches`) must read the same examples; their indices
    are stacked and the examples kept once.

    Args:
      cohorts: S cohorts (numpy on the host), with the same features and batch size.

    Returns:
      A `Cohort` whose arrays are `[S, clients, ...]` (an `IndexedBatches` keeps its
      `source` and gets an index `[S, clients, steps, batch]`). One cohort is expanded
      without a copy.

    Example:
      >>> stack_cohorts([task.train.sample(10, r) for r in range(2)]).mask.shape
      (2, 10, 1536, 10)
    """
    if not cohorts:
        raise ValueError("no cohorts to stack")
    indexed = [c.batches for c in cohorts if isinstance(c.batches, IndexedBatches)]
    if indexed:
        source = indexed[0].source
        if len(indexed) != len(cohorts) or any(
                any(b.source[k] is not v for k, v in source.items()) for b in indexed):
            raise ValueError("indexed cohorts must all read the same device examples")
        rows = stack_cohorts([c._replace(batches={"index": np.asarray(b.index)})
                              for c, b in zip(cohorts, indexed)])
        return rows._replace(batches=IndexedBatches(source, _dense(rows)["index"]))
    if len(cohorts) == 1:
        c = cohorts[0]
        return Cohort(_lead_axis(_dense(c)), c.mask[None], c.num_examples[None],
                      c.client_index[None])
    clients = max(c.num_clients for c in cohorts)
    steps = max(c.num_steps for c in cohorts)
    padded: list[Cohort] = []
    for c in cohorts:
        c = pad_cohort(c, clients)
        extra = steps - c.num_steps
        if extra:
            def more(x: np.ndarray | Array) -> np.ndarray:
                return np.concatenate(
                    [x, np.zeros((x.shape[0], extra) + x.shape[2:], x.dtype)], axis=1)
            c = c._replace(batches={k: more(v) for k, v in _dense(c).items()},
                           mask=more(c.mask))
        padded.append(c)
    batches = [_dense(c) for c in padded]
    return Cohort({k: np.stack([b[k] for b in batches]) for k in batches[0]},
                  np.stack([c.mask for c in padded]),
                  np.stack([c.num_examples for c in padded]),
                  np.stack([c.client_index for c in padded]))


def _dense(cohort: Cohort) -> dict[str, np.ndarray] | dict[str, Array]:
    """`cohort.batches` of a cohort whose batches are dense (not `IndexedBatches`)."""
    batches = cohort.batches
    assert not isinstance(batches, IndexedBatches), "expected dense batches"
    return batches


@overload
def _lead_axis(batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
@overload
def _lead_axis(batches: dict[str, Array]) -> dict[str, Array]: ...
def _lead_axis(batches):
    """`batches` with a new leading axis of size 1 on every feature (no copy)."""
    return {k: v[None] for k, v in batches.items()}


def _maker(build: Build, hparams: dict) -> Build:
    """`build` itself when something is swept; else the algorithm built once, eagerly,
    outside the program (some algorithms compute with their hyperparameters while being
    built, which they cannot do on traced values)."""
    if hparams:
        return build
    algorithm = build({})
    return lambda hp: algorithm


def _init_one(make: Build, model: Model, width: int):
    def init(key, hparams):
        params = model.init(streams.init_key(key))
        return jax.vmap(lambda hp: make(hp).init(params), axis_size=width)(hparams)
    return init


def _round_one(make: Build, model: Model, plan: Plan):
    def one(state, cohort, key, round_num, hparams):
        round_key = streams.round_key(key, round_num)

        def member_round(st, hp):
            return make(hp).apply(st, cohort, round_key, model=model, plan=plan)

        return jax.vmap(member_round)(state, hparams)
    return one


def _split_source(cohorts: Cohort) -> tuple[Cohort, dict[str, Array] | None]:
    """`(cohorts with an IndexedBatches' source set aside, source or None)`: the
    population's examples are shared by every row, not mapped over; only the index is."""
    batches = cohorts.batches
    if isinstance(batches, IndexedBatches):
        return cohorts._replace(batches=batches._replace(source={})), batches.source
    return cohorts, None


def _join_source(cohort: Cohort, source: dict[str, Array] | None) -> Cohort:
    """`cohort` with the source that `_split_source` set aside put back."""
    batches = cohort.batches
    if source is None or not isinstance(batches, IndexedBatches):
        return cohort
    return cohort._replace(batches=batches._replace(source=source))


def _over_rows(fn, xs, seeds_together: int):
    rows = jax.tree.leaves(xs)[0].shape[0]
    if seeds_together >= rows:
        return jax.vmap(fn)(*xs)
    return jax.lax.map(lambda x: fn(*x), xs, batch_size=None if seeds_together == 1
                       else seeds_together)


def sweep_init(build: Build, model: Model, lay: Layout,
               hparams: Mapping[str, Shaped[np.ndarray | Array, "S H"]]) -> State:
    """The initial state of every member: `build(hp).init(model.init(fold_in(key_s, INIT_KEY)))`.

    Members of a row share their seed and so their initial parameters (as separate runs
    with that seed would).

    Args:
      build: makes the algorithm from a member's hyperparameters.
      model: the model.
      lay: the members' layout (`layout`).
      hparams: each swept hyperparameter on the grid, `[S, H]` (`on_grid`).

    Returns:
      The algorithm's state with leaves `[S, H, ...]`.

    Raises:
      SweepError: when a swept hyperparameter cannot be traced, or when the algorithm
        keeps state per client.

    Example:
      >>> lay = layout([0, 0, 1])
      >>> hp = {"client_lr": on_grid(lay, [0.01, 0.1, 0.01])}
      >>> state = sweep_init(lambda h: fedavg(optax.sgd(h["client_lr"])), model, lay, hp)
    """
    hparams = {k: jnp.asarray(v) for k, v in hparams.items()}
    one = _init_one(_maker(build, hparams), model, lay.width)
    try:
        state = jax.jit(jax.vmap(one))(seed_keys(lay.seeds), hparams)
    except Exception as e:
        _explain(e, build, lambda alg: alg.init(model.init(jax.random.key(0))), hparams)
        raise
    _refuse_client_state(state)
    return state


def sweep_round(build: Build, model: Model, plan: Plan = Plan(), seeds_together: int = 1):
    """One round of every member as one jitted call.

    `round(state, cohorts, keys, round_num, hparams) -> (state, metrics)`: member (s, h)
    runs `build(hparams[s, h]).apply(state[s, h], cohorts[s], fold_in(keys[s], round_num))`,
    its own run's round `round_num`. Cohorts of device-resident data
    (`fedjax_core.data.device.IndexedBatches`) share their examples across the rows: only
    the indices are stacked. It compiles once per
    cohort shape; the round number is traced.

    Args:
      build: makes the algorithm from a member's hyperparameters (traced scalars).
      model: the model.
      plan: how each member's cohort is executed (its clients' chunk size).
      seeds_together: rows (seeds) trained together under `vmap`; 1 runs them one after
        another (`lax.map`), which suits XLA:CPU, where each row's members already share
        their data. A larger value batches the rows' data too (more parallel work, e.g.
        on a GPU).

    Returns:
      The round function; its inputs are the state `[S, H, ...]`, the cohorts stacked by
      `stack_cohorts` (`[S, clients, ...]`), `keys` `[S]` (`seed_keys`), the round
      number (int) and the hyperparameters `{name: [S, H]}`; its metrics are `{name: [S, H]}`.

    Raises:
      SweepError: on the first call, when a swept hyperparameter cannot be traced (it
        sets a shape or a Python branch); the message names it. On any call, when the
        state keeps per-client stores.

    Example:
      >>> step = sweep_round(build, model)
      >>> for r in range(rounds):
      ...     cohorts = stack_cohorts([train_of_seed[s].sample(10, r) for s in lay.seeds])
      ...     state, metrics = step(state, cohorts, keys, r, hparams)
    """
    if seeds_together < 1:
        raise ValueError(f"seeds_together must be at least 1, got {seeds_together}")
    compiled = {}

    def run_for(swept: bool):
        if swept not in compiled:
            one = _round_one(build if swept else _maker(build, {}), model, plan)

            @jax.jit
            def run(state, cohorts, keys, round_num, hparams):
                cohorts, source = _split_source(cohorts)
                return _over_rows(
                    lambda st, c, k, hp: one(st, _join_source(c, source), k, round_num, hp),
                    (state, cohorts, keys, hparams), seeds_together)
            compiled[swept] = run
        return compiled[swept]

    def round_fn(state, cohorts, keys, round_num, hparams):
        _refuse_client_state(state)
        hparams = {k: jnp.asarray(v) for k, v in hparams.items()}
        round_num = jnp.asarray(round_num, jnp.int32)
        try:
            return run_for(bool(hparams))(state, cohorts, keys, round_num, hparams)
        except Exception as e:
            first = jax.tree.map(lambda x: x[0, 0], state)
            rows, source = _split_source(cohorts)
            cohort = _join_source(jax.tree.map(lambda x: x[0], rows), source)
            _explain(e, build, lambda alg: alg.apply(first, cohort, jax.random.key(0),
                                                     model=model, plan=plan), hparams)
            raise

    return round_fn


def _fails(fn, *args) -> Exception | None:
    """The exception of tracing `fn(*args)` (`jax.eval_shape`), if any."""
    try:
        jax.eval_shape(fn, *args)
    except Exception as e:  # noqa: BLE001 - reported to the caller
        return e
    return None


def _explain(error: Exception, build: Build, op, hparams: dict) -> None:
    """Raises a `SweepError` naming the swept hyperparameters when tracing them is why
    `error` happened; returns (the caller re-raises `error`) otherwise.

    `op(algorithm)` is what failed (the init or a round). With the first member's values
    as plain numbers: if building eagerly and running `op` fails too, the error is not
    about sweeping. Else each swept name is traced alone to find the culprits.
    """
    if not hparams:
        return
    first = {k: np.asarray(v).reshape(-1)[0].item() for k, v in hparams.items()}
    try:
        algorithm = build(first)
    except Exception:  # noqa: BLE001 - the original error is re-raised
        return
    if _fails(lambda: op(algorithm)) is not None:
        return  # fails with plain numbers too: not about sweeping
    names = list(hparams)
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if _fails(lambda: op(build(first))) is not None:
        reason = ("this algorithm computes with its hyperparameters while it is built, which "
                  "cannot happen inside one program")
        fix = "sweep only the seed with it, or run the values as separate runs"
    else:
        bad = [n for n in names
               if _fails(lambda t, n=n: op(build({**first, n: t})), jnp.asarray(first[n]))]
        names = bad or names
        it = "it" if len(names) == 1 else "them"
        reason = (f"this algorithm uses {it} to set a shape or a Python branch, which one "
                  "program cannot vary")
        fix = f"give {'it' if len(names) == 1 else 'each'} one value, or run the values as " \
              "separate runs"
    what = ", ".join(repr(n) for n in names)
    raise SweepError(f"cannot sweep {what}: {reason} ({detail[:160]}); {fix}") from None


__all__ = ["Build", "INIT_KEY", "Layout", "SweepError", "layout", "member", "on_grid",
           "seed_keys", "stack_cohorts", "sweep_init", "sweep_round"]
