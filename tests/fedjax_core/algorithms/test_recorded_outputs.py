"""Every algorithm still gives the outputs recorded before the round-skeleton refactor.

tests/fixtures/algorithm_outputs.npz (see tests/fixtures/README.md) holds each entry's
final state and every round's metrics; each entry is rerun through
`recorded.run_recorded` and compared at 1e-6 (absolute and relative). The params and the
metrics must be there and equal; any other state leaf whose key path still exists must be
equal (a refactor may rename or drop bookkeeping, never change a number).
"""

import numpy as np
import pytest

from fedjax_core.aggregate import registry as aggregators
from fedjax_core.algorithms import registry
from tests.fedjax_core.algorithms import recorded

TOL = 1e-6
RECORDING = recorded.load()


def assert_equal(got, want, key):
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{key}: {got.dtype}{got.shape} now, {want.dtype}{want.shape} recorded")
    if np.issubdtype(want.dtype, np.inexact):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL, err_msg=key)
    else:  # integers, booleans, PRNG key data: exactly
        np.testing.assert_array_equal(got, want, err_msg=key)


@pytest.mark.parametrize("name", sorted(RECORDING))
def test_entry_matches_its_recording(name):
    want = RECORDING[name]
    prefix = f"{name}/"
    got = {k[len(prefix):]: v for k, v in recorded.run_entry(recorded.parse(name)).items()}
    params = [k for k in want if k.startswith("state/.params")]
    metrics = [k for k in want if k.startswith("metrics/")]
    assert params and len(metrics) >= 3 * 2, "the recording lost its params or metrics"
    for key in params + metrics:
        assert key in got, f"{name}: {key} is recorded but no longer produced"
    checked = 0
    for key, value in want.items():
        if key in got:
            assert_equal(got[key], value, f"{name}/{key}")
            checked += 1
    assert checked >= len(params) + len(metrics)


def test_every_entry_name_round_trips():
    for name in RECORDING:
        assert recorded.parse(name).name == name


def test_every_algorithm_and_aggregator_is_recorded():
    """A new algorithm or aggregator must be recorded (regenerate the fixture, see
    tests/fixtures/README.md); the recording is exactly `recorded.entries()`."""
    entries = [recorded.parse(name) for name in RECORDING]
    algorithms = {e.algorithm for e in entries}
    used = {e.aggregator for e in entries}
    assert set(registry.ALGORITHMS) <= algorithms, set(registry.ALGORITHMS) - algorithms
    assert set(aggregators.AGGREGATORS) <= used, set(aggregators.AGGREGATORS) - used
    assert sorted(RECORDING) == sorted(e.name for e in recorded.entries())
    assert any(e.devices > 1 for e in entries) and any(e.chunk_size > 1 for e in entries)
