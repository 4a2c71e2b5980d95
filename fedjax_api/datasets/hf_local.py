"""Local Hugging Face datasets for the command line: a `save_to_disk` folder or Parquet files,
partitioned by a spec (`dirichlet:alpha=0.3,column=label`) into federated data.

Only local paths are read; nothing is fetched from the Hugging Face Hub (`datasets`'
offline switches are set before it is first imported here). Errors are `ConfigError`s of
one line.
"""

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from fedjax_api.errors import ConfigError
from fedjax_core.data import FederatedData

SPLITS = ("train", "test", "validation")
"""Split names recognised at the start of Parquet file names (`train-00000-of-00001.parquet`)."""


def is_hf_source(path: str | os.PathLike) -> bool:
    """True for a `datasets.save_to_disk` folder, a `.parquet` file or a folder of them."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".parquet"
    if not p.is_dir():
        return False
    if any((p / name).is_file() for name in ("dataset_dict.json", "state.json")):
        return True
    return next(p.rglob("*.parquet"), None) is not None


def _datasets() -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedjax_core.data import hf

    try:
        datasets = hf.require("datasets")
        hf.require("flwr_datasets")
    except ImportError as e:
        raise ConfigError(str(e)) from None
    datasets.disable_progress_bars()  # the command prints its own one-line summary
    return datasets, hf


def _split_of(path: Path) -> str | None:
    head = path.name.split("-")[0].split(".")[0].split("_")[0]
    return head if head in SPLITS else None


def load_local(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Any:
    """The `datasets.Dataset` or `DatasetDict` at `path`, read locally.

    A folder written by `save_to_disk` opens memory-mapped (`load_from_disk`). A `.parquet`
    file, or a folder of them, is converted by `datasets` to Arrow files in `cache_dir`
    (default: its own cache); a folder whose files all start with a split name
    (`train-*.parquet`, `test-*.parquet`, as the Hub lays them out) gives a `DatasetDict`.

    Example:
      >>> load_local("mnist_parquet/")                  # DatasetDict({train, test})
    """
    datasets, _ = _datasets()
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{str(p)!r} does not exist")
    if p.is_dir() and any((p / n).is_file() for n in ("dataset_dict.json", "state.json")):
        try:
            return datasets.load_from_disk(str(p))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{str(p)!r} is not a whole save_to_disk folder ({e})") from None
    files = [p] if p.is_file() else sorted(p.rglob("*.parquet"))
    if not files or any(f.suffix != ".parquet" for f in files):
        raise ConfigError(f"{str(p)!r} is neither a save_to_disk folder nor Parquet; give one "
                          "of those (Hugging Face data is read from local files only)")
    cache = None if cache_dir is None else str(cache_dir)
    splits: dict[str, list[str]] = {}
    for f in files:
        splits.setdefault(_split_of(f) or "", []).append(str(f))
    try:
        if len(files) > 1 and "" not in splits:
            return datasets.DatasetDict({s: datasets.Dataset.from_parquet(fs, cache_dir=cache)
                                         for s, fs in splits.items()})
        return datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=cache)
    except Exception as e:  # pyarrow and datasets raise many types for a bad file
        if isinstance(e, (MemoryError, KeyboardInterrupt)):
            raise
        raise ConfigError(f"cannot read the Parquet data in {str(p)!r}: "
                          f"{' '.join(str(e).split())[:200]}") from None


def parse_features(text: str | None) -> dict[str, str] | list[str] | None:
    """`"x=image,y=label"` -> `{"x": "image", "y": "label"}`; `"image,label"` -> a list.

    Example:
      >>> parse_features("x=image,y=label")
      {'x': 'image', 'y': 'label'}
    """
    if text is None or not text.strip():
        return None
    items = [i.strip() for i in text.split(",") if i.strip()]
    if all("=" in i for i in items):
        pairs = [i.split("=", 1) for i in items]
        if any(not k.strip() or not v.strip() for k, v in pairs):
            raise ConfigError(f"--features {text!r}: write NAME=COLUMN pairs, e.g. x=image,y=label")
        return {k.strip(): v.strip() for k, v in pairs}
    if any("=" in i for i in items):
        raise ConfigError(f"--features {text!r}: give all NAME=COLUMN pairs or all column names")
    return items


@contextlib.contextmanager
def open_hf(path: str | os.PathLike, partitioner: str | None, split: str | None = None,
            features: str | None = None) -> Iterator[FederatedData]:
    """The clients of a local Hugging Face dataset, partitioned by a spec, while in the block.

    Parquet is converted into a temporary cache folder that is removed on leaving the block.

    Args:
      path: a `save_to_disk` folder or Parquet file/folder.
      partitioner: a spec, `NAME[:KEY=VALUE,...]` (`fedjax_core.data.hf.partitioner_from_spec`).
      split: the split of a `DatasetDict` (default `train`); each split is partitioned alone
        by the spec (a test split with the same spec: the same rule and seed).
      features: `--features`, see `parse_features`.

    Example:
      >>> with open_hf("mnist/", "dirichlet:alpha=0.5,column=label") as data:
      ...     data.client_sizes
    """
    datasets, hf = _datasets()
    if not partitioner:
        raise ConfigError("Hugging Face data needs --partitioner, e.g. "
                          "--partitioner dirichlet:alpha=0.5,column=label")
    try:
        rule = hf.partitioner_from_spec(partitioner)
    except ImportError as e:
        raise ConfigError(str(e)) from None
    except ValueError as e:
        raise ConfigError(f"--partitioner: {e}") from None
    chosen = parse_features(features)
    with tempfile.TemporaryDirectory(prefix="fedjax-hf-") as cache:
        dataset = load_local(path, cache_dir=cache)
        if isinstance(dataset, datasets.DatasetDict):
            name = split or "train"
            if name not in dataset:
                raise ConfigError(f"{str(path)!r} has splits {', '.join(dataset)}; choose one "
                                  "with --split")
            dataset = dataset[name]
        elif split not in (None, "train"):
            raise ConfigError(f"{str(path)!r} holds one split; leave out --split {split}")
        params = hf.parse_spec(partitioner)[1]
        column = params.get("column", params.get("partition_by"))
        if column is not None and column not in dataset.column_names:
            raise ConfigError(f"--partitioner: no column {column!r} in {str(path)!r} (columns: "
                              f"{', '.join(dataset.column_names)})")
        try:
            data = hf.from_hf(dataset, rule, features=chosen)
        except (ValueError, TypeError, KeyError) as e:
            message = " ".join(str(e).split())
            raise ConfigError(f"cannot partition {str(path)!r}: {message[:300]}") from None
        yield data
