"""Opening federated data by catalog name or path, and describing it (`fedjax data info`)."""

from pathlib import Path

import numpy as np

from fedjax_api.datasets import catalog
from fedjax_api.errors import ConfigError
from fedjax_core.data import FederatedData
from fedjax_core.data.errors import DataFormatError


def open_data(name_or_path: str, split: str | None = None) -> FederatedData:
    """Opens a cached catalog dataset (`emnist`, with `split`) or a file or folder.

    A path ending in `.sqlite` opens as FedJAX SQLite; a folder or `.json`/`.json.gz`
    file as LEAF JSON. A catalog dataset that is not downloaded, a missing path, or a
    malformed file raise `ConfigError` with one line saying what to do.

    Example:
      >>> open_data("emnist", split="train")
      >>> open_data("data/femnist/train")
    """
    from fedjax_core.data.leaf import load_leaf
    from fedjax_core.data.sqlite import SQLiteFederatedData

    if name_or_path in catalog.names():
        entry = catalog.get(name_or_path)
        split = split or entry.splits[0]
        if split not in entry.splits:
            raise ConfigError(f"{name_or_path} has splits {', '.join(entry.splits)}; "
                              f"got --split {split}")
        if not catalog.is_cached(name_or_path, split):
            raise ConfigError(f"{name_or_path} ({split}) is not downloaded; run "
                              f"`fedjax data download {name_or_path}` (needs the internet)")
        return SQLiteFederatedData(catalog.local_paths(name_or_path)[split])
    path = Path(name_or_path)
    if not path.exists():
        raise ConfigError(f"{name_or_path!r} is neither a dataset name ({', '.join(catalog.names())}) "
                          "nor an existing file or folder")
    try:
        if path.suffix == ".sqlite":
            return SQLiteFederatedData(path)
        if path.is_dir() or path.name.endswith((".json", ".json.gz")):
            return load_leaf(path)
    except (DataFormatError, FileNotFoundError) as e:  # also: a folder without LEAF files
        raise ConfigError(str(e)) from None
    raise ConfigError(f"{name_or_path!r}: unknown format; give a FedJAX .sqlite file or a "
                      "LEAF JSON file or folder")


def describe(data: FederatedData) -> dict:
    """Clients, examples, the client-size distribution and the features of `data`.

    Returns:
      `{"clients", "examples", "sizes": {min, p10, median, mean, p90, p95, max},
      "features": {name: {"dtype", "shape"}}}`; `shape` is per example, from the
      first non-empty client.
    """
    sizes = np.asarray(data.client_sizes)
    out = {"clients": int(sizes.size), "examples": int(sizes.sum()), "sizes": {}, "features": {}}
    if sizes.size:
        q = np.percentile(sizes, [10, 50, 90, 95])
        out["sizes"] = {"min": int(sizes.min()), "p10": float(q[0]), "median": float(q[1]),
                        "mean": float(sizes.mean()), "p90": float(q[2]), "p95": float(q[3]),
                        "max": int(sizes.max())}
        nonempty = np.flatnonzero(sizes)
        if nonempty.size:
            try:
                first = data.get_client(int(nonempty[0]))
            except DataFormatError as e:
                raise ConfigError(str(e)) from None
            out["features"] = {k: {"dtype": str(v.dtype), "shape": list(v.shape[1:])}
                               for k, v in first.items()}
    return out


def check_clients(data: FederatedData) -> tuple[int, tuple[str, str] | None]:
    """Decodes every client of `data` (`fedjax data info --check`), stopping at the first bad one.

    A client is bad when its stored bytes do not decode (a corrupt blob), its arrays disagree
    on the number of examples, or that number differs from the size the file lists for it.

    Returns:
      `(number of clients checked, None)` when every client is good, else
      `(position of the bad client, (its id, what is wrong: one line))`.

    Example:
      >>> check_clients(open_data("emnist", split="train"))
      (3400, None)
    """
    sizes = np.asarray(data.client_sizes)
    for i, cid in enumerate(data.client_ids):
        try:
            arrays = data.get_client(i)
        except DataFormatError as e:
            return i, (str(cid), str(e))
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) > 1:
            return i, (str(cid), f"client {cid!r}: features disagree on the number of "
                                 f"examples {lengths}")
        n = next(iter(lengths.values()), 0)
        if n != int(sizes[i]):
            return i, (str(cid), f"client {cid!r} has {n} examples but the file lists "
                                 f"{int(sizes[i])}")
    return len(data.client_ids), None
