import pytest

from tests.fedjax_api import tiny_task


@pytest.fixture(autouse=True, scope="session")
def _tiny_task():
    tiny_task.register()
