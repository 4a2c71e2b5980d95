"""Aggregators: how a server combines its cohort's updates; `registry` lists them by name."""

from fedjax_core.aggregate.attacks import attack
from fedjax_core.aggregate.base import Aggregator, AggregatorEntry
from fedjax_core.aggregate.compression import (drive, rotated_quantization,
                                               stochastic_quantization, top_k)
from fedjax_core.aggregate.mean import mean
from fedjax_core.aggregate.robust import coordinate_median, krum, norm_bounding, trimmed_mean

__all__ = ["Aggregator", "AggregatorEntry", "attack", "coordinate_median", "drive", "krum",
           "mean", "norm_bounding", "rotated_quantization", "stochastic_quantization", "top_k",
           "trimmed_mean"]
