"""`fedjax_api.partition_plot`: label counts per client, and the stacked-bar figure."""

import numpy as np
import pytest

from fedjax_api.errors import ConfigError
from fedjax_api.partition_plot import label_counts, plot_label_distribution
from fedjax_core.data import InMemoryFederatedData

DATA = InMemoryFederatedData({
    "a": {"y": np.array([0, 2, 2]), "x": np.zeros((3, 2))},
    "b": {"y": np.array([5]), "x": np.zeros((1, 2))},
    "c": {"y": np.array([2, 2, 0, 0]), "x": np.zeros((4, 2))},
})


def test_label_counts_are_per_client_and_per_label():
    counts = label_counts(DATA, "y", max_clients=None)
    assert counts.client_ids == ("a", "b", "c")
    assert counts.labels.tolist() == [0, 2, 5]
    assert counts.counts.tolist() == [[1, 2, 0], [0, 0, 1], [2, 2, 0]]
    first = label_counts(DATA, "y", max_clients=2)
    assert first.client_ids == ("a", "b") and first.counts.tolist() == [[1, 2, 0], [0, 0, 1]]


def test_label_mistakes_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="feature 'x' has shape"):
        label_counts(DATA, "x")
    with pytest.raises(ConfigError, match="no feature 'z' .the clients have x, y."):
        label_counts(DATA, "z")
    with pytest.raises(ConfigError, match="--max-clients must be >= 1"):
        label_counts(DATA, "y", max_clients=0)
    pytest.importorskip("matplotlib")
    with pytest.raises(ConfigError, match="end the file name in .png, .pdf or .svg"):
        plot_label_distribution(DATA, tmp_path / "p.bmpx")


def test_percent_bars_sum_to_100(tmp_path):
    pytest.importorskip("matplotlib")
    counts = plot_label_distribution(DATA, tmp_path / "p.svg", percent=True)
    assert counts.counts.sum() == 8
    svg = (tmp_path / "p.svg").read_text()
    assert "share of examples (%)" in svg and "<svg" in svg
