"""Aggregators: how a server combines its cohort's updates."""

from fedjax_core.aggregate.base import Aggregator
from fedjax_core.aggregate.mean import mean

__all__ = ["Aggregator", "mean"]
