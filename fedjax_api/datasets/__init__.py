"""Published federated datasets: the catalog, and verified, resumable downloads into the cache.

`fedjax_api.datasets.download` is the download module (its `download()` fetches one URL);
the function is not re-exported here so that the module name stays importable.

Example:
  >>> from fedjax_api import datasets
  >>> datasets.names()
  ['cifar100', 'emnist', 'emnist-digits', 'shakespeare', 'stackoverflow']
  >>> datasets.fetch("emnist", split="train")
  PosixPath('/home/me/.cache/fedjax/emnist/federated_emnist_train.sqlite')
"""

from fedjax_api.datasets import download
from fedjax_api.datasets.catalog import (
    CATALOG,
    CatalogEntry,
    RemoteFile,
    cached_size,
    fetch,
    get,
    is_cached,
    local_paths,
    names,
)
from fedjax_api.datasets.download import DownloadError, cache_dir

__all__ = ["CATALOG", "CatalogEntry", "DownloadError", "RemoteFile", "cache_dir", "cached_size",
           "download", "fetch", "get", "is_cached", "local_paths", "names"]
