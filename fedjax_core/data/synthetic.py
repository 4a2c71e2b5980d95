"""Synthetic(alpha, beta) of Li et al. 2020 (FedProx): federated multinomial logistic data (numpy).

The generative model of the paper, section 5.1, as its generator scripts
(`data/synthetic_*/generate_synthetic.py`, `data/synthetic_iid/generate_iid.py`) implement it.
For each client `k` of `K`, with `d = dim` (60) and `C = classes` (10):

    n_k  = floor(LogNormal(4, 2)) + 50             examples (a power-law-like spread of sizes)
    u_k  ~ N(0, alpha^2)      W_k ~ N(u_k, 1)  [d, C]      b_k ~ N(u_k, 1)  [C]
    B_k  ~ N(0, beta^2)       v_k ~ N(B_k, 1)  [d]
    x    ~ N(v_k, Sigma),     Sigma = diag(j^-1.2 for j = 1..d)
    y    = argmax(softmax(W_k^T x + b_k)) = argmax(W_k^T x + b_k)

`alpha` controls how much the local models differ, `beta` how much the local inputs differ.
The paper writes `N(0, alpha)`; its code passes `alpha` and `beta` to `np.random.normal` as the
standard deviation, which is what is done here (the two readings agree at 0 and 1, the values
the paper uses: Synthetic(0, 0), (0.5, 0.5), (1, 1)). Note that even Synthetic(0, 0) is not
IID: `u_k = B_k = 0`, but every client still draws its own `W_k`, `b_k` and `v_k`.

Synthetic-IID (`iid=True`, the paper's "same W, b on all devices and X_k following the same
distribution", `generate_iid.py`): one `W ~ N(0, 1)`, `b ~ N(0, 1)` for all clients and
`v_k = 0`; `alpha` and `beta` are ignored. Sizes follow the same rule.

Each client's examples are split in order into train (the first `floor(0.9 n_k)`) and test
(the rest), the FedProx scripts' 90/10 split (their shuffle before the cut is not needed: a
client's examples are IID).

Randomness: numpy `Generator`s seeded from `SeedSequence(seed, spawn_key=...)`, one stream for
the shared IID model and, per client `k`, one for its parameters and one for its examples. A
client's data therefore does not depend on `num_clients`. The numbers differ from the FedProx
scripts (which use numpy's global legacy `RandomState`, unseeded); the distribution is the same.

References:
  Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020 (FedProx), sec. 5.1.
  Shamir et al., "Communication-Efficient Distributed Optimization using an Approximate
  Newton-type Method", ICML 2014 (the setup FedProx's synthetic data builds on).
"""

from typing import NamedTuple

import numpy as np

from fedjax_core.data.federated_data import InMemoryFederatedData
from fedjax_core.data.partition import client_id

SIZE_LOGNORMAL_MEAN = 4.0
SIZE_LOGNORMAL_SIGMA = 2.0
SIZE_OFFSET = 50
COVARIANCE_EXPONENT = -1.2
TRAIN_FRACTION = 0.9

_SHARED, _PARAMS, _SAMPLES = 0, 1, 2  # spawn keys of the random streams


class SyntheticParams(NamedTuple):
    """The per-client parameters of Synthetic(alpha, beta) (float64, numpy).

    Attributes:
      w: `[K, d, C]`, `W_k` (identical rows when IID).
      b: `[K, C]`, `b_k`.
      v: `[K, d]`, the mean `v_k` of the client's inputs (0 when IID).
      u: `[K]`, `u_k`, the mean of `W_k` and `b_k` (0 when IID).
      big_b: `[K]`, `B_k`, the mean of `v_k` (0 when IID).
      sizes: `Int[ndarray, "K"]`, `n_k`, examples per client before the train/test split.
    """

    w: np.ndarray
    b: np.ndarray
    v: np.ndarray
    u: np.ndarray
    big_b: np.ndarray
    sizes: np.ndarray


