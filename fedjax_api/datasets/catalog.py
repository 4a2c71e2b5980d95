"""The datasets FedJAX publishes, and `fetch`, which downloads them into the cache.

Files land in `cache_dir() / NAME /` under their published names (FedJAX SQLite files
open there as they are). CIFAR-100 comes from TFF's LZMA-compressed SQLite file and is
converted locally, one FedJAX SQLite file per split.

Example:
  >>> from fedjax_api.datasets import fetch
  >>> fetch("shakespeare", split="train")
  PosixPath('/home/me/.cache/fedjax/shakespeare/shakespeare_train.sqlite')
"""

from __future__ import annotations

import importlib
import lzma
import os
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

from fedjax_api.datasets.download import DownloadError, Progress, cache_dir, download, partial_path
from fedjax_api.errors import ConfigError
from fedjax_core import atomic

# `progress(label, done_bytes, total_bytes_or_None)`; label names the file in flight.
FetchProgress = Callable[[str, int, int | None], None]

_GCS = "https://storage.googleapis.com"
_FEDJAX = f"{_GCS}/gresearch/fedjax"


@attrs.frozen(kw_only=True)
class RemoteFile:
    """One published file.

    Attributes:
      url: where it is published.
      sha256: its hex digest; None where no authoritative value is published.
      size: its size in bytes; None where unknown.
    """

    url: str
    sha256: str | None = None
    size: int | None = None

    @property
    def filename(self) -> str:
        """The published file name, which is also the name in the cache."""
        return Path(urllib.parse.urlsplit(self.url).path).name


@attrs.frozen(kw_only=True)
class CatalogEntry:
    """A published dataset: its files and, if they need it, how to turn them into splits.

    Attributes:
      name: the name `fetch` and the CLI use.
      description: one line.
      files: the downloads by key. Without `postprocess` the keys are what `fetch` returns
        (the splits, plus extras such as a vocabulary file).
      splits: the dataset's splits.
      postprocess: None, or a key of `POSTPROCESSORS`: called once per split to build
        `output_name.format(split=...)` from the downloads.
      output_name: the file name a postprocessed split is written to.
      source: where the files come from.
    """

    name: str
    description: str
    files: Mapping[str, RemoteFile]
    splits: tuple[str, ...]
    postprocess: str | None = None
    output_name: str = "{split}.sqlite"
    source: str = ""

    @property
    def outputs(self) -> tuple[str, ...]:
        """The keys `fetch(name, split=KEY)` accepts."""
        return self.splits if self.postprocess else tuple(self.files)

    @property
    def download_size(self) -> int | None:
        """Bytes to download for every output; None if a size is unknown."""
        sizes = [f.size for f in self.files.values()]
        known = [s for s in sizes if s is not None]
        return sum(known) if len(known) == len(sizes) else None


def _fedjax_sqlite(folder: str, stem: str, splits: tuple[str, ...]) -> dict[str, RemoteFile]:
    # FedJAX does not publish sizes or hashes of these files (fedjax/datasets/*.py call
    # maybe_download without validate_file), so none are recorded: run `sha256sum` on a
    # download and record it here.
    return {s: RemoteFile(url=f"{_FEDJAX}/{folder}/{stem}{s}.sqlite") for s in splits}


CATALOG: dict[str, CatalogEntry] = {}


def register(entry: CatalogEntry) -> CatalogEntry:
    """Adds `entry` to `CATALOG` (replacing one of the same name)."""
    CATALOG[entry.name] = entry
    return entry


register(CatalogEntry(
    name="emnist",
    description="Federated EMNIST-62 (digits and letters), 3400 writers; FedJAX SQLite.",
    files=_fedjax_sqlite("emnist", "federated_emnist_", ("train", "test")),
    splits=("train", "test"),
    source="fedjax.datasets.emnist (Cohen et al. 2017; Caldas et al. 2018)",
))

register(CatalogEntry(
    name="emnist-digits",
    description="Federated EMNIST-10 (digits only), 3383 writers; FedJAX SQLite.",
    # A third party reports sha256 0540b878da75b6a9a8c14fadae5c4b0a62cf12f8ff5fcf675b6f6c6c774df323
    # for federated_emnist_digitsonly_train.sqlite; FedJAX itself publishes no hash, so it is
    # not enforced until someone checks it.
    files=_fedjax_sqlite("emnist", "federated_emnist_digitsonly_", ("train", "test")),
    splits=("train", "test"),
    source="fedjax.datasets.emnist(only_digits=True)",
))

