"""Federated algorithms, one file each; `registry` lists them by name."""

from fedjax_core.algorithms.base import FederatedAlgorithm, jit_round
from fedjax_core.algorithms.fedavg import FedAvgState, fedavg
from fedjax_core.algorithms.fedopt import fedadagrad, fedadam, fedavgm, fedyogi
from fedjax_core.algorithms.registry import ALGORITHMS

__all__ = ["ALGORITHMS", "FedAvgState", "FederatedAlgorithm", "fedadagrad", "fedadam",
           "fedavg", "fedavgm", "fedyogi", "jit_round"]
