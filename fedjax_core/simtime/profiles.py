"""Device profiles: each client's compute speed and bandwidth, as arrays over the population.

A client's time in a round (`fedjax_core.simtime.timeline.client_seconds`) is

    download_bits / download_bps  +  steps * batch_size * compute_s  +  upload_bits / upload_bps

with `compute_s` the seconds one training example takes on the device (forward and
backward), as FedScale counts it (`3 x batch x steps x inference ms per sample`, Lai et
al. 2022, `fedscale/core/internal/client.py: getCompletionTime`).

Built-in generators, deterministic from a seed:

- `homogeneous(n)`: every client the same (the medians below); with always-on availability
  a simulated run trains exactly today's rounds, and only adds the clock.
- `heterogeneous(n, seed)`: log-normal compute time and bandwidths. FedScale draws each
  client's compute speed from AI Benchmark (Ignatov et al. 2019) and its bandwidth from
  MobiPerf (Huang et al.) measurements; those measurements span about an order of
  magnitude in compute speed and two in bandwidth (the spread the issue and the FedScale
  paper's Figure 2 describe). We did not have FedScale's raw per-device files here, so the
  parameters are CHOSEN to reproduce those spreads, not fitted to the raw data:
  the 5th-to-95th percentile ratio is 10x for compute (log-sd 0.70 = ln 10 / 3.29) and
  100x for bandwidth (log-sd 1.40 = ln 100 / 3.29), the upload bandwidth a quarter of the
  download one (mobile uplinks), medians in `HETEROGENEOUS` (20 ms per training example,
  20 Mbit/s down, 5 Mbit/s up: a mid-range phone on 4G/Wi-Fi). Load measured values
  with `load_csv` instead (docs/simulated_time.md shows the conversion of FedScale's file).

CSV trace format (`load_csv`): a header and one row per client,
`client_id,compute_s_per_example,download_mbps[,upload_mbps]` (upload defaults to download);
rows may come in any order; every client of the population must have a row.
"""

import csv
from pathlib import Path
from typing import NamedTuple

import numpy as np

MEGA = 1e6


class DeviceProfiles(NamedTuple):
    """Every client's device, `[clients]` float64 arrays (position order of the population).

    Attributes:
      compute_s: seconds one training example takes (forward + backward).
      download_bps: download bandwidth, bits per second.
      upload_bps: upload bandwidth, bits per second.
    """

    compute_s: np.ndarray
    download_bps: np.ndarray
    upload_bps: np.ndarray

    @property
    def num_clients(self) -> int:
        return int(self.compute_s.shape[0])


HOMOGENEOUS = {"compute_s": 0.02, "download_mbps": 20.0, "upload_mbps": 5.0}
"""The devices of `homogeneous` (and the medians of `heterogeneous`)."""

HETEROGENEOUS = {**HOMOGENEOUS, "compute_sigma": 0.70, "bandwidth_sigma": 1.40}
"""`heterogeneous`'s parameters: medians and log-standard deviations (see the module
docstring for where they come from)."""


def homogeneous(num_clients: int, compute_s: float = HOMOGENEOUS["compute_s"],
                download_mbps: float = HOMOGENEOUS["download_mbps"],
                upload_mbps: float = HOMOGENEOUS["upload_mbps"]) -> DeviceProfiles:
    """Identical devices.

    Example:
      >>> homogeneous(3).compute_s
      array([0.02, 0.02, 0.02])
    """
    full = lambda v: np.full(num_clients, float(v))  # noqa: E731
    return DeviceProfiles(full(compute_s), full(download_mbps * MEGA), full(upload_mbps * MEGA))


def heterogeneous(num_clients: int, seed: int = 0, compute_s: float = HETEROGENEOUS["compute_s"],
                  download_mbps: float = HETEROGENEOUS["download_mbps"],
                  upload_mbps: float = HETEROGENEOUS["upload_mbps"],
                  compute_sigma: float = HETEROGENEOUS["compute_sigma"],
                  bandwidth_sigma: float = HETEROGENEOUS["bandwidth_sigma"]) -> DeviceProfiles:
    """Log-normal devices: `compute_s_i = median e^(sigma_c z)`, bandwidths likewise.

    One device draw `z_i` is shared by download and upload (a slow network is slow both
    ways); compute is drawn independently of the network.

    Args:
      num_clients: the population size N.
      seed: the draw's seed (the run's seed: the same population every run).
      compute_s, download_mbps, upload_mbps: the medians.
      compute_sigma, bandwidth_sigma: the log-standard deviations.

    Returns:
      `DeviceProfiles` of N clients.

    Example:
      >>> p = heterogeneous(1000, seed=0)
      >>> float(np.percentile(p.compute_s, 95) / np.percentile(p.compute_s, 5))  # about 10

    References:
      Lai et al. 2022, "FedScale: Benchmarking Model and System Performance of Federated
      Learning at Scale" (ICML), device traces from AI Benchmark and MobiPerf.
    """
    rng = np.random.default_rng([seed, 0x51D7])
    zc, zb = rng.standard_normal((2, num_clients))
    net = np.exp(bandwidth_sigma * zb)
    return DeviceProfiles(compute_s * np.exp(compute_sigma * zc),
                          download_mbps * MEGA * net, upload_mbps * MEGA * net)


def load_csv(path: str | Path, client_ids) -> DeviceProfiles:
    """Profiles from a CSV trace, in the population's order (see the module docstring).

    Args:
      path: the CSV file (`client_id,compute_s_per_example,download_mbps[,upload_mbps]`).
      client_ids: the population's client ids, in position order (bytes or str).

    Returns:
      `DeviceProfiles` of those clients.

    Raises:
      ValueError: a missing column or client, or a non-positive value (one line).

    Example:
      >>> load_csv("devices.csv", task.train.data.client_ids)
    """
    ids = [c.decode() if isinstance(c, bytes) else str(c) for c in client_ids]
    rows: dict[str, tuple[float, float, float]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"client_id", "compute_s_per_example", "download_mbps"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ValueError(f"{path}: a device CSV needs the columns {', '.join(sorted(need))}"
                             " (and optionally upload_mbps)")
        for row in reader:
            down = float(row["download_mbps"])
            up = float(row.get("upload_mbps") or down)
            values = (float(row["compute_s_per_example"]), down, up)
            if not min(values) > 0:
                raise ValueError(f"{path}: client {row['client_id']!r} has a non-positive value")
            rows[row["client_id"]] = values
    missing = [c for c in ids if c not in rows]
    if missing:
        raise ValueError(f"{path} has no row for {len(missing)} of the {len(ids)} clients "
                         f"(e.g. {missing[0]!r}); give every client a row")
    table = np.array([rows[c] for c in ids], np.float64).reshape(len(ids), 3)
    return DeviceProfiles(table[:, 0], table[:, 1] * MEGA, table[:, 2] * MEGA)
