"""Running a one-client kernel over a whole cohort: the only place that maps over clients.

A cohort of C clients is cut into chunks of `chunk_size`. Chunks run one after another
(`lax.map`), the clients of a chunk together (`vmap`), so memory grows with the chunk,
not the cohort, and the whole round stays one jitted call.

Which chunk size is fastest depends on the model and the machine (see
`docs/performance.md`). On XLA:CPU, `chunk_size=1` runs each client's step loop to its
own length (no padded steps are computed) and suits convolutional and LSTM models;
small dense models gain from larger chunks.

With a device mesh (`Plan(mesh=client_mesh())`), the cohort is split over the devices of
the mesh axis `"clients"` with `jax.shard_map`: device d runs the chunked map above over
its own contiguous share of the clients. The stacked outputs stay sharded over the
devices, and whatever the caller computes from them in the same jitted round (e.g. the
aggregator's weighted sum) becomes a cross-device reduction that XLA inserts. The mesh
may span the devices of several processes (`fedjax_api.distributed`).

`run_clients` is the one loop over clients under every round: it adds some of each
client's outputs into a running total (e.g. `n_i Delta_i` for the weighted mean), so
that memory does not grow with the cohort, stacks others, and reads and rewrites each
client's row of a per-client table inside the same loop. With a mesh each device sums
its share and one `psum` adds the totals. `map_clients` (stack only) and `sum_clients`
(sum only) are its two special cases.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_core.data.device import split_indexed
from fedjax_core.typing import PyTree

CLIENTS = "clients"
"""Name of the mesh axis the cohort's clients are split over."""


class Plan(NamedTuple):
    """How a cohort is executed. Hashable, so it can be a static argument of `jit`.

    Attributes:
      chunk_size: clients trained together under `vmap` (on each device); 1 runs them
        one by one.
      mesh: a `jax.sharding.Mesh` with an axis named `"clients"` (see `client_mesh`):
        the cohort's clients are split over that axis's devices. None: one device.
    """

    chunk_size: int = 1
    mesh: Mesh | None = None


