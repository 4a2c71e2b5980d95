"""Converters into FedJAX's SQLite format: flat arrays, LEAF JSON, TFF SQLite (CIFAR-100)."""

import json
import lzma
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedjax_core.data.convert import (
    arrays_to_sqlite,
    clients_to_sqlite,
    leaf_to_sqlite,
    tff_to_sqlite,
    to_fedjax_arrays,
)
from fedjax_core.data.errors import DataFormatError
from fedjax_core.data.sqlite import SQLiteFederatedData, write_sqlite
from tests.fixtures import FEMNIST_LEAF_SAMPLE

from .test_tff_sqlite import make_tff_db, tiny_cifar

LEAF_SAMPLE = FEMNIST_LEAF_SAMPLE / "test" / "all_data_0_niid_05_keep_0_test_9.json.gz"


def test_clients_to_sqlite_is_write_sqlite():
    assert clients_to_sqlite is write_sqlite


def test_arrays_round_trip_with_int_labels(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.array([10, 11, 12, 13, 14, 15], np.int32)
    owner = np.array([2, 0, 2, 10, 0, 2])
    path = tmp_path / "p.sqlite"
    assert arrays_to_sqlite(path, {"x": x, "y": y}, owner) == 3
    data = SQLiteFederatedData(path)
    assert data.client_ids == ("0", "2", "10")  # sorted by label value
    np.testing.assert_array_equal(data.client_sizes, [2, 3, 1])
    for cid, rows in [("0", [1, 4]), ("2", [0, 2, 5]), ("10", [3])]:  # stable within a client
        got = data.get_client_by_id(cid)
        assert list(got) == ["x", "y"]
        np.testing.assert_array_equal(got["x"], x[rows])
        np.testing.assert_array_equal(got["y"], y[rows])
        assert got["y"].dtype == np.int32


def test_arrays_round_trip_with_str_labels_and_text(tmp_path):
    text = np.array(["a", "bé", "c", "d"])
    owner = np.array(["w2", "w1", "w2", "w1"], object)
    path = tmp_path / "s.sqlite"
    arrays_to_sqlite(path, {"t": text, "n": np.arange(4)}, owner)
    data = SQLiteFederatedData(path)
    assert data.client_ids == ("w1", "w2")
    w1 = data.get_client_by_id("w1")
    assert w1["t"].dtype == object and w1["t"].tolist() == ["bé".encode(), b"d"]
    np.testing.assert_array_equal(w1["n"], [1, 3])


@pytest.mark.parametrize("arrays, owner, match", [
    ({"x": np.ones(3)}, np.array([0, 1]), "one row per example"),
    ({"x": np.ones(2)}, np.array([[0, 1]]), "one label per example"),
    ({"x": np.ones(2)}, np.array([0.5, 1.5]), "integer or str labels"),
    ({}, np.array([0]), "at least one feature"),
    ({"x": np.array([object(), object()], object)}, np.array([0, 1]), "hold str or bytes"),
])
def test_arrays_errors_leave_nothing(tmp_path, arrays, owner, match):
    with pytest.raises(ValueError, match=match):
        arrays_to_sqlite(tmp_path / "e.sqlite", arrays, owner)
    assert os.listdir(tmp_path) == []


def test_to_fedjax_arrays():
    got = to_fedjax_arrays({"u": np.array([["é", "b"]]), "s": np.array([b"x", b"yz"]),
                            "o": np.array(["a", b"b"], object), "n": np.arange(3)})
    assert got["u"].dtype == object and got["u"].shape == (1, 2)
    assert got["u"].tolist() == [["é".encode(), b"b"]]
    assert got["s"].tolist() == [b"x", b"yz"] and got["o"].tolist() == [b"a", b"b"]
    assert got["n"].dtype == np.arange(3).dtype


def test_tff_cifar_to_sqlite_as_fedjax_does(tmp_path):
    rows, want = tiny_cifar()
    tff = make_tff_db(tmp_path / "cifar100.sqlite", rows)
    out = tmp_path / "federated_cifar100_train.sqlite"
    assert tff_to_sqlite(tff, "train", out) == 3
    with sqlite3.connect(out) as c:  # FedJAX keeps TFF's TEXT ids, in ORDER BY client_id order
        assert c.execute("SELECT client_id, typeof(client_id), num_examples FROM federated_data "
                         "ORDER BY rowid").fetchall() == [("1", "text", 1), ("10", "text", 2),
                                                          ("2", "text", 3)]
    data = SQLiteFederatedData(out)
    for cid in data.client_ids:
        got, w = data.get_client_by_id(cid), want[("train", cid)]
        assert list(got) == ["coarse_label", "image", "label"]
        assert got["image"].dtype == np.uint8 and got["label"].dtype == np.int64
        np.testing.assert_array_equal(got["image"], np.stack(w["image"]))
        np.testing.assert_array_equal(got["label"], w["label"])
        np.testing.assert_array_equal(got["coarse_label"], w["coarse_label"])
    with pytest.raises(FileExistsError):
        tff_to_sqlite(tff, "train", out)


@pytest.mark.parametrize("fmt", [lzma.FORMAT_ALONE, lzma.FORMAT_XZ])
def test_tff_lzma_input(tmp_path, fmt):
    rows, _ = tiny_cifar()
    tff = make_tff_db(tmp_path / "cifar100.sqlite", rows)
    packed = tmp_path / "cifar100.sqlite.lzma"
    packed.write_bytes(lzma.compress(tff.read_bytes(), format=fmt))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert tff_to_sqlite(packed, "test", out_dir / "test.sqlite") == 1
    assert os.listdir(out_dir) == ["test.sqlite"]  # the decompressed copy is gone
    assert SQLiteFederatedData(out_dir / "test.sqlite").client_ids == ("0",)
    packed.write_bytes(packed.read_bytes()[:200])
    with pytest.raises(DataFormatError, match="not a complete LZMA file"):
        tff_to_sqlite(packed, "test", out_dir / "cut.sqlite")
    with pytest.raises(DataFormatError, match="no clients in split 'dev'"):
        tff_to_sqlite(tff, "dev", out_dir / "dev.sqlite")
    assert os.listdir(out_dir) == ["test.sqlite"]


def write_leaf(path: Path, users: dict) -> Path:
    path.write_text(json.dumps({"users": list(users), "num_samples": [len(u["y"]) for u in
                                                                      users.values()],
                                "user_data": users}))
    return path


def test_leaf_femnist_and_shakespeare_to_sqlite(tmp_path):
    from fedjax_core.data.leaf import load_leaf

    rng = np.random.default_rng(0)
    femnist = write_leaf(tmp_path / "femnist.json", {
        "f0002_41": {"x": (rng.integers(0, 256, (3, 784)) / 255).tolist(), "y": [1, 61, 7]},
        "f0001_02": {"x": (rng.integers(0, 256, (1, 784)) / 255).tolist(), "y": [0]}})
    shakespeare = write_leaf(tmp_path / "shakespeare.json", {
        "HAMLET": {"x": ["To be, or not to b", "été"], "y": ["e", "!"]}})
    for leaf in (femnist, shakespeare):
        out = leaf.with_suffix(".sqlite")
        expected = load_leaf(leaf)
        assert leaf_to_sqlite(leaf, out) == len(expected.client_ids)
        data = SQLiteFederatedData(out)
        assert data.client_ids == tuple(expected.client_ids)
        np.testing.assert_array_equal(data.client_sizes, expected.client_sizes)
        for i in range(len(data)):
            want = to_fedjax_arrays(expected.get_client(i))
            got = data.get_client(i)
            assert set(got) == set(want)
            for key in want:
                assert got[key].dtype == want[key].dtype
                np.testing.assert_array_equal(got[key], want[key])
    text = SQLiteFederatedData(shakespeare.with_suffix(".sqlite")).get_client(0)
    assert text["x"].dtype == object and text["x"][1] == "été".encode()


def test_leaf_sample_shard_to_sqlite(tmp_path):
    from fedjax_core.data.leaf import load_leaf

    out = tmp_path / "femnist_test_0.sqlite"
    n = leaf_to_sqlite(LEAF_SAMPLE, out)
    expected = load_leaf(LEAF_SAMPLE)
    data = SQLiteFederatedData(out)
    assert n == len(data) == len(expected.client_ids) > 0
    for i in (0, len(data) - 1):
        for key, want in expected.get_client(i).items():
            np.testing.assert_array_equal(data.get_client(i)[key], want)
