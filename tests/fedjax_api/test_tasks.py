"""Every canned task loads and trains a round offline, from files shaped like the real ones."""

import json

import numpy as np
import pytest

from fedjax_api import ConfigError, Experiment, config, tasks
from fedjax_api.datasets import catalog
from fedjax_core.data.sqlite import write_sqlite
from tests.fixtures import FEMNIST_LEAF_SAMPLE

FEMNIST = FEMNIST_LEAF_SAMPLE


def _write(name, split, clients):
    path = catalog.local_paths(name)[split]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_sqlite(path, clients.items())


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """FEDJAX_DATA with tiny files in the layout and encoding of the published ones."""
    monkeypatch.setenv("FEDJAX_DATA", str(tmp_path))
    rng = np.random.default_rng(0)
    for name, classes in (("emnist", 62), ("emnist-digits", 10)):
        for split in ("train", "test"):
            _write(name, split, {f"f{i:04d}_00": {
                "pixels": rng.random((n, 28, 28), dtype=np.float32),
                "label": rng.integers(0, classes, n).astype(np.int32)} for i, n in enumerate((3, 5))})
    for split in ("train", "test"):
        _write("shakespeare", split, {
            "THE_TEMPEST_MIRANDA": {"snippets": np.array([b"O, I have suffered", b"With those"], object)},
            "HAMLET_HAMLET": {"snippets": np.array([b"To be, or not to be"], object)}})
        _write("cifar100", split, {str(i): {
            "image": rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
            "label": rng.integers(0, 100, n).astype(np.int64),
            "coarse_label": rng.integers(0, 20, n).astype(np.int64)} for i, n in enumerate((4, 2))})
    for split in ("train", "held_out", "test"):
        _write("stackoverflow", split, {"u1": {
            "tokens": np.array([b"how do i sort a list", b"use sorted"], object),
            "type": np.array([b"question", b"answer"], object)}})
    catalog.local_paths("stackoverflow")["word_count"].write_text(
        "".join(f"{w} {100 - i}\n" for i, w in enumerate("a i do how list sort use sorted".split())))
    return tmp_path


@pytest.mark.parametrize("name", ["emnist", "emnist-digits", "shakespeare", "stackoverflow",
                                  "cifar100"])
