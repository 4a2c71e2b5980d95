"""Canned tasks: a dataset, a model and the literature's default hyperparameters.

Example:
  >>> from fedjax_api import tasks
  >>> tasks.names()
  ['cifar100', 'emnist', 'emnist-digits', 'femnist-leaf', 'shakespeare', 'shakespeare-plays', ...]
  >>> task = tasks.get("shakespeare-plays")
  >>> task.train.sample(clients=10, round=0)
"""

from fedjax_api.tasks import builtin  # noqa: F401  (registers the canned tasks)
from fedjax_api.tasks.registry import (
    TASKS,
    Loaded,
    Task,
    TaskDefaults,
    TaskEntry,
    entry,
    get,
    names,
    register,
)

__all__ = ["TASKS", "Loaded", "Task", "TaskDefaults", "TaskEntry", "entry", "get", "names",
           "register"]
