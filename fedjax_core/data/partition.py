"""Partitioners: a centralized labelled dataset -> `InMemoryFederatedData` (host side, numpy).

Every partitioner takes `arrays`, a dict `feature -> np.ndarray` with one shared leading
`examples` axis (e.g. `{"x": [N, 28, 28], "y": [N]}`), and assigns every example to exactly one
client. A client keeps its examples in the dataset's order (indices sorted ascending); all
features travel together. Client ids are `client_00000`, `client_00001`, ... (five digits, more
when needed), except for `by_column`, which uses the column's values. Randomness comes only
from `np.random.default_rng(seed)`: the same arguments give the same partition.

| partitioner            | rule                                                                |
| ---------------------- | ------------------------------------------------------------------- |
| `iid`                  | a random permutation cut into `num_clients` near-equal parts        |
| `dirichlet_label_skew` | per class, proportions over clients ~ Dir(alpha); Wang et al. 2020  |
| `shards`               | sort by label, cut into shards, `shards_per_client` each; McMahan 2017 |
| `quantity_skew`        | IID labels, client sizes proportional to lognormal draws            |
| `by_column`            | one client per distinct value of a column (natural ids)             |
"""

import os
import zipfile
from typing import Mapping, Sequence

import numpy as np

from fedjax_core.data.errors import DataFormatError
from fedjax_core.data.federated_data import InMemoryFederatedData

Arrays = Mapping[str, np.ndarray]


class _NotPlain(Exception):
    """Why a member of a `.npz` is refused (the caller adds the file and the member)."""


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no check
        return 2**62


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a plain `.npz` file (what `np.savez` writes), never unpickling anything.

    Every member's `.npy` header is checked against the member's size before its array is
    read, so a crafted header cannot make numpy allocate more than the file holds.

    Args:
      path: a `.npz` file of numeric (or fixed-width string) arrays.

    Returns:
      `{name: array}` in the file's order.

    Raises:
      FileNotFoundError / IsADirectoryError / PermissionError: the path cannot be read.
      DataFormatError: the file is not a plain `.npz` (not a zip of `.npy` arrays, a damaged
        member, or an array of Python objects, which would need unpickling).

    Example:
      >>> np.savez("d.npz", x=np.zeros((4, 2)), y=np.arange(4))
      >>> sorted(read_npz("d.npz"))
      ['x', 'y']
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, not a .npz file")
    not_plain = (f"{path}: not a plain, pickle-free .npz file (a zip of .npy arrays without "
                 "Python objects); write it with numpy.savez")
    with open(path, "rb") as f:
        try:
            archive = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError):
            raise DataFormatError(not_plain) from None
        arrays: dict[str, np.ndarray] = {}
        with archive:
            total = sum(info.file_size for info in archive.infolist())
            if total > _physical_memory():
                raise DataFormatError(f"{path}: its arrays declare {total} bytes, more than this "
                                      "machine's memory; is the file damaged?")
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                try:
                    with archive.open(info) as member:
                        version = np.lib.format.read_magic(member)
                        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0)
                        shape, _, dtype = read_header(member)
                        if dtype.hasobject:
                            raise _NotPlain("it holds Python objects")
                        declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
                        if declared > info.file_size:
                            raise _NotPlain(f"it declares {declared} bytes but holds "
                                            f"{info.file_size}")
                    with archive.open(info) as member:
                        arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
                except Exception as e:  # zip, zlib, numpy header and read errors of bad bytes
                    if isinstance(e, MemoryError):
                        raise
                    # numpy's own text may suggest allow_pickle=True: never pass that on
                    why = str(e) if isinstance(e, _NotPlain) else f"damaged: {type(e).__name__}"
                    raise DataFormatError(f"{not_plain} (member {info.filename!r}: {why})"
                                          ) from None
    return arrays


def client_id(index: int, num_clients: int) -> str:
    """`client_00042`: the id of client `index`, zero-padded to 5 digits (more if needed)."""
    width = max(5, len(str(max(num_clients - 1, 0))))
    return f"client_{index:0{width}d}"


