"""Hugging Face datasets as federated data (`fedjax_core.data.hf`), offline and tiny.

Every dataset is built here (`Dataset.from_dict`) or written to tmp_path; a fixture refuses
any network connection, so nothing can be fetched from the Hub.
"""

import socket
import sys

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
partitioners = pytest.importorskip("flwr_datasets.partitioner")

from fedjax_core.data import hf  # noqa: E402
from fedjax_core.data.partition import dirichlet_label_skew  # noqa: E402


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def table(n=120, classes=4, seed=0):
    """`n` rows: x [n, 3] float32, label in 0..classes-1, writer 'w0'..'w4' (not sorted)."""
    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_dict({
        "x": rng.random((n, 3), dtype=np.float32),
        "label": rng.integers(0, classes, n),
        "writer": [f"w{(7 * i) % 5}" for i in range(n)],
    })


def dirichlet(**kw):
    return partitioners.DirichletPartitioner(**{
        "num_partitions": 5, "partition_by": "label", "alpha": 0.5, "seed": 3,
        "min_partition_size": 0, **kw})


@pytest.mark.parametrize("make", [
    dirichlet,
    lambda: partitioners.ShardPartitioner(num_partitions=6, partition_by="label",
                                          num_shards_per_partition=2, seed=1),
    lambda: partitioners.IidPartitioner(num_partitions=7),
    lambda: partitioners.LinearPartitioner(num_partitions=4),
    lambda: partitioners.PathologicalPartitioner(num_partitions=4, partition_by="label",
                                                 num_classes_per_partition=2, seed=2),
], ids=["dirichlet", "shard", "iid", "linear", "pathological"])
def test_clients_are_the_partitioners_own_partitions(make):
    ds = table()
    data = hf.from_hf(ds, make(), features={"x": "x", "y": "label"})
    reference = make()
    reference.dataset = ds
    assert len(data.client_ids) == reference.num_partitions
    assert data.client_ids[0] == "client_00000"
    for i in range(reference.num_partitions):
        part = reference.load_partition(i).with_format("numpy")[:]
        assert data.client_sizes[i] == len(part["label"])
        client = data.get_client(i)
        assert sorted(client) == ["x", "y"]
        np.testing.assert_array_equal(client["y"], part["label"])   # same rows, same order
        np.testing.assert_array_equal(client["x"], part["x"])
        assert client["x"].dtype == np.float32 and client["x"].shape == (len(part["x"]), 3)


def test_a_column_gives_one_client_per_value_and_agrees_with_natural_id_partitioner():
    ds = table(n=23)
    data = hf.from_hf(ds, "writer")
    assert data.client_ids == ("w0", "w1", "w2", "w3", "w4")
    assert sorted(data.features) == ["label", "x"]  # the id column is not a feature
    writers = np.array(ds["writer"][:])
    xs = np.asarray(ds.with_format("numpy")[:]["x"])
    for i, w in enumerate(data.client_ids):
        np.testing.assert_array_equal(data.get_client(i)["x"], xs[writers == w])  # dataset order
    assert data.client_sizes.tolist() == [int((writers == w).sum()) for w in data.client_ids]
    natural = hf.from_hf(ds, partitioners.NaturalIdPartitioner(partition_by="writer"))
    assert natural.client_ids == data.client_ids
    np.testing.assert_array_equal(natural.client_sizes, data.client_sizes)
    numbers = datasets.Dataset.from_dict({"user": [10, 2, 10, 3], "v": [0.5, 1.5, 2.5, 3.5]})
    by_number = hf.from_hf(numbers, "user")
    assert by_number.client_ids == ("2", "3", "10")            # sorted as numbers
    np.testing.assert_array_equal(by_number.get_client(2)["v"], [0.5, 2.5])
    # After a shuffle the ids and sizes stay; the rows follow the shuffled order.
    shuffled = hf.from_hf(ds.shuffle(seed=0), "writer", features=["label"])
    np.testing.assert_array_equal(shuffled.client_sizes, data.client_sizes)


def images_dataset(n=10, mode="L"):
    from PIL import Image

    rng = np.random.default_rng(1)
    shape = (4, 5) if mode == "L" else (4, 5, 3)
    pixels = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    ds = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(p, mode=mode) for p in pixels], "label": np.arange(n) % 2},
        features=datasets.Features({"img": datasets.Image(),
                                    "label": datasets.ClassLabel(names=["a", "b"])}))
    return ds, pixels


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_images_become_float_arrays_with_a_channel_axis(mode):
    ds, pixels = images_dataset(mode=mode)
    data = hf.from_hf(ds, "label", features={"x": "img"})
    assert data.client_ids == ("0", "1")
    x = data.get_client(1)["x"]
    expected = pixels[1::2].astype(np.float32) / 255
    assert x.dtype == np.float32 and x.shape == (5, 4, 5, 1 if mode == "L" else 3)
    np.testing.assert_array_equal(x.reshape(expected.shape), expected)


