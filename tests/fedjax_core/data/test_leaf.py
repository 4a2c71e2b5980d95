"""LEAF JSON loading: the real FEMNIST sample's counts, the three layouts, and malformed files."""

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pytest

from fedjax_core.data.errors import DataFormatError
from fedjax_core.data.federated_data import InMemoryFederatedData
from fedjax_core.data.leaf import load_leaf
from tests.fixtures import FEMNIST_LEAF_SAMPLE

SAMPLE = FEMNIST_LEAF_SAMPLE


# ----------------------------------------------------------------------------- the real sample

@pytest.fixture(scope="module")
def femnist_train():
    start = time.perf_counter()
    data = load_leaf(SAMPLE / "train")
    print(f"\nFEMNIST sample train: {time.perf_counter() - start:.2f} s")
    return data


@pytest.fixture(scope="module")
def femnist_test():
    start = time.perf_counter()
    data = load_leaf(SAMPLE / "test", layout="femnist")
    print(f"\nFEMNIST sample test: {time.perf_counter() - start:.2f} s")
    return data


def _labels(data):
    return np.concatenate([data.get_client(i)["y"] for i in range(len(data))])


def test_femnist_sample_train_counts(femnist_train):
    sizes = femnist_train.client_sizes
    assert isinstance(femnist_train, InMemoryFederatedData)
    assert len(femnist_train) == 105
    assert int(sizes.sum()) == 14_708
    assert (int(sizes.min()), float(np.median(sizes)), int(sizes.max())) == (4, 152.0, 165)
    assert np.array_equal(np.unique(_labels(femnist_train)), np.arange(62))


def test_femnist_sample_test_counts_and_overlap(femnist_train, femnist_test):
    assert len(femnist_test) == 184
    assert int(femnist_test.client_sizes.sum()) == 4_088
    assert np.array_equal(np.unique(_labels(femnist_test)), np.arange(62))
    assert len(set(femnist_train.client_ids) & set(femnist_test.client_ids)) == 105


def test_femnist_sample_representation(femnist_train):
    client = femnist_train.get_client(0)
    x, y = client["x"], client["y"]
    assert x.dtype == np.float32 and x.shape == (len(y), 28, 28)
    assert y.dtype == np.int32 and y.shape == (femnist_train.client_sizes[0],)
    assert x.min() >= 0.0 and x.max() <= 1.0
    # Values are k/255 as stored: rounding to the uint8 grid changes nothing.
    assert np.array_equal((np.round(x * 255) / 255).astype(np.float32), x)
    assert femnist_train.client_ids[0].startswith("f")  # writer ids like f3313_11


def test_femnist_sample_one_shard_matches_folder(femnist_train):
    shard = sorted((SAMPLE / "train").glob("*.json.gz"))[0]
    one = load_leaf(shard)
    assert one.client_ids == femnist_train.client_ids[:len(one)]
    for i in range(len(one)):
        for k in ("x", "y"):
            assert np.array_equal(one.get_client(i)[k], femnist_train.get_client(i)[k])
    with gzip.open(shard) as f:
        raw = json.load(f)
    user = raw["users"][0]
    expected = np.asarray(raw["user_data"][user]["x"], np.float64).astype(np.float32)
    assert np.array_equal(one.get_client(0)["x"].reshape(len(expected), 784), expected)
    assert one.get_client(0)["y"].tolist() == raw["user_data"][user]["y"]


# ----------------------------------------------------------------------------- tiny files

def _femnist_doc(users=("u1", "u2"), sizes=(2, 1), value=0.5):
    doc = {"users": list(users), "num_samples": list(sizes), "user_data": {}}
    for u, n in zip(users, sizes):
        doc["user_data"][u] = {"x": [[value] * 784 for _ in range(n)],
                               "y": [i % 62 for i in range(n)]}
    return doc


def _write(path: Path, doc, gz=False) -> Path:
    text = json.dumps(doc).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


def test_femnist_tiny_file_and_gz(tmp_path):
    for gz in (False, True):
        path = _write(tmp_path / ("a.json.gz" if gz else "a.json"), _femnist_doc(), gz)
        data = load_leaf(path)
        assert data.client_ids == ("u1", "u2")
        assert data.client_sizes.tolist() == [2, 1]
        assert data.get_client(0)["x"].shape == (2, 28, 28)
        assert np.all(data.get_client(0)["x"] == np.float32(0.5))
        assert data.get_client(0)["y"].tolist() == [0, 1]


