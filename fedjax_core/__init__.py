"""fedjax_core: the functional layer of fedjax-sim (pure functions and typed pytrees).

The names a user needs, flat, in the manner of optax (`import fedjax_core as fc`):

    alg = fc.scaffold(optax.sgd(0.1), 1.0, client_learning_rate=0.1, num_clients=3400)
    step = fc.jit_round(alg, model, fc.Plan(chunk_size=1))
    state, metrics = step(alg.init(params), cohort, round_key)

Writing an algorithm takes `algorithm`, `ClientContext`, `ClientReport`, `RoundResult`,
`TrainStats` and `tree` (docs/writing_algorithms.md). Subpackages hold modules
(`fedjax_core.algorithms.scaffold`, `fedjax_core.aggregate.robust`, ...): importing one
always gives the module, never a function of the same name, so its helpers stay
reachable. docs/api lists this namespace.
"""

from importlib import metadata as _metadata

from fedjax_core import evaluate, keys, tree  # modules: fc.evaluate.evaluate(...)
from fedjax_core.aggregate.attacks import attack
from fedjax_core.aggregate.base import Aggregator, Stream
from fedjax_core.aggregate.compression import (
    drive,
    rotated_quantization,
    stochastic_quantization,
    top_k,
)
from fedjax_core.aggregate.mean import mean
from fedjax_core.aggregate.privacy import adaptive_gaussian, gaussian, tree_ftrl
from fedjax_core.aggregate.robust import coordinate_median, krum, norm_bounding, trimmed_mean
from fedjax_core.aggregate.secure import secure_sum
from fedjax_core.algorithms.agnostic_fedavg import agnostic_fedavg
from fedjax_core.algorithms.apfl import apfl
from fedjax_core.algorithms.base import EvalClients, FederatedAlgorithm, jit_round, sgd_if_rate
from fedjax_core.algorithms.ditto import ditto
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.fedbuff import fedbuff
from fedjax_core.algorithms.feddyn import feddyn
from fedjax_core.algorithms.fednova import fednova
from fedjax_core.algorithms.fedopt import fedadagrad, fedadam, fedavgm, fedyogi
from fedjax_core.algorithms.fedprox import fedprox
from fedjax_core.algorithms.fedsgd import fedsgd
from fedjax_core.algorithms.hypcluster import hypcluster
from fedjax_core.algorithms.mime import mime, mimelite
from fedjax_core.algorithms.qffl import qffl
from fedjax_core.algorithms.scaffold import scaffold
from fedjax_core.client import (
    ClientContext,
    ClientReport,
    TrainStats,
    first_epoch_mask,
    full_batch,
    steps_loop,
    train_steps,
)
from fedjax_core.data import Cohort, FederatedData, InMemoryFederatedData, pack_clients, pack_cohort
from fedjax_core.models.base import Model
from fedjax_core.models.emnist_cnn import emnist_cnn
from fedjax_core.models.linear import logistic_regression, mlp
from fedjax_core.models.shakespeare_lstm import shakespeare_lstm
from fedjax_core.models.stackoverflow_lstm import stackoverflow_lstm
from fedjax_core.parallel import Plan, client_mesh, map_clients, run_clients, sum_clients
from fedjax_core.skeleton import RoundResult, RoundState, algorithm, descend

try:
    __version__ = _metadata.version("fedjax-sim")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    # writing an algorithm (the round skeleton)
    "algorithm", "ClientContext", "ClientReport", "RoundResult", "RoundState", "TrainStats",
    "descend", "train_steps", "full_batch", "steps_loop", "first_epoch_mask", "tree", "keys", "evaluate",
    # algorithms
    "FederatedAlgorithm", "EvalClients", "jit_round", "sgd_if_rate", "fedavg", "fedprox", "fedadam",
    "fedyogi", "fedadagrad", "fedavgm", "fedsgd", "fednova", "qffl", "scaffold", "feddyn",
    "ditto", "apfl", "mime", "mimelite", "agnostic_fedavg", "hypcluster", "fedbuff",
    # aggregators
    "Aggregator", "Stream", "mean", "coordinate_median", "trimmed_mean", "krum",
    "norm_bounding", "gaussian", "adaptive_gaussian", "tree_ftrl", "secure_sum", "top_k",
    "drive", "rotated_quantization", "stochastic_quantization", "attack",
    # running rounds, data, models, evaluation
    "Plan", "client_mesh", "map_clients", "sum_clients", "run_clients", "Cohort",
    "FederatedData", "InMemoryFederatedData", "pack_clients", "pack_cohort", "Model",
    "emnist_cnn", "mlp", "logistic_regression", "shakespeare_lstm", "stackoverflow_lstm",
]
