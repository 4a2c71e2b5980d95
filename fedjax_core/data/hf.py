"""Hugging Face `datasets` as federated data, partitioned by flwr-datasets or a client-id column.

`from_hf(dataset, partitioner)` turns a `datasets.Dataset` (or a `DatasetDict` with `train` and
`test`) into a `FederatedData` whose clients are the partitions of any flwr-datasets partitioner
(`DirichletPartitioner`, `PathologicalPartitioner`, `ShardPartitioner`, `NaturalIdPartitioner`,
`InnerDirichletPartitioner`, `LinearPartitioner`, ...) or the distinct values of a column.

Reading is lazy: construction keeps one `int64` row number per example (which client holds
which rows) and nothing else; `get_client(i)` reads only client `i`'s rows from the Arrow table
(memory-mapped when the dataset was saved to disk) and converts them to numpy. Images (the
`datasets.Image` feature) become `float32` arrays in `[0, 1]`, `[n, H, W, C]` (`C = 1` for
grayscale); other columns keep the dtype numpy gives them.

To learn which rows a partitioner gives each client, the dataset handed to it carries one
extra column of row numbers (`ROW`, added with `Dataset.add_column`, 8 bytes a row in memory);
each partition's row numbers are read from it, so any partitioner that selects rows works,
without reading its private state. A dataset with an indices mapping (after `shuffle` or
`select`) is flattened once by `add_column`.

Needs the `hf` extra (`datasets`, `flwr-datasets`), imported only when used.

References:
  Lhoest et al., "Datasets: A Community Library for Natural Language Processing", EMNLP 2021.
  Beutel et al., "Flower: A Friendly Federated Learning Research Framework", 2020
  (flwr-datasets' partitioners).
"""

from __future__ import annotations

import copy
import importlib
import inspect
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from fedjax_core.data.errors import DataFormatError
from fedjax_core.data.federated_data import ClientArrays
from fedjax_core.data.partition import client_id

EXTRA = "install the hf extra: pip install 'fedjax-sim[hf]'"
"""The fix named when `datasets` or `flwr-datasets` is missing."""

ROW = "__fedjax_row__"
"""The column of row numbers added to the dataset a partitioner is given."""

DEFAULT_CLIENTS = 100
"""`num_partitions` of a spec that does not give `clients=` (as `fedjax data partition`)."""


