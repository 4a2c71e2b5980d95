"""`fedjax data convert --from hf` and `fedjax data plot-partition`, offline and tiny."""

import sys

import numpy as np
import pytest
from typer.testing import CliRunner

datasets = pytest.importorskip("datasets")
partitioners = pytest.importorskip("flwr_datasets.partitioner")

from cli.main import app  # noqa: E402
from fedjax_core.data import hf  # noqa: E402
from fedjax_core.data.sqlite import SQLiteFederatedData, write_sqlite  # noqa: E402
from tests.fedjax_core.data.test_hf import no_network, table  # noqa: E402, F401

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def flat(res) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(res.output.split())


def error_line(res) -> str:
    """The one `error: ...` line of a failed command (and nothing else)."""
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    return " ".join(lines)


def test_convert_a_saved_dataset_round_trips(tmp_path):
    ds = table(n=90)
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "fed.sqlite"
    spec = "dirichlet:alpha=0.3,column=label,clients=6,min_partition_size=0,seed=5"
    res = runner.invoke(app, ["data", "convert", "--from", "hf", str(tmp_path / "ds"),
                              "--partitioner", spec, "--features", "x=x,y=label", str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote 6 clients (90 examples)" in flat(res)
    back = SQLiteFederatedData(out)
    expected = hf.from_hf(ds, hf.partitioner_from_spec(spec), features={"x": "x", "y": "label"})
    assert list(back.client_ids) == list(expected.client_ids)
    np.testing.assert_array_equal(back.client_sizes, expected.client_sizes)
    for i in range(6):
        got, want = back.get_client(i), expected.get_client(i)
        assert sorted(got) == ["x", "y"]
        np.testing.assert_array_equal(got["x"], want["x"])
        np.testing.assert_array_equal(got["y"], want["y"])


def test_convert_parquet_by_column_and_a_split(tmp_path):
    ds = table(n=40)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    out = tmp_path / "w.sqlite"
    res = runner.invoke(app, ["data", "convert", "--from", "hf", str(tmp_path / "d.parquet"),
                              "--partitioner", "natural:column=writer", str(out)])
    assert res.exit_code == 0, res.output
    back = SQLiteFederatedData(out)
    assert list(back.client_ids) == ["w0", "w1", "w2", "w3", "w4"]
    assert back.client_sizes.tolist() == [8] * 5 and sorted(back.get_client(0)) == ["label", "x"]
    # A folder of Hub-style split files is a DatasetDict; --split picks one.
    (tmp_path / "dd").mkdir()
    ds.to_parquet(str(tmp_path / "dd" / "train-00000-of-00001.parquet"))
    ds.select(range(10)).to_parquet(str(tmp_path / "dd" / "test-00000-of-00001.parquet"))
    res = runner.invoke(app, ["data", "convert", "--from", "hf", str(tmp_path / "dd"),
                              "--split", "test", "--partitioner", "iid:clients=2",
                              str(tmp_path / "t.sqlite")])
    assert res.exit_code == 0, res.output
    assert SQLiteFederatedData(tmp_path / "t.sqlite").client_sizes.tolist() == [5, 5]


@pytest.mark.parametrize("args, message", [
    (["--partitioner", "drichlet:alpha=1"], "error: --partitioner: unknown partitioner 'drichlet'"),
    (["--partitioner", "dirichlet:alpha=0.5,beta=2,column=label"],
     "error: --partitioner: dirichlet takes no parameter 'beta'"),
    (["--partitioner", "dirichlet:alpha=0.5,column=nope"],
     "error: --partitioner: no column 'nope' in"),
    ([], "error: Hugging Face data needs --partitioner"),
    (["--partitioner", "iid", "--split", "test"], "holds one split; leave out --split test"),
    (["--partitioner", "iid", "--features", "x=,y=label"], "write NAME=COLUMN pairs"),
])
def test_bad_specs_exit_2_with_one_line(tmp_path, args, message):
    table(n=10).save_to_disk(str(tmp_path / "ds"))
    res = runner.invoke(app, ["data", "convert", "--from", "hf", str(tmp_path / "ds"), *args,
                              str(tmp_path / "o.sqlite")])
    line = error_line(res)
    assert message in line and line.startswith("error:"), line
    assert not (tmp_path / "o.sqlite").exists()


def test_convert_options_that_do_not_fit(tmp_path):
    res = runner.invoke(app, ["data", "convert", "--from", "csv", str(tmp_path), "o.sqlite"])
    assert "unknown --from 'csv'; choose one of: leaf, tff, hf" in error_line(res)
    res = runner.invoke(app, ["data", "convert", str(tmp_path), str(tmp_path / "o.sqlite"),
                              "--partitioner", "iid"])
    assert "--partitioner, --features and --split apply to --from hf" in error_line(res)


def test_missing_extra_is_one_line(tmp_path, monkeypatch):
    table(n=10).save_to_disk(str(tmp_path / "ds"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    res = runner.invoke(app, ["data", "convert", "--from", "hf", str(tmp_path / "ds"),
                              "--partitioner", "iid", str(tmp_path / "o.sqlite")])
    assert "install the hf extra: pip install 'fedjax-sim[hf]'" in error_line(res)


def test_plot_partition_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    path = tmp_path / "d.sqlite"
    write_sqlite(path, [(f"c{i}", {"y": rng.integers(0, 3, 5 + i).astype(np.int32)})
                        for i in range(4)])
    res = runner.invoke(app, ["data", "plot-partition", str(path), str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    assert "4 clients, 3 labels" in flat(res)
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG
    table(n=50).save_to_disk(str(tmp_path / "ds"))
    spec = "dirichlet:alpha=0.5,column=label,clients=8,min_partition_size=0"
    res = runner.invoke(app, ["data", "plot-partition", str(tmp_path / "ds"),
                              str(tmp_path / "h.png"), "--label", "label", "--max-clients", "3",
                              "--percent", "--partitioner", spec])
    assert res.exit_code == 0, res.output
    same = hf.from_hf(table(n=50), hf.partitioner_from_spec(spec))
    shown = np.unique(np.concatenate([same.get_client(i)["label"] for i in range(3)]))
    assert f"3 clients, {len(shown)} labels" in flat(res)
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG
    res = runner.invoke(app, ["data", "plot-partition", str(path), str(tmp_path / "q.png"),
                              "--label", "z"])
    assert "no feature 'z' (the clients have y); give the label feature with --label" in \
        error_line(res)