def test_get_client_reads_only_its_own_rows(monkeypatch):
    """Nothing is decoded up front; get_client(i) queries the Arrow table for exactly client
    i's rows and decodes exactly its images."""
    ds, _ = images_dataset(n=30)
    decoded, queried = [], []
    decode = datasets.Image.decode_example
    monkeypatch.setattr(datasets.Image, "decode_example",
                        lambda self, value, **kw: decoded.append(1) or decode(self, value, **kw))
    import datasets.arrow_dataset as arrow_dataset
    query = arrow_dataset.query_table
    monkeypatch.setattr(arrow_dataset, "query_table",
                        lambda table, key, indices=None: queried.append(key) or
                        query(table, key, indices=indices))
    data = hf.from_hf(ds, dirichlet(num_partitions=3), features={"x": "img", "y": "label"})
    assert decoded == []                               # building decodes no image
    queried.clear()
    client = data.get_client(2)
    assert len(decoded) == data.client_sizes[2] == len(client["y"]) > 0
    assert len(queried) == 1 and sorted(np.asarray(queried[0]).tolist()) == \
        sorted(data.rows(2).tolist())
    assert int(data.client_sizes.sum()) == 30
    assert data.class_names("y") == ["a", "b"] and data.class_names("x") is None


def test_a_dataset_dict_partitions_test_by_the_same_rule():
    ds = table(n=60)
    dd = datasets.DatasetDict(train=ds, test=table(n=25, seed=1))
    train, test = hf.from_hf(dd, dirichlet(), features={"x": "x", "y": "label"})
    fresh = dirichlet()
    fresh.dataset = dd["test"]
    assert test.client_sizes.tolist() == [len(fresh.load_partition(i)) for i in range(5)]
    assert int(train.client_sizes.sum()) == 60 and int(test.client_sizes.sum()) == 25
    by_writer = hf.from_hf(datasets.DatasetDict(train=ds, test=ds.select(range(3))), "writer")
    assert by_writer.test.client_ids == ("w0", "w2", "w4")  # the test split's own writers
    iid_test = hf.from_hf(dd, dirichlet(), test_partitioner=partitioners.IidPartitioner(2)).test
    assert iid_test.client_sizes.tolist() == [13, 12]


def test_empty_clients_keep_their_features_shapes():
    ds = table(n=12)
    data = hf.HFFederatedData(ds, ["a", "b"], [np.arange(12), np.zeros(0, np.int64)],
                              {"x": "x", "y": "label"})
    empty = data.get_client(1)
    assert data.client_sizes.tolist() == [12, 0]
    assert empty["x"].shape == (0, 3) and empty["x"].dtype == np.float32


def test_mistakes_are_one_line_errors():
    ds = table(n=20)
    used = dirichlet()
    used.dataset = ds
    with pytest.raises(ValueError, match="already holds a dataset; give from_hf a new"):
        hf.from_hf(ds, used)
    with pytest.raises(ValueError, match="splits the columns"):
        hf.from_hf(ds, partitioners.VerticalEvenPartitioner(num_partitions=2))
    with pytest.raises(ValueError, match="no column 'nope' to take client ids from"):
        hf.from_hf(ds, "nope")
    with pytest.raises(ValueError, match=r"no column 'img' in the dataset \(columns: x, label"):
        hf.from_hf(ds, "writer", features={"x": "img"})
    with pytest.raises(TypeError, match="got the string 'x'; write"):
        hf.from_hf(ds, "writer", features="x")
    with pytest.raises(ValueError, match="no test"):
        hf.from_hf(datasets.DatasetDict(train=ds), "writer")
    with pytest.raises(TypeError, match="flwr-datasets partitioner or a column name"):
        hf.from_hf(ds, 3)


def test_missing_extra_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    with pytest.raises(ImportError) as info:
        hf.from_hf(object(), "writer")
    message = str(info.value)
    assert message == ("Hugging Face data needs datasets, which is not installed; install the hf "
                       "extra: pip install 'fedjax-sim[hf]'")
    monkeypatch.setitem(sys.modules, "flwr_datasets.partitioner", None)
    with pytest.raises(ImportError, match=r"needs flwr-datasets\.partitioner.*fedjax-sim\[hf\]"):
        hf.partitioner_from_spec("iid")


def test_specs_build_flower_partitioners():
    p = hf.partitioner_from_spec("dirichlet:alpha=0.3,column=label")
    assert isinstance(p, partitioners.DirichletPartitioner)
    assert p._num_partitions == hf.DEFAULT_CLIENTS and p._partition_by == "label"
    np.testing.assert_allclose(p._alpha, np.full(hf.DEFAULT_CLIENTS, 0.3))
    p = hf.partitioner_from_spec("shard: clients=4, column=7, num_shards_per_partition=3, "
                                 "shuffle=false")
    assert (p._num_partitions, p._partition_by, p._num_shards_per_partition, p._shuffle) == \
        (4, "7", 3, False)
    assert hf.partitioner_from_spec("size:partition_sizes=[3,4]")._partition_sizes == [3, 4]
    assert hf.partitioner_from_spec("natural:column=writer") == "writer"
    assert isinstance(hf.partitioner_from_spec("natural-id:column=w"),
                      partitioners.NaturalIdPartitioner)
    assert hf.parse_spec("iid") == ("iid", {})


