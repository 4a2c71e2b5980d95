"""The default chunk size by backend (a pure function of backend, memory and footprint),
`--deterministic`'s XLA flag (set before JAX starts), and the run header's line."""

import os

import jax
import jax.numpy as jnp
import pytest
from typer.testing import CliRunner

from cli.main import app
from fedjax_api import accelerator
from fedjax_api.config import resolve
from tests.fedjax_api.tiny_task import NAME
from tests.fedjax_core.helpers import tiny_softmax_model

GB = 1e9


@pytest.mark.parametrize("backend, memory, per_client, clients, fixed, want", [
    ("cpu", 64 * GB, 1e3, 1000, 0, 1),          # CPU: always 1, whatever fits
    ("gpu", 80 * GB, 1 * GB, 100, 0, 32),        # 40 GB / 1 GB = 40 -> 32
    ("gpu", 80 * GB, 1 * GB, 100, 20 * GB, 16),  # 20 GB left -> 16
    ("gpu", 80 * GB, 100 * GB, 100, 0, 1),       # one client does not fit: still 1
    ("gpu", 80 * GB, 1e6, 10, 0, 8),             # capped by the cohort: 8 <= 10
    ("gpu", 80 * GB, 1e6, 10_000, 0, 256),       # capped by MAX_CHUNK
    ("tpu", 16 * GB, 0.5 * GB, 64, 0, 16),       # 8 GB / 0.5 GB = 16
    ("gpu", None, 1 * GB, 100, 0, 8),            # memory unknown: 8
    ("gpu", 80 * GB, 1 * GB, 100, 50 * GB, 1),   # the fixed part alone is over budget
])
def test_choose_chunk_size(backend, memory, per_client, clients, fixed, want):
    assert accelerator.choose_chunk_size(backend, memory, per_client, clients,
                                         fixed_bytes=fixed) == want


def test_choose_chunk_size_fraction():
    assert accelerator.choose_chunk_size("gpu", 80 * GB, 1 * GB, 100, fraction=0.9) == 64


def test_client_footprint_counts_params_activations_and_batches():
    model = tiny_softmax_model(features=3, classes=4)   # 16 params, 64 bytes
    batch = {"x": jnp.zeros((5, 3)), "y": jnp.zeros(5, jnp.int32)}  # 80 bytes
    one = accelerator.client_footprint(model, batch, steps=1)
    ten = accelerator.client_footprint(model, batch, steps=10)
    assert ten - one == 9 * 80
    assert one >= 4 * 64 + 80


def test_default_chunk_size_on_cpu_is_one_without_compiling():
    from fedjax_api import tasks
    assert accelerator.default_chunk_size(tasks.get(NAME), clients_per_round=3) == 1


def test_chunk_size_option_unset_means_by_backend():
    assert resolve(NAME).chunk_size is None
    assert resolve(NAME, chunk_size=4).chunk_size == 4


@pytest.fixture
def fresh(monkeypatch):
    """As if JAX had not started: `set_deterministic` writes XLA_FLAGS."""
    monkeypatch.setattr(accelerator, "jax_started", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    return monkeypatch


def test_deterministic_on_off_auto(fresh):
    assert accelerator.set_deterministic("on")
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_gpu_deterministic_ops=true"
    assert accelerator.set_deterministic("on")  # idempotent: the flag once
    assert os.environ["XLA_FLAGS"].count("deterministic") == 1
    assert not accelerator.set_deterministic("off")
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
    fresh.setenv("JAX_PLATFORMS", "cpu")
    assert accelerator.expected_backend() == "cpu"
    assert not accelerator.set_deterministic("auto")  # a CPU run: no flag
    fresh.setattr(accelerator, "expected_backend", lambda: "gpu")
    assert accelerator.set_deterministic("auto")       # a GPU run: the flag
    with pytest.raises(ValueError, match="deterministic must be one of auto, on, off"):
        accelerator.set_deterministic("yes")


def test_deterministic_leaves_flags_alone_once_jax_started(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert not accelerator.set_deterministic("on")  # JAX started in this process: too late
    assert "XLA_FLAGS" not in os.environ


def test_run_header_states_backend_and_chunk(tmp_path):
    jax.devices()
    runner = CliRunner()
    res = runner.invoke(app, ["run", NAME, "--rounds", "1", "--clients-per-round", "2",
                              "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "backend cpu (8 devices), chunk size 1 (chosen for cpu)" in res.output
    res = runner.invoke(app, ["run", NAME, "--rounds", "1", "--clients-per-round", "2",
                              "--chunk-size", "2", "--deterministic", "on",
                              "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "chunk size 2 (--chunk-size)" in res.output
    res = runner.invoke(app, ["run", NAME, "--deterministic", "yes", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "deterministic" in res.output
