"""`fedjax data ...` commands, offline."""

import numpy as np
from typer.testing import CliRunner

from cli.main import app
from fedjax_core.data.sqlite import SQLiteFederatedData, write_sqlite
from tests.fixtures import FEMNIST_LEAF_SAMPLE

runner = CliRunner()


def flat(res) -> str:
    """The output with line wrapping undone (rich wraps at the terminal width)."""
    return " ".join(res.output.split())
FEMNIST = FEMNIST_LEAF_SAMPLE


def test_list_shows_catalog_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDJAX_DATA", str(tmp_path))
    res = runner.invoke(app, ["data", "list"])
    assert res.exit_code == 0
    for name in ("cifar100", "emnist", "shakespeare", "stackoverflow"):
        assert name in flat(res)


def test_info_on_sqlite_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDJAX_DATA", str(tmp_path))
    path = tmp_path / "d.sqlite"
    write_sqlite(path, [("a", {"x": np.zeros((3, 2), np.float32)}),
                        ("b", {"x": np.zeros((5, 2), np.float32)})])
    res = runner.invoke(app, ["data", "info", str(path)])
    assert res.exit_code == 0, res.output
    assert "2 clients, 8 examples" in flat(res) and "float32" in flat(res)
    res = runner.invoke(app, ["data", "info", "emnist"])
    assert res.exit_code == 2 and "fedjax data download emnist" in flat(res)
    res = runner.invoke(app, ["data", "info", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "neither a dataset name" in flat(res)
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database at all" * 50)
    res = runner.invoke(app, ["data", "info", str(bad)])
    assert res.exit_code == 2 and "Traceback" not in flat(res)


def test_info_and_convert_leaf(tmp_path):
    res = runner.invoke(app, ["data", "info", str(FEMNIST / "test")])
    assert res.exit_code == 0 and "184 clients, 4088 examples" in flat(res)
    out = tmp_path / "femnist_test.sqlite"
    res = runner.invoke(app, ["data", "convert", str(FEMNIST / "test"), str(out)])
    assert res.exit_code == 0, res.output
    data = SQLiteFederatedData(out)
    assert len(data.client_ids) == 184 and int(data.client_sizes.sum()) == 4088
    res = runner.invoke(app, ["data", "convert", str(FEMNIST / "test"), str(out)])
    assert res.exit_code == 2 and "--overwrite" in flat(res)


def test_partition_npz(tmp_path):
    src = tmp_path / "central.npz"
    np.savez(src, x=np.arange(40, dtype=np.float32).reshape(20, 2), y=np.repeat(np.arange(4), 5))
    out = tmp_path / "fed.sqlite"
    res = runner.invoke(app, ["data", "partition", str(src), str(out), "--method", "shards",
                              "--clients", "4", "--shards-per-client", "1"])
    assert res.exit_code == 0, res.output
    data = SQLiteFederatedData(out)
    assert sorted(data.client_sizes.tolist()) == [5, 5, 5, 5]
    for i in range(4):
        assert len(set(data.get_client(i)["y"].tolist())) == 1  # one label per shard
    res = runner.invoke(app, ["data", "partition", str(src), str(tmp_path / "o.sqlite"),
                              "--method", "magic"])
    assert res.exit_code == 2 and "unknown method 'magic'" in flat(res)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object))
    res = runner.invoke(app, ["data", "partition", str(pickled), str(tmp_path / "p.sqlite")])
    assert res.exit_code == 2 and "pickle-free" in flat(res)
    assert not (tmp_path / "p.sqlite").exists()


def test_download_unknown_name():
    res = runner.invoke(app, ["data", "download", "imagenet"])
    assert res.exit_code == 2 and "imagenet" in flat(res)


def _corrupt_row(path, rowid, column, value):
    import sqlite3

    with sqlite3.connect(path) as c:
        c.execute(f"UPDATE federated_data SET {column} = ? WHERE rowid = ?", (value, rowid))


