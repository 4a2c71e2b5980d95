"""benchmarks/emnist_like.py draws the same data as FedJAX's benchmark generator."""

import importlib.util

import numpy as np
import pytest

from benchmarks import emnist_like
from tests.fixtures import SYNTH_EMNIST

SYNTH = SYNTH_EMNIST


@pytest.fixture(scope="module")
def synth():
    spec = importlib.util.spec_from_file_location("synth_emnist", SYNTH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sizes_schedule_and_test_split_match_fedjax_benchmark(synth):
    np.testing.assert_array_equal(emnist_like.client_sizes(), synth.client_sizes())
    np.testing.assert_array_equal(emnist_like.round_schedule(6), synth.round_schedule(6))
    np.testing.assert_array_equal(emnist_like.round_schedule(3, clients_per_round=100),
                                  synth.round_schedule(3, clients_per_round=100))
    ours, theirs = emnist_like.make_test(300), synth.make_test(300)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    assert [emnist_like.client_id(i) for i in (0, 1234)] == [
        synth.client_id(i).decode() for i in (0, 1234)]


def test_train_clients_match_fedjax_benchmark(synth):
    sizes, offsets, pixels, labels = synth.make_train(12)
    data = emnist_like.EmnistLikeData(emnist_like.client_sizes(12), keep=[3, 7])
    for i in (3, 7, int(np.argmax(sizes))):
        s, n = offsets[i], sizes[i]
        client = data.get_client(i)
        np.testing.assert_array_equal(client["y"], labels[s:s + n])
        np.testing.assert_array_equal(client["x"][..., 0], 1.0 - pixels[s:s + n])
    with pytest.raises(KeyError, match="not materialised"):
        data.get_client(5)


def test_kept_rows_equal_the_full_stream_across_chunks(monkeypatch):
    monkeypatch.setattr(emnist_like, "CHUNK", 64)  # several chunks in a small stream
    full_pixels, full_labels = emnist_like.make_examples(300, seed=4)
    rows = np.array([0, 5, 63, 64, 65, 200, 299])
    pixels, labels = emnist_like.make_examples(300, seed=4, rows=rows)
    np.testing.assert_array_equal(pixels, full_pixels[rows])
    np.testing.assert_array_equal(labels, full_labels[rows])
