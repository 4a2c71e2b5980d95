"""Aggregators: how a server combines its cohort's updates; `registry` lists them by name."""

from fedjax_core.aggregate.attacks import attack
from fedjax_core.aggregate.base import Aggregator, AggregatorEntry
from fedjax_core.aggregate.compression import (
    drive,
    rotated_quantization,
    stochastic_quantization,
    top_k,
)
from fedjax_core.aggregate.mean import mean
from fedjax_core.aggregate.privacy import adaptive_gaussian, gaussian, local, tree_ftrl
from fedjax_core.aggregate.robust import coordinate_median, krum, norm_bounding, trimmed_mean
from fedjax_core.aggregate.secure import secure_sum

__all__ = ["Aggregator", "AggregatorEntry", "adaptive_gaussian", "attack", "coordinate_median",
           "drive", "gaussian", "krum", "local", "mean", "norm_bounding", "rotated_quantization",
           "secure_sum", "stochastic_quantization", "top_k", "tree_ftrl", "trimmed_mean"]