def _num_examples(arrays: Arrays) -> int:
    if not arrays:
        raise ValueError("arrays is empty; give a dict feature -> array, e.g. {'x': x, 'y': y}")
    lengths = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in arrays.items()}
    sizes = [np.shape(v)[0] for v in arrays.values() if np.ndim(v)]
    if len(sizes) != len(arrays) or len(set(sizes)) != 1:
        raise ValueError(f"features disagree on the number of examples {lengths}; every array "
                         "needs the same leading axis")
    return int(sizes[0])


def _check_clients(num_clients: int, n: int, per_client: int = 1) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients * per_client > n:
        raise ValueError(f"{n} examples cannot give {num_clients} clients {per_client} "
                         "example(s) each; use fewer clients")


def _labels(arrays: Arrays, label_key: str) -> np.ndarray:
    if label_key not in arrays:
        raise ValueError(f"no label array {label_key!r} in arrays (features: {sorted(arrays)}); "
                         "pass label_key=")
    labels = np.asarray(arrays[label_key])
    if labels.ndim != 1:
        raise ValueError(f"labels {label_key!r} must be 1-D [examples], got shape {labels.shape}")
    return labels


def from_assignment(arrays: Arrays, assignment: Sequence[np.ndarray],
                    ids: Sequence[str] | None = None) -> InMemoryFederatedData:
    """Builds the federated data of a partition given as example indices per client.

    Args:
      arrays: feature -> `[N, ...]` arrays.
      assignment: for each client, the indices of its examples; each example at most once.
      ids: client ids; default `client_00000`, `client_00001`, ...

    Returns:
      `InMemoryFederatedData` whose client `k` holds `arrays[f][sorted(assignment[k])]`.
    """
    n = _num_examples(arrays)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    ids = [client_id(k, len(assignment)) for k in range(len(assignment))] if ids is None else ids
    if len(ids) != len(assignment):
        raise ValueError(f"{len(ids)} ids for {len(assignment)} clients")
    counts = np.zeros(n, np.int64)
    clients = {}
    for cid, idx in zip(ids, assignment):
        idx = np.sort(np.asarray(idx, np.int64))
        np.add.at(counts, idx, 1)
        clients[cid] = {k: v[idx] for k, v in arrays.items()}
    if np.any(counts > 1):
        raise ValueError(f"example {int(np.argmax(counts > 1))} is assigned to several clients")
    return InMemoryFederatedData(clients)


