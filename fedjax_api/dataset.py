"""`FederatedDataset`: a `FederatedData` with how it is batched and sampled."""

import os

import attrs
import numpy as np

from fedjax_api import labels
from fedjax_api.errors import ConfigError
from fedjax_core import parallel
from fedjax_core.data import Cohort, FederatedData, pack_cohort, uniform_without_replacement
from fedjax_core.data.device import DeviceExamples, IndexedBatches, device_examples, index_cohort
from fedjax_core.data.pack import (
    Transform,
    cohort_steps,
    fixed_steps,
    num_steps,
    pad_cohort,
    step_bucket,
)
from fedjax_core.data.sampling import poisson
from fedjax_core.parallel import Plan


def physical_memory() -> int:
    """This machine's memory in bytes (0 when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _positive(instance, attribute, value):
    if value < 1:
        raise ConfigError(f"{attribute.name} must be at least 1, got {value}")


def _non_negative(instance, attribute, value):
    if value < 0:
        raise ConfigError(f"{attribute.name} must be non-negative, got {value}")


def _no_transform_on_device(instance, attribute, value):
    if value and instance.transform is not None:
        raise ConfigError("device_resident data cannot be augmented per round (transform): "
                          "drop the transform or keep the data on the host "
                          "(device_resident=False)")


def all_padding(cohort: Cohort) -> Cohort:
    """`cohort` with every slot turned into an empty client (zero examples, weight 0,
    `client_index` -1), keeping its shapes; indexed slots read row 0, the zero row."""
    batches = (cohort.batches._replace(index=np.zeros_like(cohort.batches.index))
               if isinstance(cohort.batches, IndexedBatches) else
               {k: np.zeros_like(v) for k, v in cohort.batches.items()})
    return cohort._replace(batches=batches, mask=np.zeros_like(cohort.mask),
                           num_examples=np.zeros_like(cohort.num_examples),
                           client_index=np.full_like(cohort.client_index, -1))


@attrs.frozen(kw_only=True)
class FederatedDataset:
    """A federated dataset ready for training rounds.

    Attributes:
      data: the clients (any `fedjax_core.data.FederatedData`).
      batch_size: examples per local step.
      epochs: local epochs per round.
      seed: seeds client sampling and per-epoch shuffles.
      max_steps: cap on local steps per client and round (None: no cap).
      device_resident: keep every example on the device and sample cohorts as indices.

    Example:
      >>> cohort = task.train.sample(clients=10, round=3)   # same clients and batches every time
    """

    data: FederatedData
    batch_size: int = attrs.field(validator=_positive)
    epochs: int = attrs.field(default=1, validator=_positive)
    seed: int = attrs.field(default=0, validator=_non_negative)
    max_steps: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive))
    """Cap on each client's local steps per round (FedJAX's `num_steps`); None: no cap."""
    transform: Transform | None = attrs.field(default=None, eq=False)
    """Per-round augmentation of each sampled client (e.g. CIFAR's random crops)."""
    max_cohort_bytes: int = attrs.field(default=256 * 2**20, validator=_positive)
    """Pad every cohort to the largest client's step bucket (one compiled shape per run)
    while a cohort padded that way stays under this size; else bucket each cohort."""
    device_resident: bool = attrs.field(default=False, validator=_no_transform_on_device)
    """Put every example on the device once (at the first cohort) and make cohorts whose
    `batches` is an `IndexedBatches` (an index `[clients, steps, batch]` into them): the
    host packs and sends an index, not the examples, so a round's memory does not grow
    with the cohort's examples. Same clients, batches and results as the dense cohorts.
    Needs the population to fit on the device; no `transform`."""
    num_classes: int | None = attrs.field(default=None, eq=False)
    """Check each packed cohort's labels ("y") against `0 .. num_classes - 1`
    (`fedjax_api.labels`); None: unchecked (e.g. data in memory, checked when built)."""
    _steps_cache: dict = attrs.field(init=False, factory=dict, eq=False, repr=False)
    _device_cache: dict = attrs.field(init=False, factory=dict, eq=False, repr=False)

    @property
    def num_clients(self) -> int:
        return len(self.data.client_ids)

    @property
    def num_examples(self) -> int:
        return int(np.sum(self.data.client_sizes))

    @property
    def device_examples(self) -> DeviceExamples:
        """Every example on the device (`fedjax_core.data.device.device_examples`), put
        there at the first call and kept."""
        if "examples" not in self._device_cache:
            examples = device_examples(self.data)
            if self.num_classes and labels.LABEL in examples.features:
                labels.check_rows(examples.features[labels.LABEL], examples.offsets, self.data,
                                  self.num_classes)
            self._device_cache["examples"] = examples
        return self._device_cache["examples"]

    def place_examples(self, plan: Plan) -> None:
        """Puts the device-resident examples (`device_examples`) where the rounds of `plan`
        read them, once: replicated on every device of its mesh (each device gathers its
        own clients' batches), so that no round copies them again. No-op without a mesh
        or without `device_resident`.

        Example:
          >>> train.place_examples(Plan(mesh=client_mesh(8)))   # one copy per device
        """
        if not self.device_resident or plan.mesh is None:
            return
        examples = self.device_examples
        self._device_cache["examples"] = examples._replace(
            features=parallel.replicate(examples.features, plan))

    def with_seed(self, seed: int) -> "FederatedDataset":
        """The same dataset with another sampling/shuffling seed, sharing this one's
        examples on the device (`device_examples`) and its step-count cache.

        Example:
          >>> rows = [task.train.with_seed(s) for s in (0, 1, 2)]   # one device copy
        """
        other = attrs.evolve(self, seed=seed)
        other._steps_cache.update(self._steps_cache)
        other._device_cache.update(self._device_cache)
        return other

    def sample(self, clients: int, round: int) -> Cohort:  # noqa: A002 - reads like the paper
        """Samples `clients` clients uniformly without replacement for `round` and packs them.

        The sampled clients take the cohort's slots largest first (`by_size`), so that
        clients trained together under `vmap` have similar step counts."""
        return self.cohort(self.sample_indices(clients, round), round)

    def sample_indices(self, clients: int, round: int) -> np.ndarray:  # noqa: A002
        """The positions `sample` packs, in slot order (`by_size`): the same for the same
        seed and round, on every process."""
        if not 1 <= clients <= self.num_clients:
            raise ConfigError(
                f"clients per round must be between 1 and the {self.num_clients} clients "
                f"of this dataset, got {clients}")
        idx = uniform_without_replacement(self.num_clients, clients, self.seed, round)
        return self.by_size(idx)

    def by_size(self, indices) -> np.ndarray:
        """`indices` ordered by client size, largest first (ties keep their order).

        Under `vmap` a chunk of clients runs as many steps as its largest client, so
        grouping similar sizes cuts the padded steps computed: for cohorts of 100
        EMNIST-like clients (lognormal sizes, mean 228, batch 20) in chunks of 10, the
        median padded fraction falls from 54% (draw order) to 16%. The set of clients,
        and so the sampling distribution, is unchanged; only their slots (and with them
        their keys and shuffles) follow from the sizes."""
        idx = np.asarray(indices, np.int64)
        sizes = np.asarray(self.data.client_sizes)[idx]
        return idx[np.argsort(-sizes, kind="stable")]

    def sample_poisson(self, rate: float, round: int) -> Cohort:  # noqa: A002
        """Poisson sampling for `round`: each client takes part independently with
        probability `rate` (what the privacy accountants assume). The cohort, of random
        size `Binomial(N, rate)`, is padded with empty clients (weight 0, `client_index`
        -1) up to its size bucket (`step_bucket`), so that rounds share few shapes."""
        idx, size = self.poisson_indices(rate, round)
        if len(idx) == 0:  # nobody this round: client 0 gives the shapes, then emptied
            return all_padding(self.cohort([0], round, pad_to=size))
        return self.cohort(idx, round, pad_to=size)

    def poisson_indices(self, rate: float, round: int) -> tuple[np.ndarray, int]:  # noqa: A002
        """The positions `sample_poisson` packs, in slot order, and the cohort size it pads
        them to (`step_bucket` of their number)."""
        if not 0 < rate <= 1:
            raise ConfigError(f"the Poisson sampling rate must be in (0, 1], got {rate}")
        idx = self.by_size(poisson(self.num_clients, rate, self.seed, round))
        return idx, step_bucket(max(len(idx), 1))

    def cohort(self, indices, round: int, pad_to: int | None = None,  # noqa: A002
               slots: range | None = None) -> Cohort:
        """Packs the clients at `indices` (positions) for `round`, padded with empty
        clients up to `pad_to` clients when given (indexed when `device_resident`).
        With `slots` (a range of slot numbers), only those slots of that cohort, as a
        process of a multi-process run packs its devices' share."""
        n = len(indices) if pad_to is None else pad_to
        if n not in self._steps_cache:
            self._check_memory(n, exact=pad_to is None, probe=indices)
            self._steps_cache[n] = fixed_steps(self.data, n, self.batch_size, self.epochs,
                                               self.max_cohort_bytes, self.max_steps)
        steps = self._steps_cache[n]
        if slots is not None:
            return self._slots_cohort(indices, round, n, steps, slots)
        if self.device_resident:
            cohort = index_cohort(self.device_examples, indices, self.batch_size, self.epochs,
                                  self.seed, round, steps=steps, max_steps=self.max_steps)
        else:
            cohort = pack_cohort(self.data, indices, self.batch_size, self.epochs, self.seed,
                                 round, steps=steps, max_steps=self.max_steps,
                                 transform=self.transform)
            if self.num_classes:
                labels.check_cohort(cohort, self.data, self.num_classes)
        return cohort if pad_to is None else pad_cohort(cohort, pad_to)

    def _check_memory(self, n: int, exact: bool, probe) -> None:
        """Refuses (one line, before anything is allocated) a cohort of `n` clients that
        cannot fit in this machine's memory even at its smallest: every slot is padded to
        the batch size and to the steps of the cohort's largest client, who is at least as
        large as the n-th smallest client (`exact`: `n` real clients; else, a padded Poisson
        cohort, the smallest). An example's bytes are read from the cohort's first client
        (`probe[0]`), which packing reads anyway."""
        sizes = np.sort(np.asarray(self.data.client_sizes))
        if sizes.size == 0 or len(probe) == 0:
            return
        least = int(sizes[min(n, sizes.size) - 1] if exact else sizes[0])
        steps = max(num_steps(least, self.batch_size, self.epochs, self.max_steps), 1)
        if self.device_resident:
            per_example = 5  # an int32 index and the mask
        else:
            first = self.data.get_client(int(probe[0]))
            per_example = sum(np.asarray(a)[:1].nbytes for a in first.values()) + 1
        need, have = n * steps * self.batch_size * per_example, physical_memory()
        if have and need > have:
            raise ConfigError(
                f"a cohort of {n} clients x {steps} steps x batch {self.batch_size} needs at "
                f"least {need / 2**30:.1f} GiB, more than this machine's {have / 2**30:.1f} GiB; "
                "lower --batch-size, --clients-per-round, --epochs or --max-steps")

    def _slots_cohort(self, indices, round: int, n: int, steps: int | None,  # noqa: A002
                      slots: range) -> Cohort:
        """Only the slots `slots` (a range of `0 .. n-1`) of the cohort `cohort(indices,
        round, pad_to=n)` would pack, with the same batches: each slot's shuffle and
        transform follow its slot number, and the step count the whole cohort's. A process
        of a multi-process run packs the slots of its own devices this way
        (`fedjax_api.distributed.sample_cohort`)."""
        if self.device_resident:
            raise ConfigError("device_resident data cannot be split over several processes; "
                              "keep the data on the host (device_resident=False)")
        indices = np.asarray(indices, np.int64)
        if not (0 <= slots.start <= slots.stop <= n and slots.step == 1) or len(indices) > n:
            raise ValueError(f"slots {slots} do not lie in a cohort of {n} clients")
        if steps is None:  # the whole cohort's bucket, as pack_clients would choose it
            steps = cohort_steps(np.asarray(self.data.client_sizes)[indices], self.batch_size,
                                 self.epochs, max_steps=self.max_steps)
        real = indices[slots.start:min(slots.stop, len(indices))]
        cohort = pack_cohort(self.data, real if len(real) else [0], self.batch_size,
                             self.epochs, self.seed, round, steps=steps,
                             max_steps=self.max_steps, transform=self.transform,
                             first_slot=slots.start)
        if not len(real):  # only padding here: client 0 gave the shapes
            cohort = all_padding(cohort)
        elif self.num_classes:
            labels.check_cohort(cohort, self.data, self.num_classes)
        return pad_cohort(cohort, len(slots))

    def subset(self, num_clients: int, seed: int = 0, *,
               stream: int = 0xE7A1) -> "FederatedDataset":
        """A fixed random subset of `num_clients` clients (all if there are fewer), in
        population order; the same for the same `seed` and `stream` (a second sample of
        other clients: another `stream`)."""
        if num_clients >= self.num_clients:
            return self
        rng = np.random.default_rng([seed, stream])
        idx = np.sort(rng.choice(self.num_clients, num_clients, replace=False))
        return attrs.evolve(self, data=ClientSubset(self.data, idx))


class ClientSubset:
    """A view of some clients of a `FederatedData`."""

    def __init__(self, data: FederatedData, indices: np.ndarray):
        self._data = data
        self._idx = [int(i) for i in indices]

    @property
    def client_ids(self):
        ids = self._data.client_ids
        return tuple(ids[i] for i in self._idx)

    @property
    def client_sizes(self):
        return np.asarray(self._data.client_sizes)[self._idx]

    def get_client(self, index: int):
        return self._data.get_client(self._idx[index])

