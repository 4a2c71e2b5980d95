"""The simulated clock: each client's round time, the synchronous selection rules, and the
asynchronous (FedBuff) event timeline. Host side, vectorised numpy, deterministic from a seed.

Client i's time for s steps (`client_seconds`):

    t_i(s) = model_bits / download_bps_i  +  s * batch_size * compute_s_i  +  upload_bits / upload_bps_i

with `upload_bits` the aggregator's bits per client (`upload_bits`: 32 per parameter, or a
compression aggregator's message size), and s its local steps `min(ceil(n_i E / B), max_steps)`.

Synchronous round r (`SyncTimeline`), starting at clock T_r:

1. A = the clients available at T_r (if none, the clock waits for the first to come online).
2. Draw m = min(k, |A|) clients of A uniformly without replacement with the round's sampling
   generator (`host_rng(seed, r, SAMPLE_STREAM)`), k = K, or ceil(overcommit K) with
   over-commit. When every client is available this is the draw of
   `uniform_without_replacement`: the same cohorts as a run without simulated time.
3. The rule keeps clients and sets the round time D_r:
   - "all": keep all, D_r = max_i t_i;
   - "overcommit": keep the K that finish first (FedScale's rule; ties by draw order),
     D_r = the K-th finishing time;
   - "deadline" (deadline d): keep those with t_i <= d; D_r = d if one was dropped, else
     max_i t_i. With partial work, client i instead runs
     `s'_i = min(s_i, floor((d - comm_i) / step_i))` steps (dropped when s'_i < 1), and
     D_r = max_i t_i(s'_i) <= d; its steps beyond s'_i are masked off in the cohort, so
     every algorithm sees fewer steps (FedNova normalises by the steps it really ran).
4. T_{r+1} = T_r + D_r. The kept clients take the cohort's slots largest first (as
   `FederatedDataset.by_size` orders them).

Asynchronous training (`AsyncTimeline`, FedBuff; Nguyen et al. 2022): the server keeps C
clients in flight (the concurrency). At time 0 and whenever it steps it dispatches clients
drawn uniformly from those available and idle (generator `host_rng(seed, v, SAMPLE_STREAM)`
for dispatches on version v), each downloading the current version v and arriving after its
own time t_i. Server step v aggregates the K earliest arrivals among the in-flight updates
whose staleness would be at most `max_staleness` (the versions FedBuff keeps; staler updates
are discarded when they arrive); its clock is the K-th arrival, and update i's staleness is
`tau_i = v - (the version it downloaded)`. Freed slots are refilled at the step. When fewer
than K usable updates are in flight (too few clients online), the server dispatches more as
clients come online.
"""

import math
from typing import NamedTuple

import numpy as np

from fedjax_core.data.sampling import SAMPLE_STREAM, host_rng
from fedjax_core.simtime.availability import Availability
from fedjax_core.simtime.profiles import DeviceProfiles

RULES = ("all", "overcommit", "deadline")
FLOAT_BITS = 32