def test_folder_reads_shards_in_sorted_order_and_ignores_other_files(tmp_path):
    _write(tmp_path / "b.json.gz", _femnist_doc(("w3",), (1,)), gz=True)
    _write(tmp_path / "a.json", _femnist_doc(("w1", "w2"), (1, 2)))
    (tmp_path / "notes.txt").write_text("not a shard")
    data = load_leaf(tmp_path)
    assert data.client_ids == ("w1", "w2", "w3")
    assert data.client_sizes.tolist() == [1, 2, 1]


def test_user_with_no_examples_is_kept(tmp_path):
    doc = _femnist_doc(("a", "b"), (0, 2))
    data = load_leaf(_write(tmp_path / "d.json", doc))
    assert data.client_sizes.tolist() == [0, 2]
    assert data.get_client(0)["x"].shape == (0, 28, 28)


def test_shakespeare_layout(tmp_path):
    snippet = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to su"
    assert len(snippet) == 80
    doc = {"users": ["HAMLET"], "num_samples": [2],
           "user_data": {"HAMLET": {"x": [snippet, snippet[1:] + "f"], "y": ["f", "f"]}}}
    data = load_leaf(_write(tmp_path / "s.json", doc))  # auto: strings -> shakespeare
    client = data.get_client(0)
    assert client["x"].dtype == np.dtype("S80") and client["x"].shape == (2,)
    assert client["x"][0].decode("utf-8") == snippet
    assert client["y"].tolist() == [b"f", b"f"]
    codes = client["x"].view(np.uint8).reshape(2, 80)
    assert bytes(codes[0]) == snippet.encode()
    assert np.array_equal(load_leaf(tmp_path / "s.json", layout="shakespeare").get_client(0)["x"],
                          client["x"])


def test_shakespeare_label_must_be_one_character(tmp_path):
    doc = {"users": ["A"], "num_samples": [1], "user_data": {"A": {"x": ["abc"], "y": ["de"]}}}
    with pytest.raises(DataFormatError, match="not one character"):
        load_leaf(_write(tmp_path / "s.json", doc))


def _tweet(text):
    return ["1467810369", "Mon Apr 06 22:19:45 PDT 2009", "NO_QUERY", "someone", text, "training"]


def test_sent140_layout_with_01_labels(tmp_path):
    doc = {"users": ["alice", "bob"], "num_samples": [2, 1],
           "user_data": {"alice": {"x": [_tweet("good day"), _tweet("bad day")], "y": [1, 0]},
                         "bob": {"x": [_tweet("caf\u00e9")], "y": [1]}}}
    data = load_leaf(_write(tmp_path / "t.json", doc))
    assert data.get_client(0)["x"].tolist() == [b"good day", b"bad day"]
    assert data.get_client(0)["y"].dtype == np.int32
    assert data.get_client(0)["y"].tolist() == [1, 0]
    assert data.get_client(1)["x"][0].decode("utf-8") == "caf\u00e9"


def test_sent140_raw_polarity_labels_map_as_leaf_does(tmp_path):
    doc = {"users": ["a"], "num_samples": [3],
           "user_data": {"a": {"x": [_tweet("x"), _tweet("y"), _tweet("z")], "y": ["4", "0", "2"]}}}
    data = load_leaf(_write(tmp_path / "t.json", doc), layout="sent140")
    assert data.get_client(0)["y"].tolist() == [1, 0, 0]


def test_sent140_rejects_unknown_labels(tmp_path):
    doc = {"users": ["a"], "num_samples": [2],
           "user_data": {"a": {"x": [_tweet("x"), _tweet("y")], "y": [1, 4]}}}
    with pytest.raises(DataFormatError, match="neither 0/1 nor polarities"):
        load_leaf(_write(tmp_path / "t.json", doc))


def test_layout_argument_is_checked(tmp_path):
    with pytest.raises(ValueError, match="layout must be"):
        load_leaf(_write(tmp_path / "a.json", _femnist_doc()), layout="celeba")


# ----------------------------------------------------------------------------- malformed files

def _bad(tmp_path: Path, name: str, content, match: str, layout="auto"):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _write(path, content)
    with pytest.raises(DataFormatError, match=match) as info:
        load_leaf(path, layout=layout)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert isinstance(info.value, ValueError)
    return message


