"""EMNIST-like federated data: the same clients, pixels, labels and round schedule as
the data FedJAX 0.0.17's benchmark trains on (`../shared/bench/synth_emnist.py`).

Numpy only. The maths is that of `synth_emnist.py`, written out again here (the project
does not import it), so that scenario `emnist-cnn` trains on exactly the clients, and
in the same round order, as `fedjax_emnist_bench.py` (tests/benchmarks checks it
against `synth_emnist.py` when that file is present):

    sizes_i  = max(10, rint(Gamma(k, theta)))   k = (m / s)^2, theta = s^2 / m,
               m = 226.8, s = 88.9 (federated EMNIST-62's train clients), seed 0
    labels   ~ Uniform{0 .. 61}                  one stream, seed 1
    pixels   = 0.5 * template[label] + 0.5 * U[0, 1)^{28 x 28},
               templates ~ U[0, 1)^{62 x 28 x 28}, noise drawn in chunks of 65,536 examples
    round r  = the clients Generator([7, r]).choice(3400, K, replace=False)

Client i holds examples `offsets[i] .. offsets[i] + sizes[i] - 1` of that stream.
The model reads FedJAX's preprocessing of them: `x = 1 - pixels[..., None]` (float32
`[n, 28, 28, 1]`), `y = label` (int32). The test split has exactly 10,000 examples over
clients of about 23 examples (`make_test`).
"""

from typing import Sequence

import numpy as np

NUM_CLASSES = 62
"""Labels 0 .. 61, as federated EMNIST-62."""
SIZE_MEAN = 226.8
"""Mean number of examples of a train client of federated EMNIST-62."""
SIZE_STD = 88.9
"""Their standard deviation."""
NUM_CLIENTS = 3400
"""Train clients of federated EMNIST-62."""
CHUNK = 65536
"""Examples per block of noise draws (part of the stream's definition)."""


def client_sizes(num_clients: int = NUM_CLIENTS, mean: float = SIZE_MEAN, std: float = SIZE_STD,
                 seed: int = 0, min_size: int = 10) -> np.ndarray:
    """Gamma-distributed client sizes with the given mean and std, rounded, at least `min_size`.

    Args:
      num_clients: how many clients.
      mean: mean of the gamma distribution.
      std: its standard deviation (shape `(mean / std)^2`, scale `std^2 / mean`).
      seed: numpy `default_rng` seed.
      min_size: smallest client.

    Returns:
      `Int[ndarray, "clients"]` (int64).

    Example:
      >>> client_sizes()[:3]        # the first three EMNIST-like train clients
    """
    rng = np.random.default_rng(seed)
    k = (mean / std) ** 2
    theta = std ** 2 / mean
    sizes = np.rint(rng.gamma(k, theta, size=num_clients)).astype(np.int64)
    return np.maximum(sizes, min_size)


