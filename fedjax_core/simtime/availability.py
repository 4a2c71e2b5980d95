"""Client availability over simulated time: who is online at time t (seconds).

Three models, each answering `available(t) -> Bool[ndarray, "clients"]` for times that
(normally) do not decrease, and `next_change(t)`, the earliest time after t at which
someone's availability may change:

- `AlwaysAvailable`: everyone, always.
- `DiurnalMarkov`: each client alternates on and off spells, a two-state Markov chain
  whose spell means follow the client's local time of day. Client i lives in time zone
  `phase_i ~ Uniform[0, 24)` hours; at local hour h it is online a fraction
  `f(h) = clip(base + amplitude cos(2 pi (h - peak_hour) / 24), 0.01, 0.99)` of the time,
  with mean on spell `f(h) cycle_s` and off spell `(1 - f(h)) cycle_s` (h taken when the
  spell starts; spells are exponential). Phones in FedScale's availability trace (Lai
  et al. 2022; Yang et al. 2021, "Characterizing impacts of heterogeneity in federated
  learning upon large-scale smartphone data") are online a minority of the time and most
  at night, while charging: the defaults (`DIURNAL`, chosen, not fitted) are base 0.3,
  amplitude 0.2, peak at 02:00 local time, cycle 2 hours.
- `IntervalTrace`: online intervals read from a CSV (`client_id,start_s,end_s`), repeated
  with a period (a trace of a week repeats weekly); clients without rows are always on.

Randomness is counter-based: client i's k-th spell uses the hash of (seed, i, k), so
`available(t)` depends only on t, never on which times were asked before (a resumed run
replays the same availability), and advancing a million clients is a few vectorised passes.
"""

import csv
import math
from pathlib import Path
from typing import Protocol

import numpy as np

DAY_S = 86400.0

DIURNAL = {"base": 0.3, "amplitude": 0.2, "peak_hour": 2.0, "cycle_s": 7200.0}
"""`DiurnalMarkov`'s default parameters (see the module docstring)."""


class Availability(Protocol):
    """Who is online: `available(t)`, and `next_change(t)` (see the module docstring)."""

    def available(self, t: float) -> np.ndarray: ...

    def next_change(self, t: float) -> float: ...


class AlwaysAvailable:
    """Every one of `num_clients` clients is online at every time."""

    def __init__(self, num_clients: int):
        self.num_clients = num_clients
        self._all = np.ones(num_clients, bool)

    def available(self, t: float) -> np.ndarray:
        return self._all

    def next_change(self, t: float) -> float:
        return math.inf