def client_mesh(num_devices: int | None = None, devices=None) -> Mesh:
    """A one-axis mesh `("clients",)` over the first `num_devices` devices.

    With several processes (`jax.distributed.initialize`), `jax.devices()` lists every
    process's devices, ordered by process, so each process's devices hold a contiguous
    share of the cohort.

    Args:
      num_devices: how many devices; None: all of `devices`.
      devices: the devices to choose from; None: `jax.devices()` (every process's).

    Returns:
      The mesh, for `Plan(mesh=...)`.

    Example:
      >>> plan = Plan(chunk_size=1, mesh=client_mesh(8))   # 8 devices, 1/8 of the cohort each
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is None:
        num_devices = len(devices)
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"asked for {num_devices} devices but {len(devices)} are available "
                         f"({devices[0].platform if devices else 'none'})")
    return Mesh(np.array(devices[:num_devices]), (CLIENTS,))


def num_shards(plan: Plan) -> int:
    """How many devices a cohort is split over: the size of the mesh's `"clients"` axis
    (1 without a mesh)."""
    return 1 if plan.mesh is None else int(plan.mesh.shape[CLIENTS])


def cohort_sharding(plan: Plan) -> NamedSharding | None:
    """`NamedSharding(mesh, P("clients"))`: stacked client arrays split over the devices
    (None without a mesh)."""
    return None if plan.mesh is None else NamedSharding(plan.mesh, PartitionSpec(CLIENTS))


def replicated(plan: Plan) -> NamedSharding | None:
    """`NamedSharding(mesh, P())`: a copy on every device of the mesh, e.g. the server
    state (None without a mesh)."""
    return None if plan.mesh is None else NamedSharding(plan.mesh, PartitionSpec())


def jit_replicated(fn: Callable, plan: Plan, donate_argnums: tuple[int, ...] = ()) -> Callable:
    """`jax.jit(fn)`; with a mesh, every output is replicated on the mesh's devices.

    A round's outputs (the server state and the metrics) then sit whole on every device
    (and every process), ready for the next round and readable on the host.

    With a mesh, the function is compiled ahead of time for each distinct signature of
    its arguments (structure, shapes, dtypes, placements), from abstract arguments that
    carry no sharding, and the placements are given as `in_shardings` instead: arrays
    already on the mesh keep theirs, everything else is replicated. Traced from
    arguments placed on the mesh, every value of the round would carry the mesh in its
    type, and the client kernels, which close over such values (the global params),
    could not create arrays like them inside `jax.shard_map` (e.g. `jnp.zeros_like(w)`
    in an optimizer's `init`): JAX refuses a closed-over value typed with the outer mesh
    there.

    Example:
      >>> step = jit_replicated(functools.partial(alg.apply, model=model, plan=plan), plan)
      >>> state, metrics = step(replicate(alg.init(params), plan), cohort, key)
    """
    if plan.mesh is None:
        return jax.jit(fn, donate_argnums=donate_argnums)
    return _MeshJit(fn, plan, donate_argnums)


class _MeshJit:
    """`jit_replicated` with a mesh: one compiled executable per argument signature."""

    def __init__(self, fn: Callable, plan: Plan, donate_argnums: tuple[int, ...] = ()):
        sharding = replicated(plan)
        assert sharding is not None  # jit_replicated makes one only with a mesh
        self._replicated = sharding
        self._jit = lambda in_shardings: jax.jit(fn, in_shardings=in_shardings,
                                                 out_shardings=self._replicated,
                                                 donate_argnums=donate_argnums)
        self._plan = plan
        self._compiled: dict = {}

    def _placement(self, x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == self._plan.mesh:
            return s
        return self._replicated

    def __call__(self, *args):
        leaves, tree = jax.tree.flatten(args)
        leaves = [x if hasattr(x, "dtype") else np.asarray(x) for x in leaves]
        shardings = [self._placement(x) for x in leaves]
        leaves = [_put(x, p) if isinstance(x, jax.Array) and x.committed
                  and p == self._replicated else x for x, p in zip(leaves, shardings)]
        abstract = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]
        signature = (tree, tuple((a.shape, a.dtype) for a in abstract), tuple(shardings))
        compiled = self._compiled.get(signature)
        if compiled is None:
            lowered = self._jit(jax.tree.unflatten(tree, shardings)).lower(
                *jax.tree.unflatten(tree, abstract))
            compiled = self._compiled[signature] = lowered.compile()
        return compiled(*jax.tree.unflatten(tree, leaves))


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _put(x, sharding: NamedSharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if _is_key(x):
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding),
                                        impl=jax.random.key_impl(x))
    if jax.process_count() > 1:
        x = np.asarray(x)  # the same value on every process: each places its copies
    return jax.device_put(x, sharding)


def replicate(tree: PyTree, plan: Plan) -> PyTree:
    """`tree` (host or device arrays, the same on every process) copied to every device
    of the mesh; unchanged without a mesh.

    Example:
      >>> state = replicate(alg.init(params), plan)
    """
    sharding = replicated(plan)
    return tree if sharding is None else jax.tree.map(lambda x: _put(x, sharding), tree)


def shard_clients(tree: PyTree, plan: Plan) -> PyTree:
    """Stacked client arrays `[clients, ...]` (one process) split over the mesh's devices,
    each device getting its contiguous share; unchanged without a mesh or when the
    number of clients is not a multiple of the device count (the round then pads and
    splits them itself).
    """
    sharding = cohort_sharding(plan)
    if sharding is None or _leading_size(tree) % num_shards(plan):
        return tree
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def local_slots(num_clients: int, plan: Plan) -> range:
    """The cohort slots held by this process's devices, for `num_clients` (a multiple of
    the device count) split with `cohort_sharding(plan)`; every slot without a mesh.

    Example:
      >>> local_slots(8, plan)        # 2 processes x 2 devices: range(0, 4) on process 0
    """
    if plan.mesh is None:
        return range(num_clients)
    if num_clients % num_shards(plan):
        raise ValueError(f"{num_clients} clients do not split evenly over "
                         f"{num_shards(plan)} devices; pad the cohort first")
    sharding = cohort_sharding(plan)
    assert sharding is not None  # a mesh was given
    held = sharding.addressable_devices_indices_map((num_clients,)).values()
    rows = sorted({i for index in held if index is not None
                   for i in range(num_clients)[index[0]]})
    if not rows or rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError("this process's devices do not hold one contiguous share of the "
                         "cohort; build the mesh with client_mesh() over jax.devices()")
    return range(rows[0], rows[-1] + 1)


def global_clients(local: PyTree, plan: Plan, num_clients: int) -> PyTree:
    """One global array per leaf, `[num_clients, ...]` split over the mesh's devices (of
    every process), from this process's share `local` (its `local_slots`, in order).

    Every process calls it with its own share; no data moves between processes.

    Example:
      >>> part = {"x": x_all[local_slots(8, plan)]}
      >>> full = global_clients(part, plan, 8)      # x_all, split over every device
    """
    sharding = cohort_sharding(plan)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x), (num_clients,) + np.shape(x)[1:]), local)


def local_copy(tree: PyTree) -> PyTree:
    """Arrays replicated over several devices (or processes) as single-device arrays on
    this process: for work that must not run on every device again, e.g. evaluation.

    Replicated arrays give their local copy; arrays split over this process's devices
    are gathered to the first one. Others are returned as they are.
    """
    def one(x):
        if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
            return x
        if x.is_fully_replicated:
            return x.addressable_data(0)
        if x.is_fully_addressable:
            return jax.device_put(x, jax.local_devices()[0])
        raise ValueError("an array split over several processes has no local copy")
    return jax.tree.map(one, tree)


def _leading_size(tree: PyTree) -> int:
    sizes = {x.shape[0] for x in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"client inputs disagree on the number of clients: {sorted(sizes)}")
    return sizes.pop()


def map_clients(fn: Callable[[PyTree], PyTree], inputs: PyTree, plan: Plan = Plan(),
                gather_batches: bool = True) -> PyTree:
    """Applies the one-client `fn` to every client of `inputs` and stacks the results.

    `out[i] = fn(inputs[i])` for each client i. The result does not depend on
    `plan.chunk_size` or the mesh, up to floating-point reassociation inside `vmap`
    and across devices.

    Args:
      fn: maps one client's inputs (leaves without the `clients` axis) to a pytree.
      inputs: pytree whose leaves are `[clients, ...]`; an `IndexedBatches` in it
        (device-resident data) reaches `fn` gathered, as a feature dict. When the
        cohort is not a multiple of the chunk size (or, with a mesh, of the device
        count) it is padded with zero-filled clients, whose outputs are dropped; `fn`
        must accept an all-zero input (an all-False mask).
      plan: execution plan.
      gather_batches: with False, an `IndexedBatches` reaches `fn` as it is, with the
        client's own `[steps, batch]` index, for kernels that read one step at a time
        with `data.device.step_batch` (`client.ClientContext.loop` does): each step's
        rows are then gathered straight from the population, without first copying the
        chunk's batches (about 5 % of a small MLP's round).

    Returns:
      Pytree of `[clients, ...]` leaves (with a mesh, split over its devices).

    Example:
      >>> out = map_clients(lambda c: c["x"].sum(), {"x": jnp.ones((5, 3))}, Plan(chunk_size=2))
      >>> out
      Array([3., 3., 3., 3., 3.], dtype=float32)
    """
    return run_clients(lambda c, _: ((), fn(c), None), inputs, plan,
                       gather_batches=gather_batches).stacked


def sum_clients(fn: Callable[[PyTree], PyTree], inputs: PyTree, plan: Plan = Plan(),
                gather_batches: bool = True) -> PyTree:
    """`sum_i fn(inputs[i])` over the cohort's clients, without stacking the outputs.

    Where `map_clients` keeps one output per client (`[clients, ...]`, which grows with
    the cohort: 1,000 clients of a 1.2M-parameter CNN stack 4.8 GB of deltas), this adds
    each chunk's outputs into a running total carried by a `lax.scan` over the chunks, so
    memory holds one chunk's outputs and one total. With a mesh, every device sums its
    share and one `psum` adds the devices' totals. Padding clients (added when the cohort
    is not a multiple of the chunk size or device count) do not count.

    The total equals `jax.tree.map(lambda y: y.sum(0), map_clients(fn, inputs, plan))` up
    to floating-point summation order (chunk by chunk here).

    Args:
      fn: maps one client's inputs (leaves without the `clients` axis) to a pytree of
        arrays to add up, e.g. `(n_i * delta_i, n_i)`.
      inputs: pytree whose leaves are `[clients, ...]` (an `IndexedBatches` in it reaches
        `fn` gathered, as in `map_clients`).
      plan: execution plan.
      gather_batches: as in `map_clients`.

    Returns:
      A pytree shaped like one client's output (replicated over the mesh, if any).

    Example:
      >>> sum_clients(lambda c: c["x"].sum(), {"x": jnp.ones((5, 3))}, Plan(chunk_size=2))
      Array(15., dtype=float32)

    References:
      McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
      Decentralized Data" (the server's weighted sum of client updates, Algorithm 1).
    """
    return run_clients(lambda c, _: (fn(c), (), None), inputs, plan,
                       gather_batches=gather_batches).total


class ClientsRun(NamedTuple):
    """What `run_clients` returns.

    Attributes:
      total: the sum over the real clients of the `summed` outputs (shaped like one).
      stacked: the `stacked` outputs, `[clients, ...]` leaves (split over the mesh, if any).
      table: the per-client table with the clients' rows rewritten (None without one).
    """

    total: PyTree
    stacked: PyTree
    table: PyTree


STACKED_ROWS_BYTES = 256 * 2**20
"""Up to this size, a cohort's new per-client rows are stacked and written after the loop
over chunks; above it they are written inside the loop (memory bounded by one chunk).
Writing inside the loop makes XLA:CPU carry the whole table through it, which costs time:
SCAFFOLD with the EMNIST CNN, 10 clients a round, 1.86 s stacked against 2.68 s carried."""


def _row_bytes(table: PyTree) -> int:
    return sum(x.dtype.itemsize * (x.size // max(x.shape[0], 1)) for x in jax.tree.leaves(table))


NO_ROW = np.iinfo(np.int32).max
"""A row index past the end of every table: reads clamp to the last row, writes are dropped."""


def run_clients(fn: Callable[[PyTree, PyTree], tuple[PyTree, PyTree, PyTree]], inputs: PyTree,
                plan: Plan = Plan(), *, table: PyTree = None, rows=None,
                gather_batches: bool = True) -> ClientsRun:
    """Runs the one-client `fn` over a cohort: sums some outputs, stacks others, and
    rewrites each client's row of a per-client table. The core of every round.

    For each client i: `summed_i, stacked_i, new_row_i = fn(inputs[i], table[rows[i]])`;
    then `total = sum_i summed_i` (a running sum carried chunk by chunk, so its memory
    does not grow with the cohort), `stacked = [stacked_i]`, and `table[rows[i]] =
    new_row_i`. Without a mesh the rows are read and written inside the loop over chunks,
    so a round holds one chunk of rows; with a mesh each device sums its share (one
    `psum`), and the new rows come back split over the devices before being written.

    Args:
      fn: `fn(client, row) -> (summed, stacked, new_row)` for ONE client: `client` its
        leaves of `inputs`, `row` its row of `table` (None without a table); `new_row`
        shaped like `row` (None without a table). Any output may be an empty tuple.
      inputs: pytree whose leaves are `[clients, ...]` (an `IndexedBatches` in it
        reaches `fn` as in `map_clients`).
      plan: execution plan.
      table: pytree of `[capacity, ...]` leaves, or None.
      rows: `Int[Array, "clients"]`, each client's row of `table`; `NO_ROW` (or any row
        past the end) for a client without one: it reads the last row and its write is
        dropped.
      gather_batches: as in `map_clients`.

    Returns:
      `ClientsRun(total, stacked, table)`. Padding clients (added to fill a chunk or a
      device's share) add nothing and are dropped.

    Example:
      >>> run = run_clients(lambda c, r: (c["x"].sum(), c["x"][0], r + 1),
      ...                   {"x": jnp.ones((2, 3))}, table=jnp.zeros(4), rows=jnp.array([3, 1]))
      >>> run.total, run.table
      (Array(6., dtype=float32), Array([0., 1., 0., 1.], dtype=float32))
    """
    _check_plan(plan)
    convert, inputs = split_indexed(lambda c: c, inputs, gather_batches)

    def one(client, row):
        return fn(convert(client), row)

    n = _leading_size(inputs)
    if table is not None:
        rows = jnp.asarray(rows, jnp.int32)
    if plan.mesh is None:
        if table is None or _row_bytes(table) * n > STACKED_ROWS_BYTES:
            return _run_chunks(one, inputs, rows, table, plan.chunk_size, n, 0, write=True)
        run = _run_chunks(one, inputs, rows, table, plan.chunk_size, n, 0, write=False)
        return ClientsRun(run.total, run.stacked,
                          jax.tree.map(lambda t, v: t.at[rows].set(v), table, run.table))
    d = num_shards(plan)
    share = -(-n // d)
    spec = PartitionSpec(CLIENTS)

    # check_vma=False: `fn` closes over replicated values (the global params), and with
    # varying-manual-axes checking on, the gradient of a replicated value taken inside the
    # body is summed over the devices (the transpose of its implicit cast to "varying" is
    # a `psum`), which would hand every client the cohort's summed gradient. The body's
    # only collective is the final psum, which does not depend on the check.
    def local(x, r, tab):
        first = jax.lax.axis_index(CLIENTS) * share
        run = _run_chunks(one, x, r, tab, plan.chunk_size, n, first, write=False)
        return jax.lax.psum(run.total, CLIENTS), run.stacked, run.table

    padded_rows = None if table is None else _pad_rows(rows, share * d - n)
    total, stacked, new_rows = jax.shard_map(
        local, mesh=plan.mesh, in_specs=(spec, spec, PartitionSpec()),
        out_specs=(PartitionSpec(), spec, spec), check_vma=False)(
            _pad_clients(inputs, share * d - n), padded_rows, table)
    if share * d != n:
        stacked = jax.tree.map(lambda y: y[:n], stacked)
    if table is not None:
        table = jax.tree.map(lambda t, v: t.at[padded_rows].set(v), table, new_rows)
    return ClientsRun(total, stacked, table)


def _check_plan(plan: Plan) -> None:
    if plan.chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {plan.chunk_size}")
    if plan.mesh is not None and CLIENTS not in plan.mesh.axis_names:
        raise ValueError(f"the mesh needs an axis named {CLIENTS!r}; it has "
                         f"{plan.mesh.axis_names} (build it with parallel.client_mesh)")


def _pad_clients(inputs: PyTree, pad: int) -> PyTree:
    if not pad:
        return inputs
    return jax.tree.map(
        lambda x: jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]), inputs)


def _pad_rows(rows, pad: int):
    if rows is None or not pad:
        return rows
    return jnp.concatenate([rows, jnp.full((pad,), NO_ROW, jnp.int32)])


def _run_chunks(one, inputs: PyTree, rows, table: PyTree, chunk_size: int, num_real: int,
                first, write: bool) -> ClientsRun:
    """One device's `m` clients, chunk by chunk (`lax.scan`), the clients of a chunk
    together (`vmap`; with chunks of 1, each client's loop runs to its own length).
    Client j of this share is real when `j < m` (not padding to a whole chunk) and
    `first + j < num_real` (not padding of the cohort to a multiple of the device count).
    With `write`, new rows go into the table inside the loop; otherwise they are stacked
    and returned in place of the table."""
    m = _leading_size(inputs)
    c = min(chunk_size, m)
    chunks = -(-m // c)
    inputs = _pad_clients(inputs, chunks * c - m)
    rows = _pad_rows(rows, chunks * c - m)
    j = jnp.arange(chunks * c)
    real = (j < m) & (first + j < num_real)  # not chunk padding, not cohort padding

    def split(x):
        return x.reshape((chunks, c) + x.shape[1:])

    xs = jax.tree.map(split, inputs)
    rs = None if table is None else split(rows)

    def read(tab, r):
        return None if tab is None else jax.tree.map(lambda t: t[r], tab)

    one_row = read(table, jnp.int32(0))
    summed0, _, _ = jax.eval_shape(one, jax.tree.map(lambda x: x[0, 0], xs), one_row)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), summed0)

    def body(carry, chunk):
        total, tab = carry
        x, ok, r = chunk
        values = read(tab, r)
        if c == 1:  # no vmap: each client's loop runs to its own length
            first_one = jax.tree.map(lambda v: v[0], (x, values))
            out = jax.tree.map(lambda y: y[None], one(*first_one))
        else:
            out = jax.vmap(one)(x, values)
        summed, stacked, new_rows = out
        total = jax.tree.map(
            lambda t, y: t + jnp.sum(jnp.where(ok.reshape((c,) + (1,) * (y.ndim - 1)), y,
                                               jnp.zeros((), y.dtype)), axis=0),
            total, summed)
        if tab is None:
            return (total, tab), stacked
        if write:
            return (total, jax.tree.map(lambda t, v: t.at[r].set(v), tab, new_rows)), stacked
        return (total, tab), (stacked, new_rows)

    (total, table_out), ys = jax.lax.scan(body, (zeros, table), (xs, real.reshape(chunks, c), rs))

    def unsplit(y):
        return y.reshape((chunks * c,) + y.shape[2:])[:m]

    if table is not None and not write:
        stacked, new_rows = jax.tree.map(unsplit, ys)
        return ClientsRun(total, stacked, new_rows)
    return ClientsRun(total, jax.tree.map(unsplit, ys), table_out)