def require(module: str = "datasets") -> Any:
    """Imports `module` (`datasets` or `flwr_datasets`), or says to install the `hf` extra.

    Raises:
      ImportError: one line, "... install the hf extra: pip install 'fedjax-sim[hf]'".
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.replace("_", "-")
        raise ImportError(f"Hugging Face data needs {package}, which is not installed; "
                          f"{EXTRA}") from e


class FederatedSplits(NamedTuple):
    """The train and test clients of a `DatasetDict` (`train, test = from_hf(dd, ...)`)."""

    train: HFFederatedData
    test: HFFederatedData


class HFFederatedData:
    """`FederatedData` over a `datasets.Dataset`: each client a list of row numbers, read lazily.

    Made by `from_hf`. `client_ids`, `client_sizes` and `get_client(i)` as the protocol says;
    `features` maps each of our feature names to its column; `rows(i)` are client `i`'s row
    numbers in the dataset, in the partitioner's order (the order `get_client` returns).

    Example:
      >>> data = from_hf(ds, DirichletPartitioner(num_partitions=10, partition_by="label",
      ...                                         alpha=0.5))
      >>> data.get_client(0)["image"].shape        # float32 [n, 28, 28, 1]
    """

    def __init__(self, dataset: Any, client_ids: Sequence[str], rows: Sequence[np.ndarray],
                 features: Mapping[str, str]):
        datasets = require()
        self._ids = tuple(client_ids)
        sizes = [len(r) for r in rows]
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self._rows = (np.concatenate([np.asarray(r, np.int64) for r in rows]) if rows
                      else np.zeros(0, np.int64))
        self._sizes = np.asarray(sizes, np.int64)
        self.features = dict(features)
        columns = list(dict.fromkeys(self.features.values()))
        self._images = {c for c in columns if isinstance(dataset.features[c], datasets.Image)}
        self._class_names = {c: list(dataset.features[c].names) for c in columns
                             if isinstance(dataset.features[c], datasets.ClassLabel)}
        self._view = dataset.select_columns(columns).with_format("numpy")
        self._num_rows = len(dataset)
        self._empty: ClientArrays | None = None

    @property
    def client_ids(self) -> tuple[str, ...]:
        return self._ids

    @property
    def client_sizes(self) -> np.ndarray:
        return self._sizes

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return (f"HFFederatedData({len(self)} clients, {int(self._sizes.sum())} examples, "
                f"features={self.features})")

    def rows(self, index: int) -> np.ndarray:
        """`Int[ndarray, "examples"]`: the dataset rows of client `index`."""
        return self._rows[self._offsets[index]:self._offsets[index + 1]]

    def _convert(self, column: str, values: np.ndarray) -> np.ndarray:
        if column not in self._images:
            return values
        if values.dtype == object:
            shapes = sorted({np.shape(v) for v in values})
            raise DataFormatError(f"the images of column {column!r} differ in size ({shapes[:3]}"
                                  f"...); resize them to one size first (e.g. with "
                                  "dataset.map)")
        images = values.astype(np.float32) / 255.0
        return images[..., None] if images.ndim == 3 else images

    def _read(self, rows: np.ndarray, names: Sequence[str]) -> ClientArrays:
        batch = self._view[rows]
        return {name: self._convert(self.features[name], np.asarray(batch[self.features[name]]))
                for name in names}

    def get_client(self, index: int) -> ClientArrays:
        rows = self.rows(index)
        if len(rows):
            return self._read(rows, list(self.features))
        if self._empty is None:  # zero examples with the features' dtypes and shapes
            first = self._read(np.zeros(1, np.int64), list(self.features))
            self._empty = {k: v[:0] for k, v in first.items()}
        return self._empty

    def class_names(self, name: str) -> list[str] | None:
        """The names of the classes of feature `name` (a `ClassLabel` column), else None."""
        return self._class_names.get(self.features.get(name, ""))

    def get_client_feature(self, index: int, name: str) -> np.ndarray:
        """One feature of client `index`, reading only its column (e.g. the labels to plot)."""
        if name not in self.features:
            raise KeyError(name)
        rows = self.rows(index)
        if not len(rows):
            return self.get_client(index)[name]
        return self._read(rows, [name])[name]


def _check_partitioner(partitioner: Any) -> None:
    kind = type(partitioner)  # num_partitions may be a property that needs the dataset
    if not (hasattr(kind, "load_partition") and hasattr(kind, "num_partitions")
            and hasattr(kind, "is_dataset_assigned")):
        raise TypeError(f"partitioner must be a flwr-datasets partitioner or a column name, got "
                        f"{type(partitioner).__name__}")
    if type(partitioner).__name__.startswith("Vertical"):
        raise ValueError(f"{type(partitioner).__name__} splits the columns, not the examples; "
                         "give a partitioner of rows (Dirichlet, Shard, NaturalId, ...)")
    if partitioner.is_dataset_assigned():
        raise ValueError(f"the {type(partitioner).__name__} already holds a dataset; give "
                         "from_hf a new partitioner (from_hf assigns the dataset itself)")


def _choose_features(features: Mapping[str, str] | Sequence[str] | None, columns: Sequence[str],
                     drop: str | None) -> dict[str, str]:
    if features is None:
        chosen = {c: c for c in columns if c != drop}
    elif isinstance(features, Mapping):
        chosen = dict(features)
    elif isinstance(features, str):
        raise TypeError(f"features must be a list of columns or a dict name -> column, got the "
                        f"string {features!r}; write [{features!r}]")
    else:
        chosen = {c: c for c in features}
    missing = [c for c in chosen.values() if c not in columns]
    if missing:
        raise ValueError(f"no column {missing[0]!r} in the dataset (columns: "
                         f"{', '.join(columns)}); check features=")
    if not chosen:
        raise ValueError("no features left to read; give features= (e.g. {'x': 'image', "
                         "'y': 'label'})")
    return chosen


def _by_column(dataset: Any, column: str) -> tuple[list[str], list[np.ndarray]]:
    """One client per distinct value of `column`, in sorted order; rows in dataset order."""
    import pyarrow as pa  # noqa: PLC0415  (comes with datasets)

    values = dataset.data.column(column)
    if values.null_count:
        raise ValueError(f"column {column!r} has {values.null_count} empty (null) client ids; "
                         "fill or drop those rows first")
    if not (pa.types.is_integer(values.type) or pa.types.is_string(values.type)
            or pa.types.is_large_string(values.type) or pa.types.is_binary(values.type)):
        raise ValueError(f"column {column!r} holds {values.type}; client ids must be integers "
                         "or strings")
    encoded = values.dictionary_encode().combine_chunks()  # codes in order of appearance
    distinct = encoded.dictionary.to_pylist()               # the ids only, not every row
    order = sorted(range(len(distinct)), key=distinct.__getitem__)
    rank = np.empty(len(distinct), np.int64)
    rank[order] = np.arange(len(distinct))
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    ids = [v.decode("utf-8") if isinstance(v, bytes) else str(v)
           for v in (distinct[j] for j in order)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"distinct values of {column!r} give the same id as text")
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes, minlength=len(ids)))[:-1]
    return ids, np.split(order.astype(np.int64), bounds)


def _by_partitioner(tagged: Any, partitioner: Any) -> tuple[list[str], list[np.ndarray]]:
    """The partitions of `partitioner` over `tagged` as row numbers (read from `ROW`)."""
    partitioner.dataset = tagged
    n = int(partitioner.num_partitions)
    names = getattr(partitioner, "partition_id_to_natural_id", None)  # NaturalIdPartitioner
    ids = ([str(names[i]) for i in range(n)] if isinstance(names, Mapping)
           else [client_id(i, n) for i in range(n)])
    rows = []
    for i in range(n):
        part = partitioner.load_partition(i)
        if ROW not in part.column_names:
            raise ValueError(f"partition {i} of the {type(partitioner).__name__} lost the rows' "
                             "identity (the column " + ROW + "); give a partitioner of rows")
        column = part.select_columns([ROW]).with_format("arrow")[:].column(0)
        rows.append(column.to_numpy().astype(np.int64, copy=False))
    return ids, rows


def _federate(dataset: Any, partitioner: Any, features) -> HFFederatedData:
    datasets = require()
    if isinstance(dataset, datasets.IterableDataset):
        raise TypeError("an IterableDataset has no random access; load it as a Dataset "
                        "(streaming=False) or save it with save_to_disk first")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset or DatasetDict, got "
                        f"{type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("the dataset has no rows")
    columns = list(dataset.column_names)
    if ROW in columns:
        raise ValueError(f"the dataset has a column {ROW!r}, the name from_hf uses for row "
                         "numbers; rename it")
    by_column = isinstance(partitioner, str)
    chosen = _choose_features(features, columns, partitioner if by_column else None)
    if by_column and partitioner not in columns:
        raise ValueError(f"no column {partitioner!r} to take client ids from (columns: "
                         f"{', '.join(columns)})")
    if not by_column:
        _check_partitioner(partitioner)
    # Row numbers as a column; its table is in the dataset's order (add_column flattens an
    # indices mapping), so `tagged.data` rows are the dataset's rows.
    tagged = dataset.add_column(ROW, np.arange(len(dataset), dtype=np.int64))
    ids, rows = (_by_column(tagged, partitioner) if by_column
                 else _by_partitioner(tagged, partitioner))
    return HFFederatedData(tagged, ids, rows, chosen)


def from_hf(dataset: Any, partitioner: Any, *,
            features: Mapping[str, str] | Sequence[str] | None = None,
            test_partitioner: Any = None) -> HFFederatedData | FederatedSplits:
    """A Hugging Face dataset as federated data: clients from a flwr-datasets partitioner or a column.

    For a `Dataset`, client `i` holds the rows of `partitioner.load_partition(i)`, in that order
    (ids `client_00000`, ...; a `NaturalIdPartitioner`'s clients are named by their natural id),
    or, for a column name, the rows holding each distinct value of that column (natural ids:
    one client per writer or user, clients in sorted value order, rows in dataset order, the
    column itself left out of the features unless `features` names it).

    For a `DatasetDict`, `train` is partitioned by `partitioner` and `test` by the same rule:
    the same column (so a user is the same client id in both splits), or a copy of the
    partitioner made before it saw any data (the same class, parameters and seed), or
    `test_partitioner` when given. A copied Dirichlet-type partitioner draws its own label
    mixes on the test rows: test client `k` is not training client `k`'s distribution, which
    does not matter for the global model's test metrics (pooled over the test examples) but
    does for per-client evaluation; split each training client instead for that (see
    docs/tutorials/own_dataset.md).

    Args:
      dataset: a `datasets.Dataset`, or a `datasets.DatasetDict` with `train` and `test`.
      partitioner: a new (not yet used) flwr-datasets partitioner of rows, or a column name.
      features: our feature name -> column (`{"x": "image", "y": "label"}`), or a list of
        columns kept under their names; None keeps every column (but a partitioning column).
      test_partitioner: the rule for a `DatasetDict`'s `test` split, when not `partitioner`'s.

    Returns:
      `HFFederatedData` for a `Dataset`; `FederatedSplits(train, test)` for a `DatasetDict`.

    Example:
      >>> from flwr_datasets.partitioner import DirichletPartitioner
      >>> data = from_hf(ds, DirichletPartitioner(num_partitions=10, partition_by="label",
      ...                                         alpha=0.5), features={"x": "image", "y": "label"})
      >>> data.client_sizes.sum() == len(ds)
      True
      >>> writers = from_hf(ds, "writer_id")       # one client per writer
    """
    datasets = require()
    if isinstance(dataset, datasets.DatasetDict):
        missing = [s for s in ("train", "test") if s not in dataset]
        if missing:
            raise ValueError(f"the DatasetDict has splits {', '.join(dataset)} but no "
                             f"{' or '.join(missing)}; pass one split (dataset['train']) instead")
        if test_partitioner is None:
            if not isinstance(partitioner, str):
                _check_partitioner(partitioner)
            test_partitioner = (partitioner if isinstance(partitioner, str)
                                else copy.deepcopy(partitioner))
        return FederatedSplits(_federate(dataset["train"], partitioner, features),
                               _federate(dataset["test"], test_partitioner, features))
    if test_partitioner is not None:
        raise ValueError("test_partitioner applies to a DatasetDict with a test split; this "
                         "dataset is a single split")
    return _federate(dataset, partitioner, features)


# ---------------------------------------------------------------------------------------------
# Partitioner specs: "dirichlet:alpha=0.3,column=label" (the command line's --partitioner).

SPECS = {
    "iid": "IidPartitioner",
    "dirichlet": "DirichletPartitioner",
    "inner-dirichlet": "InnerDirichletPartitioner",
    "pathological": "PathologicalPartitioner",
    "shard": "ShardPartitioner",
    "natural": None,
    "natural-id": "NaturalIdPartitioner",
    "grouped-natural-id": "GroupedNaturalIdPartitioner",
    "linear": "LinearPartitioner",
    "square": "SquarePartitioner",
    "exponential": "ExponentialPartitioner",
    "size": "SizePartitioner",
    "continuous": "ContinuousPartitioner",
}
"""Spec name -> flwr-datasets class (`natural`: one client per value of `column`, by from_hf)."""

ALIASES = {"column": "partition_by", "clients": "num_partitions"}
"""Short spec keys for flwr-datasets' parameter names."""


def _split_params(text: str) -> list[str]:
    """`a=1,b=[1,2],c=x` -> ['a=1', 'b=[1,2]', 'c=x']: commas inside brackets stay."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0:
            raise ValueError(f"unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _value(text: str) -> Any:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [_value(v) for v in _split_params(text[1:-1])]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`"dirichlet:alpha=0.3,column=label"` -> `("dirichlet", {"alpha": 0.3, "column": "label"})`.

    Values are read as int, float, true/false, none, `[a,b,...]` lists, else text; the
    `column` value is always text. Raises `ValueError` (one line) for a malformed spec.
    """
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if not name:
        raise ValueError(f"empty partitioner in {spec!r}; write e.g. dirichlet:alpha=0.5,"
                         "column=label")
    params: dict[str, Any] = {}
    for item in _split_params(rest):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key or not value.strip():
            raise ValueError(f"parameter {item!r} of {spec!r} is not KEY=VALUE")
        if key in params:
            raise ValueError(f"parameter {key!r} is given twice in {spec!r}")
        params[key] = value.strip() if key in ("column", "partition_by") else _value(value)
    return name, params


def partitioner_from_spec(spec: str) -> Any:
    """A flwr-datasets partitioner (or, for `natural`, a column name) from a spec string.

    `NAME[:KEY=VALUE,...]`, NAME one of `SPECS` (`dirichlet`, `pathological`, `shard`, `iid`,
    `natural`, ...); keys are the class's own parameter names, or `column` (`partition_by`) and
    `clients` (`num_partitions`, default `DEFAULT_CLIENTS`). Unset parameters keep
    flwr-datasets' defaults (e.g. `DirichletPartitioner`'s `seed=42`, `min_partition_size=10`).

    Raises:
      ValueError: one line naming the unknown partitioner, parameter or value and the choices.

    Example:
      >>> partitioner_from_spec("dirichlet:alpha=0.3,column=label,clients=20")
      <flwr_datasets.partitioner.dirichlet_partitioner.DirichletPartitioner object at ...>
      >>> partitioner_from_spec("natural:column=writer")
      'writer'
    """
    name, params = parse_spec(spec)
    if name not in SPECS:
        raise ValueError(f"unknown partitioner {name!r}; choose one of: {', '.join(SPECS)}")
    given = {ALIASES.get(k, k): v for k, v in params.items()}
    if len(given) != len(params):
        raise ValueError(f"{name}: a parameter is given under two names in {spec!r}")
    class_name = SPECS[name]
    if class_name is None:
        extra = sorted(set(given) - {"partition_by"})
        if extra or "partition_by" not in given:
            raise ValueError(f"natural takes one parameter, column=NAME (the client-id column)"
                             f"{'; not ' + ', '.join(extra) if extra else ''}")
        return str(given["partition_by"])
    cls = getattr(require("flwr_datasets.partitioner"), class_name)
    signature = inspect.signature(cls.__init__)
    accepted = [p for p in signature.parameters if p != "self"]
    unknown = [k for k in given if k not in accepted]
    if unknown:
        shown = sorted({next((a for a, full in ALIASES.items() if full == p), p)
                        for p in accepted})
        raise ValueError(f"{name} takes no parameter {unknown[0]!r}; it takes: "
                         f"{', '.join(shown)}")
    if "num_partitions" in accepted and "num_partitions" not in given:
        given["num_partitions"] = DEFAULT_CLIENTS
    required = [p for p, v in signature.parameters.items()
                if p != "self" and v.default is inspect.Parameter.empty and p not in given]
    if required:
        key = next((a for a, full in ALIASES.items() if full == required[0]), required[0])
        raise ValueError(f"{name} needs {key}=VALUE (e.g. "
                         f"{'column=label' if key == 'column' else key + '=...'})")
    try:
        return cls(**given)
    except (ValueError, TypeError) as e:
        why = " ".join(str(e).split())
        raise ValueError(f"{name}: {why if len(why) <= 200 else why[:197] + '...'}") from None
