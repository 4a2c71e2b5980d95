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
