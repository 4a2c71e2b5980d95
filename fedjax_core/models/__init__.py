"""Models as `Model(init, apply, loss, metrics)`: layers, metric parts, task models."""

from fedjax_core.models.adapters import from_equinox, from_flax
from fedjax_core.models import metrics, nn
from fedjax_core.models.base import Model, masked_mean_loss
from fedjax_core.models.emnist_cnn import emnist_cnn
from fedjax_core.models.linear import logistic_regression, mlp
from fedjax_core.models.resnet import cifar100_logistic, resnet18
from fedjax_core.models.shakespeare_lstm import shakespeare_lstm
from fedjax_core.models.stackoverflow_lstm import stackoverflow_lstm

__all__ = [
    "from_equinox",
    "from_flax",
    "Model",
    "cifar100_logistic",
    "emnist_cnn",
    "logistic_regression",
    "masked_mean_loss",
    "metrics",
    "mlp",
    "nn",
    "resnet18",
    "shakespeare_lstm",
    "stackoverflow_lstm",
]
