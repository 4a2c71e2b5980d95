"""The `FederatedData` protocol and its in-memory implementation (host side, numpy)."""

from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from fedjax_core.data.errors import DataFormatError
from fedjax_core.data.index_cache import cached_sizes

ClientArrays = dict[str, np.ndarray]
"""One client's examples: feature name -> array with a leading `examples` axis."""


@runtime_checkable
class FederatedData(Protocol):
    """A set of clients, each a dict of numpy arrays with a shared leading axis.

    Clients are addressed by position `0 .. num_clients - 1` (what samplers draw)
    and named by `client_ids[i]`.
    """

    @property
    def client_ids(self) -> Sequence[str]:
        """Client names, in a fixed order."""
        ...

    @property
    def client_sizes(self) -> np.ndarray:
        """`Int[ndarray, "clients"]`: number of examples of each client."""
        ...

    def get_client(self, index: int) -> ClientArrays:
        """The examples of the client at position `index`."""
        ...


class InMemoryFederatedData:
    """`FederatedData` over a dict `client id -> {feature: array}` held in memory.

    Example:
      >>> data = InMemoryFederatedData({"a": {"x": np.zeros((3, 2)), "y": np.zeros(3)}})
      >>> data.client_sizes
      array([3])
    """

    def __init__(self, clients: Mapping[str, Mapping[str, np.ndarray]]):
        ids = list(clients)
        features: tuple[str, ...] | None = None
        stored: list[ClientArrays] = []
        for cid in ids:
            arrays = {k: np.asarray(v) for k, v in clients[cid].items()}
            keys = tuple(sorted(arrays))
            if not keys:
                raise ValueError(f"client {cid!r} has no features; give each client a dict of arrays")
            if features is None:
                features = keys
            elif keys != features:
                raise ValueError(
                    f"client {cid!r} has features {list(keys)} but the first client has "
                    f"{list(features)}; every client needs the same feature names")
            lengths = {k: a.shape[0] if a.ndim else -1 for k, a in arrays.items()}
            if len(set(lengths.values())) != 1 or -1 in lengths.values():
                raise ValueError(
                    f"client {cid!r}: features disagree on the number of examples {lengths}; "
                    "every feature needs the same leading axis")
            stored.append(arrays)
        self._ids = tuple(ids)
        self._clients = stored
        self._sizes = np.array([next(iter(c.values())).shape[0] for c in stored], np.int64)
        self.features = features or ()

    @property
    def client_ids(self) -> tuple[str, ...]:
        return self._ids

    @property
    def client_sizes(self) -> np.ndarray:
        return self._sizes

    def get_client(self, index: int) -> ClientArrays:
        return self._clients[index]

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return (f"InMemoryFederatedData({len(self)} clients, "
                f"{int(self._sizes.sum())} examples, features={list(self.features)})")


def num_examples(data: FederatedData) -> int:
    """Total number of examples over all clients."""
    return int(np.sum(data.client_sizes))


class PreprocessedFederatedData:
    """A `FederatedData` whose clients pass through `fn` when read (FedJAX's
    `preprocess_client`): `get_client(i) = fn(client_id, base.get_client(i))`.

    Args:
      base: the raw clients.
      fn: `fn(client_id, arrays) -> arrays`.
      keeps_sizes: True when `fn` keeps the number of examples (then `client_sizes`
        are the base's); False makes the first `client_sizes` read preprocess every
        client once to count.
      sizes_version: with `keeps_sizes=False`, a name for `fn` (e.g.
        `"shakespeare-v1/seq80"`; change it whenever `fn` could count differently): the
        counted sizes are kept in the index cache beside the base file's index
        (`fedjax_core.data.index_cache.cached_sizes`), so a later run on the unchanged file
        reads them instead of preprocessing every client. None: never cached.

    Example:
      >>> data = PreprocessedFederatedData(raw, lambda cid, c: {"x": c["x"] / 255.0}, True)
    """

    def __init__(self, base: FederatedData, fn, keeps_sizes: bool,
                 sizes_version: str | None = None):
        self._base = base
        self._fn = fn
        self._sizes_version = sizes_version
        self._sizes = np.asarray(base.client_sizes, np.int64) if keeps_sizes else None

    @property
    def client_ids(self) -> Sequence[str]:
        return self._base.client_ids

    @property
    def client_sizes(self) -> np.ndarray:
        if self._sizes is None:
            self._sizes = cached_sizes(self._base, self._sizes_version, self._count_sizes)
        return self._sizes

    def _count_sizes(self) -> np.ndarray:
        """Every client's number of examples after `fn` (preprocesses every client)."""
        return np.array([len(next(iter(self.get_client(i).values())))
                         for i in range(len(self._base.client_ids))], np.int64)

    def get_client(self, index: int) -> ClientArrays:
        cid = self._base.client_ids[index]
        arrays = self._base.get_client(index)
        try:
            return self._fn(cid, arrays)
        except KeyError as e:  # a file of another dataset: name the client and what it holds
            key = e.args[0] if e.args else None
            if isinstance(key, str) and key not in arrays:
                raise DataFormatError(
                    f"client {cid!r} has no feature {key!r} (it has {', '.join(sorted(arrays))}); "
                    "the file holds another dataset, check the path or download it again"
                ) from None
            raise


class AlignedFederatedData:
    """The clients of `data` reordered to follow `client_ids`; an id that `data` lacks
    becomes a client with no examples.

    Used to pair each test client with its own training examples (personalization,
    HypCluster's cluster choice): `aligned.get_client(c)` are the training examples of
    the test client `c`.

    Args:
      data: the clients to read from (e.g. the training split).
      client_ids: the order to follow (e.g. the test split's ids).

    Example:
      >>> train_of_test = AlignedFederatedData(train, test.client_ids)
      >>> train_of_test.positions            # position in `train`, -1 where absent
    """

    def __init__(self, data: FederatedData, client_ids: Sequence[str]):
        where = {cid: i for i, cid in enumerate(data.client_ids)}
        self._data = data
        self._ids = tuple(client_ids)
        self.positions = np.array([where.get(cid, -1) for cid in self._ids], np.int64)
        sizes = np.asarray(data.client_sizes, np.int64)
        self._sizes = np.where(self.positions >= 0, sizes[np.maximum(self.positions, 0)], 0)
        self._empty: ClientArrays | None = None

    @property
    def client_ids(self) -> tuple[str, ...]:
        return self._ids

    @property
    def client_sizes(self) -> np.ndarray:
        return self._sizes

    def get_client(self, index: int) -> ClientArrays:
        pos = int(self.positions[index])
        if pos >= 0:
            return self._data.get_client(pos)
        if self._empty is None:
            first = self._data.get_client(0)
            self._empty = {k: np.asarray(v)[:0] for k, v in first.items()}
        return self._empty