def make_examples(total: int, seed: int = 1, rows: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The example stream: pixels float32 `[total, 28, 28]` in [0, 1), labels int32 `[total]`.

    Args:
      total: examples in the stream.
      seed: numpy `default_rng` seed.
      rows: sorted stream positions to keep (None: all). The whole stream is drawn
        either way (every draw depends on the ones before it); only the kept rows are
        stored, so memory follows `len(rows)`.

    Returns:
      `(pixels [len(rows), 28, 28], labels [len(rows)])`, rows in stream order.
    """
    rng = np.random.default_rng(seed)
    templates = rng.random((NUM_CLASSES, 28, 28), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=total, dtype=np.int32)
    if rows is None:
        pixels = np.empty((total, 28, 28), dtype=np.float32)
        for s in range(0, total, CHUNK):
            e = min(total, s + CHUNK)
            noise = rng.random((e - s, 28, 28), dtype=np.float32)
            np.multiply(templates[labels[s:e]], 0.5, out=pixels[s:e])
            pixels[s:e] += 0.5 * noise
        return pixels, labels
    rows = np.asarray(rows, np.int64)
    pixels = np.empty((len(rows), 28, 28), dtype=np.float32)
    for s in range(0, total, CHUNK):
        e = min(total, s + CHUNK)
        noise = rng.random((e - s, 28, 28), dtype=np.float32)  # always drawn: keeps the stream
        lo, hi = np.searchsorted(rows, [s, e])
        if lo == hi:
            continue
        r = rows[lo:hi]
        np.multiply(templates[labels[r]], 0.5, out=pixels[lo:hi])
        pixels[lo:hi] += 0.5 * noise[r - s]
    return pixels, labels[rows]


def offsets_of(sizes: np.ndarray) -> np.ndarray:
    """First stream position of each client: `[0, cumsum(sizes)[:-1]]` (int64)."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def make_train(num_clients: int = NUM_CLIENTS, seed: int = 0):
    """`(sizes [C], offsets [C], pixels [N, 28, 28], labels [N])` of the train split
    (`synth_emnist.make_train`): sizes from `seed`, examples from `seed + 1`."""
    sizes = client_sizes(num_clients, seed=seed)
    offsets = offsets_of(sizes)
    pixels, labels = make_examples(int(sizes.sum()), seed=seed + 1)
    return sizes, offsets, pixels, labels


def test_sizes(total: int = 10000, seed: int = 100) -> np.ndarray:
    """Sizes of the test clients: `max(1, round(Gamma(6.5, 3.49)))` until `total` examples
    (about 1/10 of a train client each), the last one cut to fit."""
    rng = np.random.default_rng(seed)
    sizes = []
    remaining = total
    while remaining > 0:
        s = int(max(1, round(rng.gamma(6.5, 3.49))))
        s = min(s, remaining)
        sizes.append(s)
        remaining -= s
    return np.array(sizes, dtype=np.int64)


def make_test(total: int = 10000, seed: int = 100):
    """`(sizes, offsets, pixels, labels)` of the test split (`synth_emnist.make_test`)."""
    sizes = test_sizes(total, seed)
    pixels, labels = make_examples(total, seed=seed + 1)
    return sizes, offsets_of(sizes), pixels, labels


def round_schedule(num_rounds: int, num_clients: int = NUM_CLIENTS, clients_per_round: int = 10,
                   seed: int = 7) -> np.ndarray:
    """Client positions of each round, `[num_rounds, clients_per_round]`: round r draws
    without replacement from `default_rng([seed, r])`."""
    out = np.empty((num_rounds, clients_per_round), dtype=np.int64)
    for r in range(num_rounds):
        rng = np.random.default_rng([seed, r])
        out[r] = rng.choice(num_clients, size=clients_per_round, replace=False)
    return out


def client_id(i: int) -> str:
    """FedJAX-style 8-character EMNIST client id `fNNNN_NN` of client i."""
    return f"f{i // 100:04d}_{i % 100:02d}"


def batches_per_client(sizes: np.ndarray, batch_size: int = 20, num_epochs: int = 1) -> np.ndarray:
    """`ceil(sizes * epochs / batch_size)`: steps of each client."""
    return (np.asarray(sizes) * num_epochs + batch_size - 1) // batch_size


class ArraysData:
    """A `FederatedData` over concatenated arrays: client i is rows
    `offsets[i] .. offsets[i] + sizes[i] - 1` of every feature (views, no copies).

    Args:
      sizes: every client's number of examples.
      features: name -> concatenated examples.
      offsets: each client's first row (default: the clients back to back, in order); a
        negative offset marks a client whose examples are not stored.
      ids: client ids (default `c000000`, `c000001`, ...).
    """

    def __init__(self, sizes: np.ndarray, features: dict[str, np.ndarray],
                 offsets: np.ndarray | None = None, ids: Sequence[str] | None = None):
        self._sizes = np.asarray(sizes, np.int64)
        self._offsets = offsets_of(self._sizes) if offsets is None else np.asarray(offsets)
        self._features = features
        self._ids = tuple(ids) if ids is not None else tuple(
            f"c{i:06d}" for i in range(len(self._sizes)))

    @property
    def client_ids(self) -> tuple[str, ...]:
        return self._ids

    @property
    def client_sizes(self) -> np.ndarray:
        return self._sizes

    def get_client(self, index: int) -> dict[str, np.ndarray]:
        s, n = int(self._offsets[index]), int(self._sizes[index])
        if s < 0:
            raise KeyError(f"client {index} was not materialised; pass it in `keep`")
        return {k: v[s:s + n] for k, v in self._features.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of the stored examples."""
        return sum(v.nbytes for v in self._features.values())


class EmnistLikeData(ArraysData):
    """A `FederatedData` of EMNIST-like clients, holding only the clients it will serve.

    `client_sizes` and `client_ids` cover the whole population (so samplers and padding
    see the real size distribution); the examples of the clients in `keep` (and of the
    largest client, which `pack.fixed_steps` reads) are stored as
    FedJAX preprocesses them (`x = 1 - pixels[..., None]`, `y = label`). Reading another
    client raises a `KeyError`.

    Args:
      sizes: every client's number of examples (e.g. `client_sizes()`).
      keep: client positions to materialise; None: all.
      seed: seed of the example stream (`make_examples`).

    Example:
      >>> sched = round_schedule(33)
      >>> data = EmnistLikeData(client_sizes(), keep=np.unique(sched))
      >>> data.get_client(int(sched[0, 0]))["x"].shape     # (n, 28, 28, 1)
    """

    def __init__(self, sizes: np.ndarray, keep: Sequence[int] | np.ndarray | None = None,
                 seed: int = 1):
        sizes = np.asarray(sizes, np.int64)
        offsets = offsets_of(sizes)
        kept = (np.arange(len(sizes)) if keep is None else  # + the largest (fixed_steps reads it)
                np.unique(np.append(np.asarray(keep, np.int64), np.argmax(sizes))))
        rows = np.concatenate([np.arange(offsets[i], offsets[i] + sizes[i]) for i in kept]
                              ) if len(kept) else np.zeros(0, np.int64)
        pixels, labels = make_examples(int(sizes.sum()), seed=seed, rows=rows)
        np.subtract(np.float32(1.0), pixels, out=pixels)  # FedJAX: x = 1 - pixels
        stored = np.full(len(sizes), -1, np.int64)  # the kept clients, back to back
        stored[kept] = offsets_of(sizes[kept]) if len(kept) else []
        super().__init__(sizes, {"x": pixels[..., None], "y": labels}, stored,
                         ids=[client_id(i) for i in range(len(sizes))])


def emnist_test(total: int = 10000, seed: int = 100) -> ArraysData:
    """The EMNIST-like test split as a `FederatedData` (`x = 1 - pixels[..., None]`, `y`)."""
    sizes, _, pixels, labels = make_test(total, seed)
    np.subtract(np.float32(1.0), pixels, out=pixels)
    return ArraysData(sizes, {"x": pixels[..., None], "y": labels})
