"""Packing a cohort of clients into fixed-shape arrays for one jitted round.

A client with `n` examples trained for `E` epochs at batch size `B` takes
`ceil(n * E / B)` steps, at most `max_steps`: each epoch is a fresh permutation of its
examples, the epochs are concatenated and cut into batches (the last one partial), and
the stream stops after `max_steps` batches, as FedJAX's `shuffle_repeat_batch` does. All
clients of a cohort are padded to one step count, rounded up to a bucket so that rounds reuse
compiled code; padded slots are masked.
"""

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from jaxtyping import Bool, Int

from fedjax_core.data.federated_data import ClientArrays, FederatedData
from fedjax_core.data.sampling import SHUFFLE_STREAM, TRANSFORM_STREAM, host_rng
from fedjax_core.typing import Array

if TYPE_CHECKING:  # it imports this module
    from fedjax_core.data.device import IndexedBatches

Counts = Sequence[int] | Int[np.ndarray, " clients"]
"""One integer per client (sizes, client positions): a sequence of ints or a 1-D int array."""

Transform = Callable[[ClientArrays, np.random.Generator], ClientArrays]
"""`transform(arrays, rng) -> arrays`: per-round host-side augmentation of one client."""


class Cohort(NamedTuple):
    """A packed cohort (numpy on the host; the jitted round takes it as is).

    Attributes:
      batches: feature -> `[clients, steps, batch, ...]`, zeros where masked; or, for
        data held on the device, a `fedjax_core.data.device.IndexedBatches` (the
        population's examples and an index `[clients, steps, batch]` into them) that
        each client's loop reads one step at a time (`data.device.step_batch`).
      mask: `Bool[ndarray, "clients steps batch"]`, True for real examples. Within a
        client, the non-empty steps come first.
      num_examples: `Int[ndarray, "clients"]`, each client's number of examples (its
        aggregation weight), not multiplied by the epochs.
      client_index: `Int[ndarray, "clients"]`, positions of the clients in their
        FederatedData (-1 for a padding client); an algorithm's per-client state is
        kept by these positions (`fedjax_core.client_state`).
      staleness: `Int[ndarray, "clients"]`, for an asynchronous run on the simulated
        clock (`fedjax_core.simtime`), how many server versions passed while each client
        trained (FedBuff reads it as `ClientContext.staleness`); None otherwise.
    """

    batches: "dict[str, np.ndarray] | dict[str, Array] | IndexedBatches"
    mask: Bool[np.ndarray | Array, "clients steps batch"]
    num_examples: Int[np.ndarray | Array, " clients"]
    client_index: Int[np.ndarray | Array, " clients"]
    staleness: Int[np.ndarray | Array, " clients"] | None = None

    @property
    def num_clients(self) -> int:
        return self.mask.shape[0]

    @property
    def num_steps(self) -> int:
        return self.mask.shape[1]


def step_bucket(steps: int) -> int:
    """Smallest bucket >= `steps` in 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ...

    Buckets are powers of two and 1.5 times powers of two, so a padded shape wastes
    less than a third of its slots (bucket < 1.5 x steps) and a run sees few distinct shapes.
    """
    if steps <= 1:
        return 1
    p = 1 << (steps - 1).bit_length()  # next power of two >= steps
    return p * 3 // 4 if p * 3 // 4 >= steps and p >= 4 else p


def num_steps(num_examples: int, batch_size: int, epochs: int,
              max_steps: int | None = None) -> int:
    """`min(ceil(num_examples * epochs / batch_size), max_steps)`."""
    steps = math.ceil(num_examples * epochs / batch_size)
    return steps if max_steps is None else min(steps, max_steps)


def cohort_steps(sizes: Counts, batch_size: int, epochs: int = 1, bucket: bool = True,
                 max_steps: int | None = None) -> int:
    """Steps of a cohort packed without a fixed `steps`: `bucket(max_i min(ceil(n_i E / B),
    max_steps))`, at least 1 (what `positions` and `pack_clients` pad to).

    Example:
      >>> cohort_steps([45, 3], batch_size=10)   # 5 steps, bucketed to 6
      6
    """
    needed = max([1] + [num_steps(int(n), batch_size, epochs, max_steps) for n in sizes])
    return step_bucket(needed) if bucket else needed


