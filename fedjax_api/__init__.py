"""The typed object-oriented facade: Client, Server, Experiment and the task registry.

Example:
  >>> from fedjax_api import Server, tasks
  >>> from fedjax_core.algorithms.fedavg import fedavg
  >>> task = tasks.get("shakespeare-plays")
  >>> server = Server.create(fedavg(optax.sgd(1.0), optax.sgd(1.0)), task.model, seed=0)
  >>> for r in range(10):
  ...     server = server.step(task.train.sample(clients=10, round=r))
  >>> server.evaluate(task.test)
"""

from fedjax_api import config, tasks
from fedjax_api.client import Client
from fedjax_api.config import ExperimentConfig
from fedjax_api.dataset import FederatedDataset
from fedjax_api.errors import ConfigError
from fedjax_api.experiment import Experiment, RunResult
from fedjax_api.loop import Callback
from fedjax_api.server import Server

__all__ = ["Callback", "Client", "ConfigError", "Experiment", "ExperimentConfig",
           "FederatedDataset", "RunResult", "Server", "config", "tasks"]
