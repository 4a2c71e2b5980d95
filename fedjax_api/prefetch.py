"""Host work of the next rounds in a background thread, while the device runs this one.

Sampling, reading and packing a cohort is numpy work on the host. `Prefetcher` runs
`make(r)` for the rounds ahead in one daemon thread, at most `depth` rounds ahead, and
hands them out in order. It keeps count of how long the thread worked (`host_s`) and how
long the consumer waited for it (`wait_s`): the difference is host time hidden behind
the device (and behind the consumer's own work: logging, evaluation, checkpoints).
"""

import queue
import threading
import time
from typing import Any, Callable, Generic, TypeVar

import jax

from fedjax_core import parallel
from fedjax_core.data import Cohort
from fedjax_core.parallel import Plan

T = TypeVar("T")

_DONE = object()


class Prefetcher(Generic[T]):
    """Produces `make(start), make(start + 1), ..., make(stop - 1)` ahead in a thread.

    Items come out in round order; an exception raised by `make` is raised again by the
    `get` that would have returned its item. Use as a context manager, or call `close`.

    Args:
      make: `make(round_num) -> item`; must depend on `round_num` only (it runs on
        another thread, in advance).
      start: first round.
      stop: one past the last round.
      depth: how many items may wait ready (1 = the next round only).

    Example:
      >>> with Prefetcher(lambda r: dataset.sample(10, r), 0, 100) as cohorts:
      ...     for r in range(100):
      ...         server = server.step(cohorts.get(r))
      >>> cohorts.hidden_fraction  # share of the host's packing time nobody waited for
    """

    def __init__(self, make: Callable[[int], T], start: int, stop: int, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._make = make
        self._next = start
        self._stop_round = stop
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closing = threading.Event()
        self.host_s = 0.0
        """Seconds the thread spent in `make`."""
        self.wait_s = 0.0
        """Seconds `get` blocked waiting for the thread."""
        self.items = 0
        self._thread = threading.Thread(target=self._work, args=(start,), daemon=True,
                                        name="fedjax-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._closing.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, start: int) -> None:
        for r in range(start, self._stop_round):
            if self._closing.is_set():
                return
            t = time.perf_counter()
            try:
                item = (r, self._make(r), None)
            except BaseException as e:  # handed to the consumer, raised there
                item = (r, None, e)
            self.host_s += time.perf_counter() - t
            if not self._put(item) or item[2] is not None:
                return
        self._put((self._stop_round, _DONE, None))

    def get(self, round_num: int) -> T:
        """The item of `round_num`, which must be the next round in order."""
        if round_num != self._next:
            raise ValueError(f"prefetcher expected round {self._next}, got {round_num}")
        t = time.perf_counter()
        r, item, error = self._queue.get()
        self.wait_s += time.perf_counter() - t
        if error is not None:
            raise error
        if item is _DONE:
            raise ValueError(f"round {round_num} is past the prefetched range")
        self._next += 1
        self.items += 1
        return item

    @property
    def hidden_s(self) -> float:
        """Host seconds that overlapped other work: `max(host_s - wait_s, 0)`."""
        return max(self.host_s - self.wait_s, 0.0)

    @property
    def hidden_fraction(self) -> float:
        """`hidden_s / host_s` (1.0 when no host time was spent)."""
        return self.hidden_s / self.host_s if self.host_s > 0 else 1.0

    def close(self) -> None:
        """Stops the thread (after the item it is making) and drops what is queued."""
        self._closing.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=60)

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def to_device(cohort: Any, plan: Plan) -> Any:
    """`cohort`'s examples, mask and weights copied to the devices its round reads them on:
    split over the mesh's devices (`parallel.shard_clients`), or on the default device.
    Called in the prefetch thread, so the host-to-device copy of the next cohort overlaps
    the current round instead of being made when the round is dispatched. The values are
    unchanged (the round's results are bit-identical); `client_index` stays on the host,
    where the per-client stores are fitted to it. Anything but a `Cohort` is returned as
    it is.

    Example:
      >>> Prefetcher(lambda r: to_device(train.sample(10, r), plan), 0, rounds)
    """
    if not isinstance(cohort, Cohort):
        return cohort
    heavy = (cohort.batches, cohort.mask, cohort.num_examples)
    if plan.mesh is not None:
        if not isinstance(cohort.batches, dict):  # indexed: the source is placed already
            return cohort
        batches, mask, n = parallel.shard_clients(heavy, plan)
    else:
        batches, mask, n = jax.device_put(heavy)
    return cohort._replace(batches=batches, mask=mask, num_examples=n)