def test_info_check_decodes_every_client(tmp_path):
    path = tmp_path / "d.sqlite"
    write_sqlite(path, [(f"c{i}", {"x": np.zeros((i + 1, 2), np.float32)}) for i in range(4)])
    res = runner.invoke(app, ["data", "info", str(path), "--check"])
    assert res.exit_code == 0 and "all 4 clients OK" in flat(res), res.output
    _corrupt_row(path, 3, "data", b"not zlib")  # the third client: info alone decodes the first
    res = runner.invoke(app, ["data", "info", str(path)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["data", "info", str(path), "--check"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "client 3 of 4 is bad:" in flat(res) and "client 'c2': data blob is not zlib" in flat(res)
    assert len([ln for ln in res.output.splitlines() if ln.startswith("error:")]) == 1
    write_sqlite(path, [(f"c{i}", {"x": np.zeros((i + 1, 2), np.float32)}) for i in range(4)],
                 overwrite=True)
    _corrupt_row(path, 4, "num_examples", 9)  # a wrong count on the last client
    res = runner.invoke(app, ["data", "info", str(path), "--check"])
    assert res.exit_code == 2
    assert "client 4 of 4 is bad:" in flat(res) and "'c3' has 4 examples but num_examples says 9" in flat(res)


def test_partition_of_a_non_npz_never_suggests_pickle(tmp_path):
    src = tmp_path / "data.pkl"
    src.write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.")  # a pickle
    res = runner.invoke(app, ["data", "partition", str(src), str(tmp_path / "o.sqlite")])
    assert res.exit_code == 2 and "not a plain, pickle-free .npz file" in flat(res)
    assert "allow_pickle" not in res.output and "unsafe" not in res.output
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(3))
    res = runner.invoke(app, ["data", "partition", str(npy), str(tmp_path / "o.sqlite")])
    assert res.exit_code == 2 and "not a plain, pickle-free .npz file" in flat(res)
    assert not (tmp_path / "o.sqlite").exists()


def test_convert_and_partition_to_a_folder_or_unwritable_place(tmp_path):
    src = tmp_path / "central.npz"
    np.savez(src, x=np.zeros((8, 2), np.float32), y=np.arange(8) % 2)
    leaf = FEMNIST / "test" / "all_data_0_niid_05_keep_0_test_9.json.gz"
    folder = tmp_path / "folder"
    folder.mkdir()
    for args in (["data", "partition", str(src), str(folder), "--clients", "2"],
                 ["data", "partition", str(src), str(folder), "--clients", "2", "--overwrite"],
                 ["data", "convert", str(leaf), str(folder)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "is a directory" in flat(res), (args, res.output)
    for args in (["data", "partition", str(src), str(tmp_path / "no" / "x.sqlite"), "--clients", "2"],
                 ["data", "convert", str(leaf), str(tmp_path / "no" / "x.sqlite")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "does not exist; create it first" in flat(res)
    # /proc takes no new files, for root too (for whom a folder's permission bits do not count).
    for args in (["data", "partition", str(src), "/proc/x.sqlite", "--clients", "2"],
                 ["data", "convert", str(leaf), "/proc/x.sqlite"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert "/proc" in flat(res) and len(res.output.strip().splitlines()) == 1, res.output


def test_leaf_folders_without_files_or_examples(tmp_path):
    import json

    empty = tmp_path / "empty"
    empty.mkdir()
    zero = tmp_path / "zero"
    zero.mkdir()
    (zero / "a.json").write_text(json.dumps({"users": ["u"], "num_samples": [0],
                                             "user_data": {"u": {"x": [], "y": []}}}))
    for folder, words in ((empty, "holds no *.json"), (zero, "no user has any example")):
        for args in (["data", "info", str(folder)],
                     ["data", "convert", str(folder), str(tmp_path / "o.sqlite")]):
            res = runner.invoke(app, args)
            assert res.exit_code == 2 and words in flat(res), (args, res.output)
            assert len(res.output.strip().splitlines()) == 1
