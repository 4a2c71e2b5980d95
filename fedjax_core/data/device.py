"""Device-resident data: the population's examples on the device once, cohorts as indices.

`pack.pack_cohort` copies every example of a round's cohort into dense arrays
`[clients, steps, batch, ...]` on the host, and the round copies them again to the
device: memory and transfers grow with the cohort (10,000 EMNIST-sized clients are
gigabytes a round). Here the examples of every client are concatenated once into device
arrays `[N + 1, ...]` (`device_examples`), and a cohort carries only where each slot
reads from, `IndexedBatches(source, index)` with `index` `Int32[clients, steps, batch]`
(`index_cohort`). `parallel.map_clients` gathers `source[k][index]` one chunk at a time
inside the jitted round, so the gathered batches exist for one chunk, not the cohort; with
`gather_batches=False` a kernel receives its client's index and reads each step's rows
itself (`step_batch`, as `client.local_train` does).

Row 0 of every source array is zeros; client i's examples are rows
`offsets[i] .. offsets[i] + sizes[i] - 1`; padded slots read row 0. The slot order
comes from `pack.positions`, the rule `pack_cohort` uses, so an indexed cohort gathers
to exactly the dense cohort's batches (padding included) and a round gives the same
numbers either way.
"""

import gc
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_core.data.federated_data import FederatedData
from fedjax_core.data.pack import Cohort, Counts, positions
from fedjax_core.data.sampling import SHUFFLE_STREAM, host_rng
from fedjax_core.typing import Array, PyTree


class DeviceExamples(NamedTuple):
    """Every example of a `FederatedData`, concatenated on the device.

    Attributes:
      features: feature name -> `[N + 1, ...]` device array; row 0 is zeros (what
        padded slots read), then each client's examples in client order.
      offsets: `Int[ndarray, "clients"]` (host), client i's first row.
      sizes: `Int[ndarray, "clients"]` (host), client i's number of examples.
    """

    features: dict[str, Array]
    offsets: np.ndarray
    sizes: np.ndarray

    @property
    def num_rows(self) -> int:
        """N + 1: every example and the zero row."""
        return int(next(iter(self.features.values())).shape[0])


class IndexedBatches(NamedTuple):
    """A cohort's batches as indices into device-resident examples; stands where
    `Cohort.batches` stands.

    `parallel.map_clients` splits it: `index` is mapped over clients like any per-client
    input, `source` is shared, and each chunk's batches are gathered
    (`source[k][index]`) right before the one-client kernel runs.

    Attributes:
      source: feature name -> `[N + 1, ...]` (row 0 zeros), e.g. `DeviceExamples.features`.
      index: `Int32[Array, "clients steps batch"]`, the source row of each slot (0 for
        padding).
    """

    source: dict[str, Array]
    index: np.ndarray | Array

    def gather(self) -> dict[str, Array]:
        """The dense batches, feature -> `[*index.shape, ...]` (`source[k][index]`)."""
        return gather(self)

    def __repr__(self) -> str:  # shapes, not the whole population
        def shape(x):
            return f"{np.dtype(x.dtype).name}{list(np.shape(x))}"
        source = ", ".join(f"{k!r}: {shape(v)}" for k, v in self.source.items())
        return f"IndexedBatches(source={{{source}}}, index={shape(self.index)})"


def gather(batches: "IndexedBatches | dict") -> dict:
    """Dense batches from `batches`: `{k: source[k][index]}` for `IndexedBatches`,
    `batches` itself for a dense dict.

    Args:
      batches: a `Cohort.batches` (either form), or one client's slice of it.

    Returns:
      feature name -> array of shape `index.shape + feature shape`.

    Example:
      >>> gather(cohort.batches)["x"].shape   # [clients, steps, batch, ...]
    """
    if isinstance(batches, IndexedBatches):
        index = jnp.asarray(batches.index)
        return {k: jnp.take(v, index, axis=0, mode="clip") for k, v in batches.source.items()}
    return batches


def feature_names(batches: "IndexedBatches | dict") -> list[str]:
    """The feature names of `Cohort.batches`, dense or indexed."""
    return list(batches.source if isinstance(batches, IndexedBatches) else batches)


def device_examples(data: FederatedData, device=None) -> DeviceExamples:
    """Concatenates every client's examples (after a zero row) and puts them on the device.

    Reads each client once and fills one host buffer per feature, so the host holds the
    population once more while the arrays are copied (on a CPU backend the device arrays
    live in host memory too).

    Args:
      data: the federated dataset; every client has the same features.
      device: a `jax.Device` or `jax.sharding.Sharding` for `jax.device_put`; None: the
        default device.

    Returns:
      The `DeviceExamples`.

    Example:
      >>> examples = device_examples(task.train.data)
      >>> cohort = index_cohort(examples, [3, 7], batch_size=20, epochs=1, seed=0, round_num=0)
    """
    sizes = np.asarray(data.client_sizes, np.int64)
    if sizes.size == 0:
        raise ValueError("device-resident data needs at least one client")
    total = int(sizes.sum())
    if total + 1 >= 2**31:
        raise ValueError(f"{total} examples do not fit an int32 index; keep the data on the "
                         "host (device_resident=False)")
    offsets = np.concatenate([[1], 1 + np.cumsum(sizes)[:-1]]).astype(np.int64)
    host: dict[str, np.ndarray] | None = None
    for i in range(len(sizes)):
        client = data.get_client(i)
        if host is None:
            host = {k: np.zeros((total + 1,) + np.shape(v)[1:], np.asarray(v).dtype)
                    for k, v in client.items()}
        if set(client) != set(host):
            raise ValueError(f"client {i} has features {sorted(client)}, the first client "
                             f"{sorted(host)}; every client needs the same features")
        for k, v in client.items():
            v = np.asarray(v)
            if len(v) != sizes[i]:
                raise ValueError(f"client {i}: feature {k!r} has {len(v)} examples but "
                                 f"client_sizes says {sizes[i]}")
            host[k][offsets[i]:offsets[i] + sizes[i]] = v
    assert host is not None  # there is at least one client
    features = {k: jax.device_put(v, device) for k, v in host.items()}
    jax.block_until_ready(features)
    # jax.device_put leaves its numpy source in a reference cycle (jax 0.10): without a
    # collection the host copy of the population outlives the call until the next gc.
    del host, client, v
    gc.collect()
    return DeviceExamples(features, offsets, sizes)