@pytest.mark.parametrize("spec, message", [
    ("drichlet:alpha=1", "unknown partitioner 'drichlet'; choose one of: iid, dirichlet,"),
    ("dirichlet:beta=1,column=y", "dirichlet takes no parameter 'beta'; it takes: alpha, "
                                  "clients, column, min_partition_size, seed, self_balancing"),
    ("dirichlet:alpha=0.5", "dirichlet needs column=VALUE (e.g. column=label)"),
    ("dirichlet:alpha=-1,column=y", "dirichlet: Alpha values should be strictly greater"),
    ("dirichlet:alpha", "parameter 'alpha' of 'dirichlet:alpha' is not KEY=VALUE"),
    ("size:partition_sizes=[1,2", "unbalanced '['"),
    ("natural:column=a,seed=1", "natural takes one parameter, column=NAME"),
    ("iid:clients=2,clients=3", "parameter 'clients' is given twice"),
    (":alpha=1", "empty partitioner"),
])
def test_bad_specs_are_one_line_value_errors(spec, message):
    with pytest.raises(ValueError) as info:
        hf.partitioner_from_spec(spec)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert len(str(info.value)) <= 240


def _label_skew(per_client_labels, classes):
    """(mean normalised label entropy, mean largest-class fraction) over non-empty clients."""
    entropy, top = [], []
    for labels in per_client_labels:
        if len(labels):
            p = np.bincount(labels, minlength=classes) / len(labels)
            nz = p[p > 0]
            entropy.append(float(-(nz * np.log(nz)).sum() / np.log(classes)))
            top.append(float(p.max()))
    return np.mean(entropy), np.mean(top)


def test_our_dirichlet_and_flowers_agree_in_distribution():
    """Same alpha, same label-skew statistics (not the same draws).

    `dirichlet_label_skew` is Wang et al.'s rule with its balancing, which flwr-datasets'
    DirichletPartitioner has as `self_balancing=True`. Over S = 16 seeds each (600 examples,
    10 classes, 10 clients, alpha 0.5, no minimum size), the mean per-client label entropy and
    mean largest-class fraction of the two must differ by less than 4 standard errors of the
    difference (a two-sample z-test at 4 sigma: a false alarm about once in 16,000 draws of
    seeds; the seeds are fixed so the outcome is too). Power: alpha 5 moves both statistics by
    more than 10 standard errors, so a partitioner of another alpha would fail.
    """
    n, classes, k, seeds = 600, 10, 10, 16
    y = np.repeat(np.arange(classes), n // classes)
    ds = datasets.Dataset.from_dict({"label": y})

    def ours(alpha, seed):
        data = dirichlet_label_skew({"y": y}, k, alpha, seed, min_size=0)
        return [data.get_client(i)["y"] for i in range(k)]

    def flowers(alpha, seed):
        p = partitioners.DirichletPartitioner(num_partitions=k, partition_by="label", alpha=alpha,
                                              min_partition_size=0, self_balancing=True,
                                              seed=seed)
        data = hf.from_hf(ds, p)
        return [y[data.rows(i)] for i in range(k)]

    def stats(partition, alpha):
        return np.array([_label_skew(partition(alpha, s), classes) for s in range(seeds)])

    a, b = stats(ours, 0.5), stats(flowers, 0.5)
    se = np.sqrt(a.var(axis=0, ddof=1) / seeds + b.var(axis=0, ddof=1) / seeds)
    diff = np.abs(a.mean(axis=0) - b.mean(axis=0))
    assert np.all(se < 0.03), se                       # the tolerance is not vacuous
    assert np.all(diff < 4 * se), (a.mean(axis=0), b.mean(axis=0), se)
    wide = stats(ours, 5.0)
    assert np.all(np.abs(wide.mean(axis=0) - a.mean(axis=0)) > 10 * se)


def _imports_outside_functions(node):
    """The import statements of `node` that run when its module is imported."""
    import ast

    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _imports_outside_functions(child)


def test_no_module_imports_the_hf_extra_at_import_time():
    """Without the extra, importing any module of the project imports neither `datasets` nor
    `flwr_datasets` (nor pyarrow): every such import sits inside a function."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    extra = ("datasets", "flwr_datasets", "pyarrow")
    found = []
    for package in ("fedjax_core", "fedjax_api", "cli"):
        for path in sorted((root / package).rglob("*.py")):
            for node in _imports_outside_functions(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if node.level == 0 else [])
                found += [f"{path.relative_to(root)}:{node.lineno}" for n in names
                          if n.split(".")[0] in extra]
    assert found == []
    assert "importlib.import_module" in Path(hf.__file__).read_text()  # the lazy import