register(CatalogEntry(
    name="shakespeare",
    description="Federated Shakespeare, one client per speaking role (715); FedJAX SQLite.",
    files=_fedjax_sqlite("shakespeare", "shakespeare_", ("train", "test")),
    splits=("train", "test"),
    source="fedjax.datasets.shakespeare (McMahan et al. 2017; LEAF)",
))

register(CatalogEntry(
    name="stackoverflow",
    description="Federated Stack Overflow (342,477 train users), plus the word counts "
                "the default vocabulary is cut from; FedJAX SQLite.",
    # A third party reports stackoverflow_train.sqlite as 5,506,732,032 bytes with sha256
    # 3efde71d939fd7cb58d357dd3c060c3a8c8babec7607df9c9cc549034bafc646; FedJAX publishes
    # neither, so they are not enforced until someone checks them.
    files={
        **_fedjax_sqlite("stackoverflow", "stackoverflow_", ("train", "held_out", "test")),
        # fedjax.datasets.stackoverflow.default_vocab reads gs://gresearch/fedjax/stackoverflow/
        # stackoverflow.word_count ("word count" lines, most frequent first). No hash published.
        "word_count": RemoteFile(url=f"{_FEDJAX}/stackoverflow/stackoverflow.word_count"),
    },
    splits=("train", "held_out", "test"),
    source="fedjax.datasets.stackoverflow (TFF Stack Overflow, 2019)",
))

register(CatalogEntry(
    name="cifar100",
    description="Federated CIFAR-100, 500 train / 100 test clients (Reddi et al. 2021); "
                "TFF's SQLite file, converted locally to FedJAX SQLite.",
    files={
        # Size and sha256 as recorded by fedjax/datasets/cifar100.py
        # (_TFF_SQLITE_COMPRESSED_NUM_BYTES, _TFF_SQLITE_COMPRESSED_HEXDIGEST). FedJAX also
        # records its own converted files; ours need not be byte-identical to those, so
        # they are kept here for reference only:
        #   federated_cifar100_train.sqlite: 140521472 bytes, sha256
        #     a4dc2f4ac4c9b6e7bd5234a1b568389384c00c903dcd34001c3cf50a4a81c713
        #   federated_cifar100_test.sqlite: 28135424 bytes, sha256
        #     74416c6ee8f41b1086f0e0e3c5289ac6df5a641100df48e8b583411a55de891f
        "tff": RemoteFile(
            url=f"{_GCS}/tff-datasets-public/cifar100.sqlite.lzma",
            sha256="23d3916c9caa33395737ee560cc7cb77bbd05fc7b73647ee7be3a7e764172939",
            size=153019920,
        ),
    },
    splits=("train", "test"),
    postprocess="tff_lzma_to_sqlite",
    output_name="federated_cifar100_{split}.sqlite",
    source="tff.simulation.datasets.cifar100; fedjax.datasets.cifar100",
))


def get(name: str) -> CatalogEntry:
    """The catalog entry `name`, or a `ConfigError` listing the known ones."""
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise ConfigError(f"unknown dataset {name!r}; known: {known}") from None


def names() -> list[str]:
    """The catalog's dataset names, sorted."""
    return sorted(CATALOG)


def local_paths(name: str) -> dict[str, Path]:
    """Where `fetch(name)` puts each output, whether or not it is there yet."""
    entry = get(name)
    folder = cache_dir() / entry.name
    if entry.postprocess:
        return {s: folder / entry.output_name.format(split=s) for s in entry.splits}
    return {k: folder / f.filename for k, f in entry.files.items()}


def is_cached(name: str, split: str | None = None) -> bool:
    """Whether `fetch(name, split=split)` would find everything already on disk."""
    paths = local_paths(name)
    keys = [_check_split(get(name), split)] if split is not None else list(paths)
    return all(paths[k].is_file() for k in keys)


def cached_size(name: str) -> int:
    """Bytes `name` takes in the cache (finished, intermediate and partial files)."""
    folder = cache_dir() / get(name).name
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def fetch(name: str, *, split: str | None = None,
          progress: FetchProgress | None = None) -> Path | dict[str, Path]:
    """Downloads (unless cached), verifies and, where needed, converts a catalog dataset.

    Args:
      name: a catalog name (`names()`).
      split: one key of `get(name).outputs` (e.g. "train"); None for all of them.
      progress: called as `progress(label, done_bytes, total_bytes_or_None)` while a file
        downloads or decompresses; `label` names that file.

    Returns:
      The local path of `split`, or a dict of every output's path when `split` is None.

    Raises:
      ConfigError: unknown name or split; `DownloadError` (a `ConfigError`) when a
        download fails, with a one-line message saying what to do.
    """
    entry = get(name)
    wanted = [_check_split(entry, split)] if split is not None else list(entry.outputs)
    folder = cache_dir() / entry.name
    targets = local_paths(name)
    for key in wanted:
        if targets[key].is_file():
            continue
        if entry.postprocess is None:
            _fetch_file(entry.files[key], folder, progress)
        else:
            downloaded = {k: _fetch_file(f, folder, progress) for k, f in entry.files.items()}
            postprocessor(entry.postprocess)(downloaded, key, targets[key], progress)
    return targets[split] if split is not None else {k: targets[k] for k in wanted}