def _split_at_fractions(indices: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    """Cuts `indices` at `floor(cumsum(proportions) * len)`: the rule of Wang et al.'s code."""
    cuts = (np.cumsum(proportions) * len(indices)).astype(np.int64)[:-1]
    return np.split(indices, cuts)


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Largest-remainder apportionment: integers summing to `total`, proportional to `weights`."""
    quota = weights / weights.sum() * total
    sizes = np.floor(quota).astype(np.int64)
    left = total - int(sizes.sum())
    order = np.argsort(-(quota - sizes), kind="stable")  # biggest remainder first, ties by index
    sizes[order[:left]] += 1
    return sizes


def iid(arrays: Arrays, num_clients: int, seed: int = 0) -> InMemoryFederatedData:
    """IID partition: a random permutation of the examples cut into near-equal parts.

    `perm = rng.permutation(N)`; client `k` gets the `k`-th of `num_clients` consecutive parts
    (`np.array_split`): sizes `ceil(N / K)` for the first `N mod K` clients, `floor(N / K)` after.

    Args:
      arrays: feature -> `[N, ...]` arrays.
      num_clients: `K`, at most `N`.
      seed: seed of `np.random.default_rng`.

    Returns:
      `InMemoryFederatedData` with `K` clients.

    Example:
      >>> data = iid({"x": np.arange(10), "y": np.arange(10) % 2}, num_clients=3, seed=0)
      >>> data.client_sizes
      array([4, 3, 3])

    References:
      McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
      Data", AISTATS 2017 (the IID MNIST partition).
    """
    n = _num_examples(arrays)
    _check_clients(num_clients, n)
    perm = np.random.default_rng(seed).permutation(n)
    return from_assignment(arrays, np.array_split(perm, num_clients))


def dirichlet_label_skew(arrays: Arrays, num_clients: int, alpha: float, seed: int = 0,
                         label_key: str = "y", min_size: int = 10,
                         max_tries: int = 1000) -> InMemoryFederatedData:
    """Label skew by per-class Dirichlet allocation, as in Wang et al. 2020 (FedMA) code.

    This is the variant of Yurochkin et al. 2019 / Wang et al. 2020, also used by NIID-Bench
    (Li et al. 2022), NOT the per-client variant of Hsu et al. 2019 (which draws each client's
    class mix `q_k ~ Dir(alpha * p)` and samples a fixed number of examples from it). The rule,
    with `K = num_clients`, `N` examples, classes `c` in sorted order:

        repeat (at most `max_tries` times):
          every client starts empty
          for each class c:
            idx_c  = rng.permutation(indices of class c)
            p_c    ~ Dir(alpha * 1_K)                      (rng.dirichlet)
            p_c,k  = 0 for clients already holding >= N / K examples  (the code's balancing;
                     skipped for this class if it would zero every share)
            p_c    = p_c / sum(p_c)
            split idx_c at floor(cumsum(p_c) * |idx_c|), part k to client k
        until every client holds >= min_size examples

    Small `alpha` (0.1) gives each client few classes; large `alpha` (100) approaches IID.

    Args:
      arrays: feature -> `[N, ...]` arrays.
      num_clients: `K`.
      alpha: Dirichlet concentration, > 0.
      seed: seed of `np.random.default_rng`; draws happen in the order written above.
      label_key: the 1-D label array in `arrays`.
      min_size: smallest client size accepted (the code's 10); `K * min_size <= N`.
      max_tries: redraws before giving up with a `ValueError`.

    Returns:
      `InMemoryFederatedData` with `K` clients of at least `min_size` examples.

    Example:
      >>> data = dirichlet_label_skew({"x": x, "y": y}, num_clients=100, alpha=0.5, seed=0)

    References:
      Wang et al., "Federated Learning with Matched Averaging", ICLR 2020.
      Yurochkin et al., "Bayesian Nonparametric Federated Learning of Neural Networks", ICML 2019.
      Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for Federated
      Visual Classification", 2019 (the Dirichlet label-skew idea).
    """
    n = _num_examples(arrays)
    labels = _labels(arrays, label_key)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    _check_clients(num_clients, n, max(min_size, 0))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        held = np.zeros(num_clients, np.int64)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            capped = p * (held < n / num_clients)
            # With a tiny alpha the open clients' shares can all underflow to 0: then the
            # class goes by the uncapped draw instead of dividing by zero.
            p = capped / capped.sum() if capped.sum() > 0 else p / p.sum()
            for k, part in enumerate(_split_at_fractions(idx, p)):
                parts[k].append(part)
                held[k] += len(part)
        if held.min() >= min_size:
            return from_assignment(arrays, [np.concatenate(p) for p in parts])
    raise ValueError(f"no draw in {max_tries} gave every client >= {min_size} examples "
                     f"(alpha={alpha}, {num_clients} clients, {n} examples); lower min_size, "
                     "raise alpha or use fewer clients")


def shards(arrays: Arrays, num_clients: int, shards_per_client: int = 2, seed: int = 0,
           label_key: str = "y") -> InMemoryFederatedData:
    """Pathological non-IID partition of McMahan et al. 2017: sorted-label shards.

    Sort the examples by label (stable, so ties keep the dataset order), cut the sorted order
    into `S = num_clients * shards_per_client` consecutive shards (`np.array_split`: sizes
    differ by at most one when `S` does not divide `N`), draw `perm = rng.permutation(S)`, and
    give client `k` the shards `perm[k * s : (k + 1) * s]`, `s = shards_per_client`. With
    MNIST, 100 clients and 2 shards of 300 each, most clients see only two digits.

    Args:
      arrays: feature -> `[N, ...]` arrays.
      num_clients: `K`.
      shards_per_client: `s`, shards given to each client; `K * s <= N`.
      seed: seed of `np.random.default_rng`.
      label_key: the 1-D label array in `arrays`.

    Returns:
      `InMemoryFederatedData` with `K` clients of `s` shards each.

    Example:
      >>> y = np.repeat(np.arange(10), 20)                       # 200 examples, 10 labels
      >>> data = shards({"y": y}, num_clients=5, shards_per_client=2, seed=0)
      >>> [len(np.unique(data.get_client(k)["y"])) for k in range(5)]
      [2, 2, 2, 2, 2]

    References:
      McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
      Data", AISTATS 2017, section 3 (pathological non-IID MNIST).
    """
    n = _num_examples(arrays)
    labels = _labels(arrays, label_key)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    _check_clients(num_clients, n, shards_per_client)
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_clients * shards_per_client)
    perm = np.random.default_rng(seed).permutation(len(pieces))
    s = shards_per_client
    return from_assignment(
        arrays, [np.concatenate([pieces[j] for j in perm[k * s:(k + 1) * s]])
                 for k in range(num_clients)])


def quantity_skew(arrays: Arrays, num_clients: int, sigma: float, seed: int = 0,
                  min_size: int = 1) -> InMemoryFederatedData:
    """Quantity skew: IID examples, client sizes proportional to lognormal draws.

        w_k  ~ LogNormal(0, sigma^2)                     (rng.lognormal, K draws)
        n_k  = min_size + a_k,  a = largest-remainder apportionment of N - K * min_size
               in proportion to w                        (so sum_k n_k = N exactly)
        perm = rng.permutation(N); client k gets the next n_k examples of perm

    `sigma = 0` gives near-equal sizes (sizes differ by at most one, as in `iid`); a larger
    `sigma` gives a heavier tail of big clients.

    Args:
      arrays: feature -> `[N, ...]` arrays.
      num_clients: `K`.
      sigma: standard deviation of the log sizes, >= 0.
      seed: seed of `np.random.default_rng`; the sizes are drawn before the permutation.
      min_size: examples every client gets at least; `K * min_size <= N`.

    Returns:
      `InMemoryFederatedData` with `K` clients whose sizes sum to `N`.

    Example:
      >>> data = quantity_skew({"x": x, "y": y}, num_clients=10, sigma=1.0, seed=0)
      >>> int(data.client_sizes.sum()) == len(y)
      True

    References:
      Li et al., "Federated Learning on Non-IID Data Silos: An Experimental Study", ICDE 2022
      (quantity skew); Kairouz et al., "Advances and Open Problems in Federated Learning", 2021.
    """
    n = _num_examples(arrays)
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    _check_clients(num_clients, n, min_size)
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, float(sigma), num_clients)
    sizes = min_size + _apportion(n - num_clients * min_size, weights)
    perm = rng.permutation(n)
    return from_assignment(arrays, np.split(perm, np.cumsum(sizes)[:-1]))


def by_column(arrays: Arrays, column: str, keep_column: bool = False) -> InMemoryFederatedData:
    """Natural partition: one client per distinct value of `arrays[column]` (e.g. a writer id).

    Clients are the sorted distinct values; the id is the value as text (bytes decoded as
    UTF-8, numbers via `str`). The column itself is dropped from the features unless
    `keep_column`.

    Args:
      arrays: feature -> `[N, ...]` arrays, including the 1-D `column`.
      column: name of the 1-D array of client ids (ints, strings or bytes).
      keep_column: keep `column` among each client's features.

    Returns:
      `InMemoryFederatedData` with one client per distinct value, in sorted value order.

    Example:
      >>> data = by_column({"x": np.arange(4), "writer": np.array(["b", "a", "b", "a"])}, "writer")
      >>> data.client_ids, data.get_client(0)["x"]
      (('a', 'b'), array([1, 3]))
    """
    _num_examples(arrays)
    if column not in arrays:
        raise ValueError(f"no column {column!r} in arrays (features: {sorted(arrays)})")
    values = np.asarray(arrays[column])
    if values.ndim != 1:
        raise ValueError(f"column {column!r} must be 1-D [examples], got shape {values.shape}")
    features = {k: v for k, v in arrays.items() if keep_column or k != column}
    if not features:
        raise ValueError(f"arrays holds only the column {column!r}; nothing left to partition")
    distinct, inverse = np.unique(values, return_inverse=True)
    ids = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in distinct.tolist()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"distinct values of {column!r} give the same id as text")
    order = np.argsort(inverse, kind="stable")
    assignment = np.split(order, np.cumsum(np.bincount(inverse, minlength=len(distinct)))[:-1])
    return from_assignment(features, assignment, ids)
