"""The naming convention: a package never binds a name equal to one of its modules.

So `from fedjax_core.algorithms import hypcluster` (or `fedjax_core.evaluate`) always gives
the module, whose helpers stay reachable; factories are exported flat from `fedjax_core`.
"""

import importlib
import pkgutil
import types

import pytest

import fedjax_core

PACKAGES = ["fedjax_core", "fedjax_core.algorithms", "fedjax_core.aggregate",
            "fedjax_core.models", "fedjax_core.data", "fedjax_core.privacy", "fedjax_api",
            "fedjax_api.tasks", "fedjax_api.datasets", "cli"]


@pytest.mark.parametrize("name", PACKAGES)
def test_no_package_binds_the_name_of_one_of_its_modules(name):
    package = importlib.import_module(name)
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{name}.{info.name}")
        bound = getattr(package, info.name)
        assert isinstance(bound, types.ModuleType) and bound is module, (
            f"{name}.{info.name} is {bound!r}, not the module")


def test_the_flat_namespace_exports_what_it_lists():
    for name in fedjax_core.__all__:
        assert hasattr(fedjax_core, name), name
    assert fedjax_core.scaffold.__module__ == "fedjax_core.algorithms.scaffold"
    assert callable(fedjax_core.algorithm) and fedjax_core.evaluate.evaluate