def index_clients(examples: DeviceExamples, indices: Counts, batch_size: int,
                  epochs: int = 1, rngs: Sequence[np.random.Generator | None] | None = None,
                  bucket: bool = True, steps: int | None = None,
                  max_steps: int | None = None) -> Cohort:
    """`pack.pack_clients` for the clients at `indices`, as an index into `examples`.

    Args:
      examples: the population on the device.
      indices: client positions, in slot order (recorded as `Cohort.client_index`).
      batch_size, epochs, rngs, bucket, steps, max_steps: as in `pack.pack_clients`.

    Returns:
      A `Cohort` whose `batches` is `IndexedBatches(examples.features, index)`; mask,
      `num_examples` and `client_index` are those `pack_clients` gives.
    """
    idx = np.asarray(indices, np.int64).reshape(-1)
    sizes = examples.sizes[idx]
    pos = positions(sizes, batch_size, epochs, rngs, bucket, steps, max_steps)
    mask = pos >= 0
    rows = np.where(mask, examples.offsets[idx][:, None, None] + pos, 0).astype(np.int32)
    return Cohort(batches=IndexedBatches(examples.features, rows), mask=mask,
                  num_examples=sizes.astype(np.int32),
                  client_index=idx.astype(np.int32))


def index_cohort(examples: DeviceExamples, indices: Counts, batch_size: int,
                 epochs: int, seed: int, round_num: int, shuffle: bool = True,
                 bucket: bool = True, steps: int | None = None,
                 max_steps: int | None = None) -> Cohort:
    """`pack.pack_cohort` without copying examples: the same clients, slots, shuffles,
    step counts and mask, with `batches` an `IndexedBatches` into `examples`.

    Client slot `s` is shuffled by `host_rng(seed, round_num, SHUFFLE_STREAM, s)`, as in
    `pack_cohort`, so `gather(cohort.batches)` equals `pack_cohort(...).batches` bit for
    bit. There is no `transform`: examples on the device are not augmented per round.

    Args:
      examples: the population on the device (`device_examples(data)`).
      indices: client positions, in slot order.
      batch_size, epochs, seed, round_num, shuffle, bucket, steps, max_steps: as in
        `pack.pack_cohort`.

    Returns:
      A `Cohort` of `len(indices)` clients whose host part is `index`
      `[clients, steps, batch]` int32 and the mask.

    Example:
      >>> examples = device_examples(data)
      >>> cohort = index_cohort(examples, [2, 0], batch_size=3, epochs=1, seed=1, round_num=0)
      >>> np.array_equal(gather(cohort.batches)["x"],
      ...                pack_cohort(data, [2, 0], 3, 1, seed=1, round_num=0).batches["x"])
      True
    """
    n = len(indices)
    rngs = [host_rng(seed, round_num, SHUFFLE_STREAM, s) for s in range(n)] if shuffle else None
    return index_clients(examples, indices, batch_size, epochs, rngs, bucket, steps, max_steps)


def step_batch(batches: "IndexedBatches | dict", k) -> dict:
    """One step's batch of one client: `{name: x[k]}` of a dense feature dict, or the
    rows `source[name][index[k]]` of an `IndexedBatches` whose `index` is one client's
    `[steps, batch]` (gathered straight from the population, one step at a time).

    Example:
      >>> batch = step_batch(batches, k)    # inside a client's step loop
    """
    if isinstance(batches, IndexedBatches):
        rows = batches.index[k]
        return {name: jnp.take(v, rows, axis=0, mode="clip")
                for name, v in batches.source.items()}
    return jax.tree.map(lambda x: x[k], batches)


def split_indexed(fn, inputs: PyTree, gather_batches: bool = True):
    """Splits the `IndexedBatches` of `inputs` for a map over clients.

    Returns `(fn2, inputs2)`: `inputs2` is `inputs` with each `IndexedBatches` replaced
    by its `index` (a per-client input like any other), and `fn2(client)` gathers each
    index slice from its `source` (closed over) back into a feature dict before calling
    `fn`. Without `IndexedBatches`, `(fn, inputs)` unchanged.

    Example:
      >>> fn2, inputs2 = split_indexed(one_client, (cohort.batches, cohort.mask))
      >>> jax.lax.map(fn2, inputs2)   # what parallel.map_clients does with them
    """
    def is_indexed(x):
        return isinstance(x, IndexedBatches)

    leaves, treedef = jax.tree.flatten(inputs, is_leaf=is_indexed)
    if not any(is_indexed(x) for x in leaves):
        return fn, inputs
    sources = [x.source if is_indexed(x) else None for x in leaves]
    split = treedef.unflatten([x.index if is_indexed(x) else x for x in leaves])

    def gathered(client):
        parts = treedef.flatten_up_to(client)
        return fn(treedef.unflatten([
            part if src is None
            else gather(IndexedBatches(src, part)) if gather_batches
            else IndexedBatches(src, part)
            for part, src in zip(parts, sources)]))

    return gathered, split
