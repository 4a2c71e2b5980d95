"""Models as `Model(init, apply, loss, metrics)`: layers, metric parts, task models.

As in every subpackage, a name bound here is never one of its modules: the task model
factories whose names match their modules (`emnist_cnn`, `shakespeare_lstm`,
`stackoverflow_lstm`) are reached flat from `fedjax_core` or from their modules.
"""

from fedjax_core.models import metrics, nn
from fedjax_core.models.adapters import from_equinox, from_flax, from_nnx
from fedjax_core.models.base import Model, masked_mean_loss
from fedjax_core.models.linear import logistic_regression, mlp
from fedjax_core.models.precision import with_precision
from fedjax_core.models.resnet import cifar100_logistic, resnet18

__all__ = [
    "from_equinox",
    "from_flax",
    "from_nnx",
    "Model",
    "cifar100_logistic",
    "logistic_regression",
    "masked_mean_loss",
    "metrics",
    "mlp",
    "nn",
    "resnet18",
    "with_precision",
]