def test_file_backed_task_trains_one_round_offline(fake_cache, name, tmp_path):
    cfg = config.resolve(name, rounds=1, clients_per_round=1, eval_train_clients=1,
                         out=str(tmp_path / "run"))
    result = Experiment.from_config(cfg).run()
    assert np.isfinite(result.final["test"]["loss"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["task"] == name


def test_task_shapes_match_fedjax(fake_cache):
    emnist = tasks.get("emnist")
    c = emnist.train.data.get_client(0)
    assert c["x"].shape == (3, 28, 28, 1) and c["x"].dtype == np.float32
    so = tasks.get("stackoverflow")
    c = so.train.data.get_client(0)
    assert c["x"].shape == (2, 20) and c["x"][0, 0] == 1  # BOS
    assert so.test.data.get_client(0)["x"].shape == (2, 20)  # FedJAX's task: 20 for test too
    assert so.train.max_steps == 500
    cifar = tasks.get("cifar100")
    cohort = cifar.train.sample(clients=1, round=0)
    assert cohort.batches["x"].shape[-3:] == (24, 24, 3) and cohort.batches["x"].dtype == np.float32
    # Central crops, standardised per image: each real image has mean 0.
    real = cohort.batches["x"][cohort.mask]
    np.testing.assert_allclose(real.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    assert cifar.test.data.get_client(0)["x"].shape[1:] == (24, 24, 3)
    sh = tasks.get("shakespeare")
    assert sh.train.data.get_client(0)["x"].shape[1] == 80


def test_missing_files_name_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDJAX_DATA", str(tmp_path))
    for name in ("emnist", "shakespeare", "stackoverflow", "cifar100"):
        with pytest.raises(ConfigError, match=f"fedjax data download {name}"):
            tasks.get(name)
        if name == "stackoverflow":  # reads --data DIR of FedJAX's file names (below)
            continue
        with pytest.raises(ConfigError, match="takes no --data"):
            tasks.get(name, data_path=str(tmp_path))


def _write_stackoverflow_dir(folder, splits=("train", "test")):
    folder.mkdir(exist_ok=True)
    for split, clients in (("train", {"u1": [b"how do i sort a list", b"use sorted"],
                                      "u2": [b"sort it"]}),
                           ("test", {"u3": [b"a list of words"]})):
        if split in splits:
            write_sqlite(folder / f"stackoverflow_{split}.sqlite", [
                (cid, {"tokens": np.array(posts, object),
                       "type": np.array([b"question"] + [b"answer"] * (len(posts) - 1), object)})
                for cid, posts in clients.items()])
    (folder / "stackoverflow.word_count").write_text(
        "".join(f"{w} {100 - i}\n" for i, w in enumerate("a list sort how".split())))


def test_stackoverflow_reads_a_data_folder_of_fedjax_file_names(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDJAX_DATA", str(tmp_path / "empty-cache"))  # not read
    _write_stackoverflow_dir(tmp_path / "so")
    t = tasks.get("stackoverflow", data_path=str(tmp_path / "so"))
    assert (t.train.num_clients, t.train.num_examples, t.test.num_examples) == (2, 3, 1)
    c = t.train.data.get_client(0)
    # vocabulary a=3 list=4 sort=5 how=6, OOV 4 + 3 = 7: "how do i sort a list" -> x, y
    assert c["x"][0, :7].tolist() == [1, 6, 7, 7, 5, 3, 4]
    assert c["y"][0, :7].tolist() == [6, 7, 7, 5, 3, 4, 2]
    assert c["domain_id"].tolist() == [0, 1]


def test_stackoverflow_data_folder_missing_a_file_names_it(tmp_path):
    _write_stackoverflow_dir(tmp_path / "so", splits=("train",))
    with pytest.raises(ConfigError, match=r"stackoverflow_test\.sqlite: no such file"):
        tasks.get("stackoverflow", data_path=str(tmp_path / "so"))
    with pytest.raises(ConfigError, match="is not a folder"):
        tasks.get("stackoverflow", data_path=str(tmp_path / "nowhere"))


def test_synthetic_task():
    t = tasks.get("synthetic")
    assert t.train.num_clients == 30 and t.train.epochs == 20
    assert t.train.data.get_client(0)["x"].shape[1] == 60


def test_femnist_leaf_task(tmp_path):
    t = tasks.get("femnist-leaf", data_path=str(FEMNIST))
    assert (t.train.num_clients, t.train.num_examples) == (105, 14708)
    assert (t.test.num_clients, t.test.num_examples) == (184, 4088)
    x = t.train.data.get_client(0)["x"]
    assert x.shape[1:] == (28, 28, 1) and abs(float(np.median(x))) < 1e-6  # white background -> 0
    with pytest.raises(ConfigError, match="pass --data DIR"):
        tasks.get("femnist-leaf")
    with pytest.raises(ConfigError, match="must hold the LEAF folders"):
        tasks.get("femnist-leaf", data_path=str(tmp_path))


def test_bad_data_folders_are_one_line_config_errors(tmp_path):
    empty = tmp_path / "leaf"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        tasks.get("femnist-leaf", data_path=str(empty))
    for split in ("train", "test"):
        (empty / split / "a.json").write_text(json.dumps(
            {"users": ["u"], "num_samples": [0], "user_data": {"u": {"x": [], "y": []}}}))
    with pytest.raises(ConfigError, match="every LEAF user there has 0 examples"):
        tasks.get("femnist-leaf", data_path=str(empty))
    plays = tmp_path / "plays"
    plays.mkdir()
    (plays / "hamlet.md").write_bytes(bytes(range(256)) * 4)  # binary, not UTF-8
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        tasks.get("shakespeare-plays", data_path=str(plays))
    (plays / "hamlet.md").write_text("no speeches here\n")
    with pytest.raises(ConfigError, match="no speeches found"):
        tasks.get("shakespeare-plays", data_path=str(plays))


def test_a_client_of_another_dataset_names_the_client(fake_cache):
    from fedjax_core.data.errors import DataFormatError

    catalog.local_paths("emnist")["train"].unlink()
    _write("emnist", "train", {"f0001_00": {"pixels": np.zeros((2, 28, 28), np.float32),
                                      "label": np.zeros(2, np.int32)},
                               "f0002_00": {"image": np.zeros((2, 28, 28), np.float32),
                                      "label": np.zeros(2, np.int32)}})
    t = tasks.get("emnist")
    t.train.data.get_client(0)
    with pytest.raises(DataFormatError, match="client 'f0002_00' has no feature 'pixels' "
                                              r"\(it has image, label\)"):
        t.train.data.get_client(1)