def uniform_hash(seed: int, client: np.ndarray, k: np.ndarray) -> np.ndarray:
    """`Float[ndarray, "n"]` in (0, 1): a splitmix64 hash of (seed, client, k), elementwise."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
             ^ client.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
             ^ k.astype(np.uint64) * np.uint64(0x94D049BB133111EB))
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


class DiurnalMarkov:
    """Diurnal on/off spells of every client (see the module docstring).

    Args:
      num_clients: the population size N.
      seed: fixes the time zones and every spell.
      base, amplitude, peak_hour, cycle_s: the on-fraction curve and the mean cycle.

    Example:
      >>> avail = DiurnalMarkov(1_000_000, seed=0)
      >>> float(avail.available(3600.0).mean())   # about 0.3
    """

    def __init__(self, num_clients: int, seed: int = 0, base: float = DIURNAL["base"],
                 amplitude: float = DIURNAL["amplitude"], peak_hour: float = DIURNAL["peak_hour"],
                 cycle_s: float = DIURNAL["cycle_s"]):
        self.num_clients, self.seed = num_clients, seed
        self.base, self.amplitude, self.peak_hour, self.cycle_s = base, amplitude, peak_hour, cycle_s
        rng = np.random.default_rng([seed, 0xA7A1])
        self.phase_s = rng.uniform(0.0, DAY_S, num_clients)
        self._reset()

    def on_fraction(self, t, phase_s) -> np.ndarray:
        """`f(h)` at local hour `h = (t + phase_s) / 3600 mod 24`."""
        x = np.add(t, phase_s)  # a fresh array, then in place: the same operations, in order
        x /= 3600.0
        np.fmod(x, 24.0, out=x)  # = np.mod for the non-negative times here, exactly
        x -= self.peak_hour
        x *= 2 * np.pi
        x /= 24.0
        np.cos(x, out=x)
        x *= self.amplitude
        x += self.base
        np.maximum(x, 0.01, out=x)  # = np.clip(x, 0.01, 0.99), without its overhead
        np.minimum(x, 0.99, out=x)
        return x

    def _spell(self, idx: np.ndarray, on: np.ndarray, start: np.ndarray,
               k: np.ndarray, phase_s: np.ndarray | None = None) -> np.ndarray:
        """Lengths of the spells of clients `idx` starting at `start` in state `on`."""
        f = self.on_fraction(start, self.phase_s[idx] if phase_s is None else phase_s)
        mean = np.where(on, f, 1.0 - f)
        mean *= self.cycle_s
        length = np.log(uniform_hash(self.seed, idx, k))
        np.negative(length, out=length)
        length *= mean
        return length

    def _reset(self) -> None:
        idx = np.arange(self.num_clients)
        zero = np.zeros(self.num_clients)
        self.on = uniform_hash(self.seed, idx, zero) < self.on_fraction(0.0, self.phase_s)
        self.k = np.ones(self.num_clients, np.int64)
        self.end = self._spell(idx, self.on, zero, self.k)
        self.t = 0.0

    def advance(self, t: float) -> None:
        """Moves every client's spell forward to time t (back to 0 first if t is earlier).

        Only the clients whose spell ended by t are touched: their state is gathered once,
        advanced spell by spell in compact arrays, and written back once."""
        if t < self.t:
            self._reset()
        idx = np.flatnonzero(self.end <= t)
        if idx.size:
            on, k, end = ~self.on[idx], self.k[idx] + 1, self.end[idx]
            phase = self.phase_s[idx]
            end += self._spell(idx, on, end, k, phase)
            live = np.flatnonzero(end <= t)  # positions in idx whose new spell ended too
            while live.size:
                on[live] = ~on[live]
                k[live] += 1
                start = end[live]
                end[live] = start + self._spell(idx[live], on[live], start, k[live], phase[live])
                live = live[end[live] <= t]
            self.on[idx], self.k[idx], self.end[idx] = on, k, end
        self.t = t

    def available(self, t: float) -> np.ndarray:
        self.advance(t)
        return self.on

    def next_change(self, t: float) -> float:
        self.advance(t)
        return float(self.end.min())


class IntervalTrace:
    """Online intervals from a trace, repeated every `period_s` (see the module docstring).

    Args:
      client: `Int[ndarray, "m"]`, each interval's client position.
      start_s, end_s: `Float[ndarray, "m"]`, the intervals, `0 <= start < end <= period_s`.
      num_clients: the population size N (clients without intervals are always on).
      period_s: the trace's period; None: its last end rounded up to whole days.
    """

    def __init__(self, client, start_s, end_s, num_clients: int, period_s: float | None = None):
        client = np.asarray(client, np.int64)
        start, end = np.asarray(start_s, np.float64), np.asarray(end_s, np.float64)
        if np.any(end <= start) or np.any(start < 0):
            raise ValueError("every availability interval needs 0 <= start_s < end_s")
        last = float(end.max()) if end.size else DAY_S
        self.period = float(period_s or DAY_S * math.ceil(last / DAY_S))
        order = np.lexsort((start, client))
        self.client, self.start, self.end = client[order], start[order], end[order]
        self.key = self.client * self.period + self.start
        self.num_clients = num_clients
        self.traced = np.zeros(num_clients, bool)
        self.traced[self.client] = True
        self.starts = np.unique(np.concatenate([self.start, self.end]))

    def available(self, t: float) -> np.ndarray:
        tt = float(np.mod(t, self.period))
        pos = np.arange(self.num_clients)
        j = np.searchsorted(self.key, pos * self.period + tt, side="right") - 1
        jj = np.maximum(j, 0)
        inside = (j >= 0) & (self.client[jj] == pos) & (self.end[jj] > tt)
        return inside | ~self.traced

    def next_change(self, t: float) -> float:
        if not self.starts.size:
            return math.inf
        tt = float(np.mod(t, self.period))
        j = np.searchsorted(self.starts, tt, side="right")
        base = t - tt
        return base + (self.starts[j] if j < self.starts.size else self.period + self.starts[0])


def load_intervals_csv(path: str | Path, client_ids, period_s: float | None = None
                       ) -> IntervalTrace:
    """An `IntervalTrace` from a CSV with the columns `client_id,start_s,end_s`.

    Example:
      >>> avail = load_intervals_csv("availability.csv", task.train.data.client_ids)
    """
    ids = {c.decode() if isinstance(c, bytes) else str(c): i for i, c in enumerate(client_ids)}
    client, start, end = [], [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"client_id", "start_s", "end_s"} <= set(
                reader.fieldnames):
            raise ValueError(f"{path}: an availability CSV needs the columns client_id, "
                             "start_s, end_s")
        for row in reader:
            if row["client_id"] not in ids:
                continue  # a client outside this population
            client.append(ids[row["client_id"]])
            start.append(float(row["start_s"]))
            end.append(float(row["end_s"]))
    return IntervalTrace(client, start, end, len(ids), period_s)