def positions(sizes: Counts, batch_size: int, epochs: int = 1,
              rngs: Sequence[np.random.Generator | None] | None = None, bucket: bool = True,
              steps: int | None = None, max_steps: int | None = None) -> np.ndarray:
    """Where each slot of a packed cohort reads from: the packing rule without the data.

    Client i's stream is `E` permutations of `range(n_i)` (drawn from `rngs[i]`, or the
    stored order when `rngs` is None), concatenated, cut after `steps * B` slots, and
    written into its first slots; the rest are -1. `pack_clients` gathers each client's
    arrays at these positions on the host; `fedjax_core.data.device` adds each client's
    offset into the population's examples on the device. Both share this one rule, so
    they give the same batches.

    Args:
      sizes: each client's number of examples n_i.
      batch_size: examples per step B.
      epochs: passes over each client's data E.
      rngs: one generator per client for the per-epoch shuffles, or None (stored order);
        a client with no examples may have None.
      bucket: round the step count up with `step_bucket`.
      steps: pad every client to exactly this many steps; None: `bucket(max_i
        min(ceil(n_i E / B), max_steps))` for these clients.
      max_steps: stop each client after this many batches (None: no cap).

    Returns:
      `Int[ndarray, "clients steps batch"]` (int64): example positions within each
      client, -1 for padding slots. At least one step.

    Example:
      >>> positions([3, 1], batch_size=2, bucket=False).tolist()
      [[[0, 1], [2, -1]], [[0, -1], [-1, -1]]]
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    if len(sizes) == 0:
        raise ValueError("a cohort needs at least one client")
    needed = cohort_steps(sizes, batch_size, epochs, bucket=False, max_steps=max_steps)
    if steps is None:
        steps = step_bucket(needed) if bucket else needed
    elif steps < needed:
        raise ValueError(f"a client needs {needed} steps but the cohort is padded to {steps}")
    slots = steps * batch_size
    index = np.full((len(sizes), slots), -1, np.int64)
    for i, n in enumerate(sizes):
        n = int(n)
        if n == 0:
            continue
        if rngs is None:
            order = np.tile(np.arange(n), epochs)
        else:
            rng = rngs[i]
            if rng is None:
                raise ValueError(f"client {i} has {n} examples but no generator (rngs[{i}] is "
                                 "None); only a client with no examples may have none")
            order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
        order = order[:slots]  # max_steps cuts the stream
        index[i, :len(order)] = order
    return index.reshape(len(sizes), steps, batch_size)


def pack_clients(clients: Sequence[ClientArrays], batch_size: int, epochs: int = 1,
                 rngs: Sequence[np.random.Generator | None] | None = None,
                 bucket: bool = True, client_index: Counts | None = None,
                 steps: int | None = None, max_steps: int | None = None) -> Cohort:
    """Packs the given clients' arrays into a `Cohort`.

    Args:
      clients: one dict of arrays per client, all with the same feature names.
      batch_size: examples per step B.
      epochs: passes over each client's data E.
      rngs: one generator per client for the per-epoch shuffles, or None to keep
        the stored order (evaluation, tests); a client with no examples may have None.
      bucket: round the step count up with `step_bucket`.
      client_index: positions recorded in `Cohort.client_index` (default 0..n-1).
      steps: pad every client to exactly this many steps (e.g. the bucket of the
        largest client of the whole dataset, so that every round has one shape);
        None: `bucket(max_i ceil(n_i E / B))` for this cohort.
      max_steps: stop each client after this many batches (None: no cap). The
        client's weight stays its number of examples, as in FedJAX.

    Returns:
      The `Cohort`, with at least one step.

    Example:
      >>> c = pack_clients([{"x": np.arange(5.0)}], batch_size=2)
      >>> c.batches["x"][0], c.mask[0]
      (array([[0., 1.], [2., 3.], [4., 0.]]), array([[ True,  True], [ True,  True], [ True, False]]))
    """
    sizes = [len(next(iter(c.values()))) for c in clients]
    pos = positions(sizes, batch_size, epochs, rngs, bucket, steps, max_steps)
    mask = pos >= 0
    index = pos.reshape(len(clients), -1)
    flat_mask = mask.reshape(len(clients), -1)
    batches = {}
    for name in clients[0]:
        first = np.asarray(clients[0][name])
        out = np.zeros(index.shape + first.shape[1:], first.dtype)
        for i, c in enumerate(clients):
            m = flat_mask[i]
            if m.any():
                out[i, m] = np.asarray(c[name])[index[i, m]]
        batches[name] = out.reshape(pos.shape + first.shape[1:])
    if client_index is None:
        client_index = range(len(clients))
    return Cohort(
        batches=batches,
        mask=mask,
        num_examples=np.asarray(sizes, np.int32),
        client_index=np.asarray(client_index, np.int32),
    )


def pack_cohort(data: FederatedData, indices: Counts, batch_size: int, epochs: int,
                seed: int, round_num: int, shuffle: bool = True, bucket: bool = True,
                steps: int | None = None, max_steps: int | None = None,
                transform: Transform | None = None, first_slot: int = 0) -> Cohort:
    """Reads the clients at `indices` and packs them, shuffled per epoch.

    The shuffle of the client in cohort slot `s` is drawn from
    `host_rng(seed, round_num, SHUFFLE_STREAM, s)`: the same (seed, round) always gives
    the same batches, whatever the chunk size or device count.

    Args:
      data: the federated dataset.
      indices: client positions, in slot order (e.g. from a sampler).
      batch_size: examples per step.
      epochs: local epochs.
      seed: experiment seed.
      round_num: round index.
      shuffle: shuffle each epoch (True for training).
      bucket: round step counts up to buckets.
      steps: a fixed step count for every client (see `pack_clients`).
      max_steps: cap on each client's steps (see `pack_clients`).
      transform: augmentation applied to each client before packing (e.g. random crops),
        with the generator `host_rng(seed, round_num, TRANSFORM_STREAM, s)`; every epoch
        of the round sees the same transformed examples.
      first_slot: the cohort slot of `indices[0]` (its shuffle and transform streams),
        for packing one contiguous share of a larger cohort (a process of a
        multi-process run packs its devices' slots).

    Returns:
      A `Cohort` of `len(indices)` clients.
    """
    clients = [data.get_client(int(i)) for i in indices]
    if transform is not None:
        clients = [transform(c, host_rng(seed, round_num, TRANSFORM_STREAM, s))
                   for s, c in enumerate(clients, start=first_slot)]
    rngs = ([host_rng(seed, round_num, SHUFFLE_STREAM, first_slot + s)
             for s in range(len(clients))] if shuffle else None)
    return pack_clients(clients, batch_size, epochs, rngs, bucket, client_index=indices,
                        steps=steps, max_steps=max_steps)


def padded_fraction(cohort: Cohort, batch_size: int, epochs: int, chunk_size: int = 1,
                    max_steps: int | None = None) -> float:
    """Fraction of the steps computed for `cohort` that train on no real example.

    Clients run in chunks of `chunk_size` (see `parallel.map_clients`); a chunk runs as
    many steps as its longest client, so every client of the chunk computes that many.
    With `chunk_size=1` no padded step is computed (0.0), however the arrays are padded.
    """
    real = [num_steps(int(n), batch_size, epochs, max_steps) for n in cohort.num_examples]
    computed = sum(chunk_size * max(real[i:i + chunk_size]) for i in range(0, len(real), chunk_size))
    return 1.0 - sum(real) / max(computed, 1)


def fixed_steps(data: FederatedData, cohort_size: int, batch_size: int, epochs: int,
                max_bytes: int, max_steps: int | None = None) -> int | None:
    """One step count that fits every client of `data`, if such cohorts stay small.

    Padding every round to `bucket(steps of the largest client)` gives every round
    the same shape, so the round compiles once per run. Clients trained one by one
    (chunk size 1) compute only their own steps, so the padding costs memory and
    host copies, not compute. Returns None (pad each cohort to its own bucket) when
    a cohort padded that way would exceed `max_bytes`.
    """
    sizes = np.asarray(data.client_sizes)
    if sizes.size == 0 or sizes.max() == 0:
        return None
    steps = step_bucket(num_steps(int(sizes.max()), batch_size, epochs, max_steps))
    first = data.get_client(int(np.argmax(sizes)))
    per_example = sum(np.asarray(a)[:1].nbytes for a in first.values()) + 1  # + mask
    if cohort_size * steps * batch_size * per_example > max_bytes:
        return None
    return steps


def pad_cohort(cohort: Cohort, num_clients: int) -> Cohort:
    """Appends padding clients (no examples, all-False mask, `client_index` -1) up to
    `num_clients`, e.g. to bring a Poisson-sampled cohort to its size bucket so that
    rounds reuse compiled code. Padding clients have weight 0: they change nothing.

    Example:
      >>> pad_cohort(cohort, step_bucket(cohort.num_clients)).num_clients
    """
    pad = num_clients - cohort.num_clients
    if pad < 0:
        raise ValueError(f"cannot pad a cohort of {cohort.num_clients} clients to {num_clients}")
    if pad == 0:
        return cohort

    def extend(x, fill=0):
        return np.concatenate([x, np.full((pad,) + x.shape[1:], fill, x.dtype)])

    from fedjax_core.data.device import IndexedBatches  # device.py imports this module

    batches = cohort.batches
    if isinstance(batches, IndexedBatches):  # padding slots read row 0, masked off
        batches = batches._replace(index=extend(np.asarray(batches.index)))
    else:
        batches = {k: extend(v) for k, v in batches.items()}
    return cohort._replace(
        batches=batches,
        mask=extend(cohort.mask, False), num_examples=extend(cohort.num_examples),
        client_index=extend(cohort.client_index, -1))