def test_not_json(tmp_path):
    _bad(tmp_path, "a.json", b"{\"users\": [", "not valid JSON")
    _bad(tmp_path, "b.json", b"\xff\xfe\x00garbage\x9c", "not UTF-8|not valid JSON")


def test_truncated_gzip(tmp_path):
    full = gzip.compress(json.dumps(_femnist_doc()).encode())
    _bad(tmp_path, "a.json.gz", full[: len(full) // 2], "not a complete gzip file")


def test_gz_name_but_not_gzip(tmp_path):
    _bad(tmp_path, "a.json.gz", b"plain text", "not a complete gzip file")


def test_top_level_not_an_object(tmp_path):
    _bad(tmp_path, "a.json", [1, 2], "top-level JSON value is a list")


def test_missing_keys(tmp_path):
    doc = _femnist_doc()
    del doc["num_samples"]
    message = _bad(tmp_path, "a.json", doc, "missing key")
    assert "'num_samples'" in message


def test_num_samples_disagrees_with_x(tmp_path):
    doc = _femnist_doc()
    doc["num_samples"] = [3, 1]
    message = _bad(tmp_path, "a.json", doc, "num_samples says 3 but x has 2 examples")
    assert "'u1'" in message


def test_num_samples_length_disagrees_with_users(tmp_path):
    doc = _femnist_doc()
    doc["num_samples"] = [2]
    _bad(tmp_path, "a.json", doc, "lists 2 users but 'num_samples' has 1")


def test_users_disagree_with_user_data(tmp_path):
    doc = _femnist_doc()
    doc["users"] = ["u1", "u3"]
    _bad(tmp_path, "a.json", doc, "'u3' is in 'users' but not in 'user_data'")
    doc = _femnist_doc()
    doc["user_data"]["extra"] = {"x": [], "y": []}
    _bad(tmp_path, "b.json", doc, "'extra' is in 'user_data' but not in 'users'")


def test_user_listed_twice(tmp_path):
    doc = _femnist_doc()
    doc["users"] = ["u1", "u1"]
    _bad(tmp_path, "a.json", doc, "listed twice")


def test_x_y_length_mismatch(tmp_path):
    doc = _femnist_doc()
    doc["user_data"]["u1"]["y"] = [0]
    _bad(tmp_path, "a.json", doc, "x has 2 examples but y has 1 labels")


def test_femnist_row_must_have_784_values(tmp_path):
    doc = _femnist_doc()
    doc["user_data"]["u2"]["x"][0] = [0.5] * 783
    message = _bad(tmp_path, "a.json", doc, "x has 783 values, FEMNIST needs 784")
    assert "'u2' example 0" in message
    doc = _femnist_doc((("u1",)), (1,))
    doc["user_data"]["u1"]["x"] = [[0.5] * 785]  # rectangular but wrong width
    _bad(tmp_path, "b.json", doc, "x has 785 values", layout="femnist")


def test_femnist_pixels_and_labels_are_checked(tmp_path):
    _bad(tmp_path, "a.json", _femnist_doc(value=2.0), "outside \\[0, 1\\]")
    doc = _femnist_doc()
    doc["user_data"]["u1"]["y"] = [0, 62]
    _bad(tmp_path, "b.json", doc, "labels outside 0..61")
    doc = _femnist_doc()
    doc["user_data"]["u1"]["y"] = [0, 1.5]
    _bad(tmp_path, "c.json", doc, "not a list of integer labels")


def test_wrong_layout_is_reported(tmp_path):
    _bad(tmp_path, "a.json", _femnist_doc(), "is a list, not a string", layout="shakespeare")


def test_undetectable_layout(tmp_path):
    doc = {"users": ["a"], "num_samples": [1], "user_data": {"a": {"x": [{"k": 1}], "y": [0]}}}
    _bad(tmp_path, "a.json", doc, "cannot tell the LEAF layout")
    doc = _femnist_doc(("a",), (0,))
    _bad(tmp_path, "b.json", doc, "no user has any example")


def test_user_in_two_shards_is_an_error(tmp_path):
    _write(tmp_path / "a.json", _femnist_doc(("u1", "u2"), (1, 1)))
    second = _write(tmp_path / "b.json", _femnist_doc(("u2",), (1,)))
    with pytest.raises(DataFormatError, match="'u2' also appears in") as info:
        load_leaf(tmp_path)
    assert str(second) in str(info.value) and str(tmp_path / "a.json") in str(info.value)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_leaf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no"):
        load_leaf(tmp_path)