def client_steps(sizes, batch_size: int, epochs: int = 1,
                 max_steps: int | None = None) -> np.ndarray:
    """`Int[ndarray, "clients"]`, each client's local steps `min(ceil(n_i E / B), max_steps)`
    (what `data.pack` packs)."""
    sizes = np.asarray(sizes, np.int64)
    steps = -(-(sizes * epochs) // batch_size)
    return steps if max_steps is None else np.minimum(steps, max_steps)


def upload_bits(aggregator, num_params: int) -> float:
    """Bits one client uploads: the aggregator's `bits_per_client(d)` when it declares it (a
    compression aggregator), else `32 d` (full precision)."""
    declared = getattr(aggregator, "bits_per_client", None)
    return float(declared(num_params)) if declared is not None else float(FLOAT_BITS * num_params)


class TimeModel(NamedTuple):
    """Everything a client's round time depends on.

    Attributes:
      profiles: the population's `DeviceProfiles`.
      steps: `Int[ndarray, "clients"]`, each client's full local steps (`client_steps`).
      batch_size: examples per step.
      download_bits: the model's size on the wire (32 bits per parameter).
      upload_bits: one client's upload (`upload_bits`).
    """

    profiles: DeviceProfiles
    steps: np.ndarray
    batch_size: int
    download_bits: float
    upload_bits: float


def client_seconds(model: TimeModel, idx: np.ndarray, steps: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(comm_s, step_s, total_s)` of clients `idx`: download + upload seconds, seconds per
    step, and `comm_s + steps * step_s` (steps: theirs in `model.steps` unless given).

    Example:
      >>> comm, step, total = client_seconds(model, np.array([0, 5]))
    """
    p = model.profiles
    comm = model.download_bits / p.download_bps[idx] + model.upload_bits / p.upload_bps[idx]
    step = model.batch_size * p.compute_s[idx]
    s = model.steps[idx] if steps is None else steps
    return comm, step, comm + s * step


class RoundPlan(NamedTuple):
    """One round (one server step) of the simulated clock.

    Attributes:
      round: the round r (0-based).
      start_s: the clock when the round began: the previous server step's (before any
        wait for clients to come online).
      end_s: the clock when the server stepped (`time/simulated_s`).
      clients: `Int[ndarray, "k"]`, the positions of the clients whose updates count, in
        slot order (largest first).
      steps: `Int[ndarray, "k"]`, the local steps each runs (fewer than its own under a
        deadline with partial work).
      capped: whether any client's steps were cut (the cohort's mask must be cut).
      staleness: `Int[ndarray, "k"]` for an asynchronous step, else None.
      selected: `Int[ndarray, "m"]`, the clients drawn (synchronous) or whose updates
        arrived (asynchronous, discarded stale ones included), in draw/arrival order.
      available: the number of clients online (and idle, asynchronously) when the round's
        clients were drawn (for an asynchronous step: its last dispatch before it).
    """

    round: int
    start_s: float
    end_s: float
    clients: np.ndarray
    steps: np.ndarray
    capped: bool
    staleness: np.ndarray | None
    selected: np.ndarray
    available: int

    @property
    def seconds(self) -> float:
        """The round's simulated duration, waiting included (`time/round_simulated_s`)."""
        return self.end_s - self.start_s


def slot_order(sizes: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The permutation putting clients `idx` largest first, ties in order (`by_size`)."""
    return np.argsort(-np.asarray(sizes)[idx], kind="stable")


def wait_for_clients(availability: Availability, t: float) -> tuple[float, np.ndarray]:
    """`(t', available)`: the first time t' >= t at which someone is online, and who."""
    avail = availability.available(t)
    while not avail.any():
        t = availability.next_change(t)
        if not math.isfinite(t):
            raise ValueError("no client is ever available: check the availability trace")
        avail = availability.available(t)
    return t, avail


class SyncTimeline:
    """The clock of synchronous rounds under a selection rule (module docstring).

    Args:
      model: the `TimeModel`.
      availability: who is online (`fedjax_core.simtime.availability`).
      sizes: `Int[ndarray, "clients"]`, each client's number of examples (slot order).
      clients_per_round: K.
      seed: the run's seed (the sampling generator's).
      rule: "all", "overcommit" or "deadline".
      overcommit: the over-commit factor (draw ceil(overcommit K)).
      deadline_s: the deadline d of rule "deadline".
      partial: with "deadline", clients that would miss it run the steps that fit.

    Example:
      >>> clock = SyncTimeline(model, AlwaysAvailable(n), sizes, 10, seed=0, rule="all")
      >>> clock.plan(0).end_s
    """

    def __init__(self, model: TimeModel, availability: Availability, sizes, clients_per_round: int,
                 seed: int = 0, rule: str = "all", overcommit: float = 1.3,
                 deadline_s: float | None = None, partial: bool = False):
        if rule not in RULES:
            raise ValueError(f"unknown selection rule {rule!r}; choose one of: {', '.join(RULES)}")
        if rule == "deadline" and not (deadline_s is not None and deadline_s > 0):
            raise ValueError("selection rule 'deadline' needs a positive deadline (seconds)")
        if overcommit < 1:
            raise ValueError(f"overcommit must be at least 1, got {overcommit}")
        self.model, self.availability = model, availability
        self.sizes = np.asarray(sizes, np.int64)
        self.k, self.seed, self.rule = clients_per_round, seed, rule
        self.overcommit, self.deadline_s, self.partial = overcommit, deadline_s, partial
        self.plans: list[RoundPlan] = []

    @property
    def draw(self) -> int:
        """How many clients a round draws: K, or ceil(overcommit K)."""
        if self.rule == "overcommit":
            return math.ceil(round(self.overcommit * self.k, 9))
        return self.k

    def plan(self, r: int) -> RoundPlan:
        """Round r's plan (rounds before it are planned first, in order)."""
        while len(self.plans) <= r:
            t = self.plans[-1].end_s if self.plans else 0.0
            self.plans.append(self._round(len(self.plans), t))
        return self.plans[r]

    def _round(self, r: int, begin: float) -> RoundPlan:
        t, avail = wait_for_clients(self.availability, begin)
        pool = np.flatnonzero(avail)
        rng = host_rng(self.seed, r, SAMPLE_STREAM)
        chosen = pool[rng.choice(len(pool), size=min(self.draw, len(pool)), replace=False)]
        return self.keep(r, begin, t, chosen, int(len(pool)))

    def keep(self, r: int, begin: float, t: float, chosen: np.ndarray,
              available: int) -> RoundPlan:
        """The plan of round r whose drawn clients `chosen` start at t: the rule's."""
        comm, step, total = client_seconds(self.model, chosen)
        if not chosen.size:
            return RoundPlan(r, begin, t, chosen, chosen, False, None, chosen, available)
        steps = self.model.steps[chosen]
        if self.rule == "all":
            keep, seconds = np.arange(len(chosen)), float(total.max())
        elif self.rule == "overcommit":
            keep = np.sort(np.argsort(total, kind="stable")[:self.k])
            seconds = float(total[keep].max())
        else:
            d = float(self.deadline_s)  # type: ignore[arg-type]
            if self.partial:
                fit = np.floor((d - comm) / step)
                steps = np.minimum(steps, np.maximum(fit, 0).astype(np.int64))
                keep = np.flatnonzero(steps >= 1)
                done = comm[keep] + steps[keep] * step[keep]
                seconds = float(done.max()) if keep.size else d
            else:
                keep = np.flatnonzero(total <= d)
                seconds = d if keep.size < len(chosen) else float(total.max())
        kept, kept_steps = chosen[keep], steps[keep]
        order = slot_order(self.sizes, kept)
        capped = bool(np.any(kept_steps < self.model.steps[kept]))
        return RoundPlan(r, begin, t + seconds, kept[order], kept_steps[order], capped, None,
                         chosen, available)


class AsyncTimeline:
    """The event timeline of buffered asynchronous training (module docstring).

    Args:
      model: the `TimeModel`.
      availability: who is online.
      sizes: `Int[ndarray, "clients"]`, each client's number of examples (slot order).
      buffer_size: K, updates per server step.
      concurrency: C >= K, clients in flight.
      max_staleness: updates staler than this are discarded.
      seed: the run's seed.

    Example:
      >>> clock = AsyncTimeline(model, AlwaysAvailable(n), sizes, 10, 30, 4, seed=0)
      >>> clock.plan(0).staleness
    """

    def __init__(self, model: TimeModel, availability: Availability, sizes, buffer_size: int,
                 concurrency: int, max_staleness: int, seed: int = 0):
        if concurrency < buffer_size:
            raise ValueError(f"concurrency ({concurrency}) must be at least the buffer size "
                             f"({buffer_size})")
        n = model.profiles.num_clients
        if concurrency > n:
            raise ValueError(f"concurrency ({concurrency}) exceeds the {n} clients")
        self.model, self.availability = model, availability
        self.sizes = np.asarray(sizes, np.int64)
        self.k, self.c, self.s, self.seed = buffer_size, concurrency, max_staleness, seed
        self.plans: list[RoundPlan] = []
        self.busy = np.zeros(n, bool)
        self.client = np.zeros(0, np.int64)      # in flight: who,
        self.version = np.zeros(0, np.int64)     # the version each downloaded,
        self.arrival = np.zeros(0, np.float64)   # and when its update arrives
        self.t = 0.0
        self.online = 0  # clients online and idle at the last dispatch

    def _dispatch(self, t: float, version: int, draw: int) -> int:
        """Starts idle clients online at t on `version`, up to C in flight; returns how many
        were online and idle."""
        free = self.c - len(self.client)
        avail = self.availability.available(t) & ~self.busy
        pool = np.flatnonzero(avail)
        self.online = int(pool.size)
        if free <= 0 or not pool.size:
            return int(pool.size)
        rng = host_rng(self.seed, version, SAMPLE_STREAM, draw)
        new = pool[rng.choice(len(pool), size=min(free, len(pool)), replace=False)]
        self.busy[new] = True
        self.client = np.concatenate([self.client, new])
        self.version = np.concatenate([self.version, np.full(len(new), version, np.int64)])
        self.arrival = np.concatenate([self.arrival, t + client_seconds(self.model, new)[2]])
        return int(pool.size)

    def plan(self, r: int) -> RoundPlan:
        """Server step r's plan (steps before it are planned first, in order)."""
        while len(self.plans) <= r:
            self.plans.append(self._step(len(self.plans)))
        return self.plans[r]

    def _step(self, v: int) -> RoundPlan:
        start, draws = self.t, 0
        if v == 0:
            self._dispatch(self.t, 0, draws)
        while True:
            usable = np.flatnonzero(self.version >= v - self.s)
            if usable.size >= self.k:
                break
            t = max(self.t, float(self.arrival[usable].max()) if usable.size else self.t)
            nxt = self.availability.next_change(t)  # wait for more clients to come online
            if not math.isfinite(nxt):
                raise ValueError("too few clients are ever available to fill FedBuff's buffer")
            self.t = nxt
            draws += 1
            self._dispatch(self.t, v, draws)
        first = usable[np.argsort(self.arrival[usable], kind="stable")[:self.k]]
        end = max(self.t, float(self.arrival[first].max()))
        stale = np.flatnonzero((self.version < v - self.s) & (self.arrival <= end))
        leaving = np.concatenate([first, stale])
        selected = self.client[leaving[np.argsort(self.arrival[leaving], kind="stable")]]
        clients, staleness = self.client[first], v - self.version[first]
        stay = np.ones(len(self.client), bool)
        stay[leaving] = False
        self.busy[self.client[leaving]] = False
        self.client, self.version, self.arrival = (
            self.client[stay], self.version[stay], self.arrival[stay])
        online = self.online
        self.t = end
        self._dispatch(end, v + 1, 0)
        order = slot_order(self.sizes, clients)
        return RoundPlan(v, start, end, clients[order], self.model.steps[clients[order]], False,
                         staleness[order], selected, online)