def _check_split(entry: CatalogEntry, split: str) -> str:
    if split not in entry.outputs:
        raise ConfigError(f"dataset {entry.name!r} has no split {split!r}; "
                          f"choose from {', '.join(entry.outputs)}")
    return split


def _fetch_file(remote: RemoteFile, folder: Path, progress: FetchProgress | None) -> Path:
    dest = folder / remote.filename
    if dest.is_file():
        return dest
    report: Progress | None = None
    if progress is not None:
        def report_file(done: int, total: int | None, _label=remote.filename) -> None:
            progress(_label, done, total)
        report = report_file
    return download(remote.url, dest, sha256=remote.sha256, size=remote.size, progress=report)


# ---------------------------------------------------------------------------------------
# Postprocessors: (downloaded files by key, split, output path, progress) -> None.
# Each writes the output atomically (to a temporary name, then renamed).

Postprocessor = Callable[[Mapping[str, Path], str, Path, FetchProgress | None], None]

DECOMPRESS_CHUNK_BYTES = 1 << 20
# (module, function) of the TFF SQLite -> FedJAX SQLite converter, called as
# `tff_to_sqlite(tff_path, split, out_path)`.
TFF_CONVERTER = ("fedjax_core.data.convert", "tff_to_sqlite")


def decompress_lzma(src: Path, dest: Path, progress: FetchProgress | None = None) -> Path:
    """Streams the `.lzma`/`.xz` file `src` into `dest` (atomically); returns `dest`.

    `progress(label, compressed_bytes_read, compressed_size)` follows the input.
    """
    tmp = partial_path(dest)
    total = src.stat().st_size
    label = f"unpacking {src.name}"
    try:
        tmp.unlink(missing_ok=True)  # a stale one (or a planted link): never written through
        with open(src, "rb") as raw, lzma.open(raw, "rb") as fin, atomic.create(tmp) as fout:
            if progress is not None:
                progress(label, 0, total)
            while chunk := fin.read(DECOMPRESS_CHUNK_BYTES):
                fout.write(chunk)
                if progress is not None:
                    progress(label, raw.tell(), total)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
        atomic.fsync_dir(dest.parent)
    except (lzma.LZMAError, EOFError) as e:
        tmp.unlink(missing_ok=True)
        src.unlink(missing_ok=True)
        raise DownloadError(f"{src.name} is corrupt ({e}); deleted it, re-run to download "
                            "it again") from None
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"cannot write {str(dest)!r} ({e.strerror or e}); free some disk "
                            "space or set FEDJAX_DATA") from None
    return dest


def tff_lzma_to_sqlite(downloaded: Mapping[str, Path], split: str, out: Path,
                       progress: FetchProgress | None = None) -> None:
    """TFF's `NAME.sqlite.lzma` -> `NAME.sqlite` (kept for the other splits) -> FedJAX SQLite.

    The conversion is `fedjax_core.data.convert.tff_to_sqlite(tff_path, split, out_path)`.
    """
    (compressed,) = downloaded.values()
    if compressed.suffix not in (".lzma", ".xz"):
        raise ConfigError(f"expected an .lzma file to decompress, got {compressed.name!r}")
    tff_path = compressed.with_suffix("")
    if not tff_path.is_file():
        decompress_lzma(compressed, tff_path, progress)
    module, function = TFF_CONVERTER
    try:  # imported lazily: only CIFAR-100 needs it
        tff_to_sqlite = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"converting {compressed.name} needs {module}.{function} ({e}); "
                          "update fedjax-sim") from None
    tmp = partial_path(out)
    tmp.unlink(missing_ok=True)
    try:
        tff_to_sqlite(tff_path, split, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


POSTPROCESSORS: dict[str, Postprocessor] = {"tff_lzma_to_sqlite": tff_lzma_to_sqlite}


def postprocessor(name: str) -> Postprocessor:
    """The postprocess hook registered as `name`."""
    try:
        return POSTPROCESSORS[name]
    except KeyError:
        raise ConfigError(f"unknown postprocess step {name!r}; known: "
                          f"{', '.join(sorted(POSTPROCESSORS))}") from None
