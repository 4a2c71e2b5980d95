"""Federated algorithms, one file each; `registry` lists them by name."""

from fedjax_core.algorithms.agnostic_fedavg import agnostic_fedavg
from fedjax_core.algorithms.apfl import apfl
from fedjax_core.algorithms.base import EvalClients, FederatedAlgorithm, jit_round
from fedjax_core.algorithms.ditto import ditto
from fedjax_core.algorithms.fedavg import FedAvgState, fedavg
from fedjax_core.algorithms.fedbuff import fedbuff
from fedjax_core.algorithms.feddyn import feddyn
from fedjax_core.algorithms.fednova import fednova
from fedjax_core.algorithms.fedopt import fedadagrad, fedadam, fedavgm, fedyogi
from fedjax_core.algorithms.fedprox import fedprox
from fedjax_core.algorithms.fedsgd import fedsgd
from fedjax_core.algorithms.hypcluster import hypcluster
from fedjax_core.algorithms.mime import mime, mimelite
from fedjax_core.algorithms.qffl import qffl
from fedjax_core.algorithms.registry import ALGORITHMS
from fedjax_core.algorithms.scaffold import scaffold

__all__ = ["ALGORITHMS", "EvalClients", "FedAvgState", "FederatedAlgorithm", "agnostic_fedavg",
           "apfl", "ditto", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedbuff", "feddyn",
           "fednova", "fedprox", "fedsgd", "fedyogi", "hypcluster", "jit_round", "mime",
           "mimelite", "qffl", "scaffold"]
