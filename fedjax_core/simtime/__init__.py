"""Simulated time: device profiles, availability, the per-round time model, the selection
rules and the asynchronous event timeline (docs/simulated_time.md). Host side, numpy."""

from fedjax_core.simtime.availability import (
    AlwaysAvailable,
    Availability,
    DiurnalMarkov,
    IntervalTrace,
    load_intervals_csv,
)
from fedjax_core.simtime.profiles import DeviceProfiles, heterogeneous, homogeneous, load_csv
from fedjax_core.simtime.timeline import (
    RULES,
    AsyncTimeline,
    RoundPlan,
    SyncTimeline,
    TimeModel,
    client_seconds,
    client_steps,
    upload_bits,
)

__all__ = ["RULES", "AlwaysAvailable", "AsyncTimeline", "Availability", "DeviceProfiles",
           "DiurnalMarkov", "IntervalTrace", "RoundPlan", "SyncTimeline", "TimeModel",
           "client_seconds", "client_steps", "heterogeneous", "homogeneous", "load_csv",
           "load_intervals_csv", "upload_bits"]