def covariance_diagonal(dim: int = 60) -> np.ndarray:
    """`Float[ndarray, "dim"]`: the diagonal of Sigma, `j^-1.2` for `j = 1 .. dim`."""
    return np.arange(1, dim + 1, dtype=np.float64) ** COVARIANCE_EXPONENT


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def synthetic_params(alpha: float, beta: float, num_clients: int = 30, dim: int = 60,
                     classes: int = 10, seed: int = 0, iid: bool = False,
                     samples_per_client: int | None = None) -> SyntheticParams:
    """Draws the clients' `W_k, b_k, v_k` and sizes `n_k` of Synthetic(alpha, beta).

    Args and the rule: as `synthetic`.

    Returns:
      `SyntheticParams`, float64.
    """
    if num_clients < 1 or dim < 1 or classes < 2:
        raise ValueError(f"need num_clients >= 1, dim >= 1, classes >= 2; got {num_clients}, "
                         f"{dim}, {classes}")
    if not (alpha >= 0 and beta >= 0):
        raise ValueError(f"alpha and beta are standard deviations, >= 0; got {alpha}, {beta}")
    if samples_per_client is not None and samples_per_client < 1:
        raise ValueError(f"samples_per_client must be >= 1 or None, got {samples_per_client}")
    w = np.empty((num_clients, dim, classes))
    b = np.empty((num_clients, classes))
    v = np.zeros((num_clients, dim))
    u = np.zeros(num_clients)
    big_b = np.zeros(num_clients)
    sizes = np.empty(num_clients, np.int64)
    if iid:
        shared = _rng(seed, _SHARED)
        w_shared = shared.normal(0.0, 1.0, (dim, classes))
        b_shared = shared.normal(0.0, 1.0, classes)
    for k in range(num_clients):
        rng = _rng(seed, _PARAMS, k)
        size = int(rng.lognormal(SIZE_LOGNORMAL_MEAN, SIZE_LOGNORMAL_SIGMA)) + SIZE_OFFSET
        sizes[k] = size if samples_per_client is None else samples_per_client
        if iid:
            w[k], b[k] = w_shared, b_shared
            continue
        u[k] = rng.normal(0.0, alpha)
        big_b[k] = rng.normal(0.0, beta)
        v[k] = rng.normal(big_b[k], 1.0, dim)
        w[k] = rng.normal(u[k], 1.0, (dim, classes))
        b[k] = rng.normal(u[k], 1.0, classes)
    return SyntheticParams(w=w, b=b, v=v, u=u, big_b=big_b, sizes=sizes)


def synthetic(alpha: float, beta: float, num_clients: int = 30, dim: int = 60,
              classes: int = 10, seed: int = 0, iid: bool = False, *,
              samples_per_client: int | None = None,
              train_fraction: float = TRAIN_FRACTION
              ) -> tuple[InMemoryFederatedData, InMemoryFederatedData]:
    """Synthetic(alpha, beta) of FedProx, split per client into train and test.

    For client `k` (see the module docstring for the full rule):
    `W_k ~ N(u_k, 1)`, `b_k ~ N(u_k, 1)`, `u_k ~ N(0, alpha^2)`; `v_k ~ N(B_k, 1)`,
    `B_k ~ N(0, beta^2)`; `x ~ N(v_k, diag(j^-1.2))`; `y = argmax(W_k^T x + b_k)`;
    `n_k = floor(LogNormal(4, 2)) + 50`; train = the first `floor(train_fraction * n_k)`.

    Labels are computed from the float32 `x` that is returned (widened to float64), so
    `argmax(x @ W_k + b_k)` on the returned data gives back `y` exactly.

    Args:
      alpha: spread of the local models (standard deviation of `u_k`), >= 0.
      beta: spread of the local input means (standard deviation of `B_k`), >= 0.
      num_clients: `K` (30 in the paper).
      dim: input dimension `d` (60).
      classes: number of classes `C` (10).
      seed: the seed of every random stream.
      iid: Synthetic-IID: one shared `W, b ~ N(0, 1)`, `v_k = 0`; alpha, beta ignored.
      samples_per_client: give every client this many examples instead of the lognormal rule
        (as several later papers do); None for the paper's rule.
      train_fraction: share of each client's examples in train (0.9 in FedProx's scripts).

    Returns:
      `(train, test)`, `InMemoryFederatedData` with the same client ids `client_00000`, ...:
      `x` `float32 [n, d]`, `y` `int32 [n]`.

    Example:
      >>> train, test = synthetic(1.0, 1.0, seed=0)             # Synthetic(1, 1)
      >>> train.get_client(0)["x"].shape[1], len(train)
      (60, 30)

    References:
      Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, sec. 5.1.
    """
    if not 0 < train_fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    params = synthetic_params(alpha, beta, num_clients, dim, classes, seed, iid,
                              samples_per_client)
    scale = np.sqrt(covariance_diagonal(dim))
    train, test = {}, {}
    for k in range(num_clients):
        rng = _rng(seed, _SAMPLES, k)
        n = int(params.sizes[k])
        x = (params.v[k] + scale * rng.standard_normal((n, dim))).astype(np.float32)
        y = np.argmax(x.astype(np.float64) @ params.w[k] + params.b[k], axis=1).astype(np.int32)
        cut = int(train_fraction * n)
        cid = client_id(k, num_clients)
        train[cid] = {"x": x[:cut], "y": y[:cut]}
        test[cid] = {"x": x[cut:], "y": y[cut:]}
    return InMemoryFederatedData(train), InMemoryFederatedData(test)
