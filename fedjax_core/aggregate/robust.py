"""Byzantine-robust aggregators: coordinate-wise median, trimmed mean, (Multi-)Krum, norm bounding.

Round t, cohort of m real clients (weight > 0) with deltas Delta_1..Delta_m; the cohort's
padding clients (weight 0) never count. With d indexing coordinates:

    coordinate_median:  Delta[d] = median_i Delta_i[d]                  (Yin et al. 2018)
    trimmed_mean(beta): b = floor(beta m); per coordinate drop the b largest and the b
                        smallest values, Delta[d] = mean of the m - 2b left (Yin et al. 2018)
    krum(f, multi):     s(i) = sum of ||Delta_i - Delta_j||^2 over the m - f - 2 nearest
                        j != i; Delta = mean of the `multi` Delta_i with the lowest s(i)
                        (multi = 1: Krum, Blanchard et al. 2017; Multi-Krum, El Mhamdi et
                        al. 2018)
    norm_bounding(M):   Delta = inner({Delta_i min(1, M / ||Delta_i||)}, {n_i})
                        (Sun et al. 2019; inner defaults to the example-weighted mean)

The median, the trimmed mean and Krum are unweighted, as in their papers: a client's
number of examples only decides whether it is real (n_i > 0). Every rule works on the
fixed `[clients, ...]` shapes of a jitted round: padding clients are sorted to the end
with a +inf fill (or given an infinite Krum score) and the rules index by the traced
real count m. A cohort with no real client aggregates to zeros.
"""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_core import tree
from fedjax_core.aggregate.base import Aggregator, AggregatorEntry, real_clients
from fedjax_core.aggregate.mean import mean
from fedjax_core.typing import Array

# ----------------------------------------------------------------------------- helpers

def _sorted_real(x, real):
    """Sorts `x` `[clients, ...]` along clients in float32, padding clients last (+inf)."""
    x32 = x.astype(jnp.float32)
    return jnp.sort(jnp.where(tree.per_client(real, x32), x32, jnp.inf), axis=0)


def _count_table(rate: float, max_clients: int, rounding: str) -> Array:
    """`table[m]` for m = 0..max_clients: `floor` or half-up `round` of `rate * m`.

    Computed exactly on the decimal value of `rate` (so 0.1 * 5 is exactly 0.5) on the
    host, at trace time: the cohort size is static, so the table is a constant.
    """
    r = Fraction(repr(float(rate)))
    if rounding == "floor":
        values = [int(r * m) for m in range(max_clients + 1)]          # Fraction >= 0
    else:  # round half up
        values = [int(r * m + Fraction(1, 2)) for m in range(max_clients + 1)]
    return jnp.asarray(np.asarray(values, np.int32))


def _empty_state(params):
    del params
    return optax.EmptyState()


def _resolve(inner):
    """An `Aggregator`, or the registered aggregator named `inner` (built with defaults)."""
    if isinstance(inner, str):
        from fedjax_core.aggregate import registry  # lazy: registry imports aggregators
        return registry.get(inner).build()
    return inner


# ----------------------------------------------------------------------------- median

def coordinate_median() -> Aggregator:
    """The coordinate-wise median of the real clients' deltas.

    Update rule: `Delta[d] = median {Delta_i[d] : n_i > 0}` for every coordinate d; for
    an even number m of real clients, the mean of the two middle values. Unweighted:
    weights only mark padding clients (0), which are ignored.

    Returns:
      A stateless `Aggregator`. `apply(deltas, weights, state, key, clients)` takes
      `deltas` with `[clients, ...]` leaves and `weights` `Float[Array, "clients"]`;
      metrics: `aggregate/num_clients` (m). No real client: zeros.

    Example:
      >>> agg = coordinate_median()
      >>> delta, _, metrics = agg.apply(deltas, weights, agg.init(params), key, None)

    References:
      Yin, Chen, Ramchandran, Bartlett 2018, "Byzantine-Robust Distributed Learning:
      Towards Optimal Statistical Rates" (ICML), Definition 1 / Algorithm 1 (option I).
    """

    def apply(deltas, weights, state, key=None, clients=None):
        del key, clients
        real, m = real_clients(weights)
        lo, hi = jnp.maximum(m - 1, 0) // 2, m // 2

        def leaf(x):
            s = _sorted_real(x, real)
            med = 0.5 * (jnp.take(s, lo, axis=0) + jnp.take(s, hi, axis=0))
            return jnp.where(m > 0, med, 0.0).astype(x.dtype)

        return jax.tree.map(leaf, deltas), state, {
            "aggregate/num_clients": m.astype(jnp.float32)}

    return Aggregator(_empty_state, apply)


# ----------------------------------------------------------------------------- trimmed mean

def trimmed_mean(beta: float = 0.1) -> Aggregator:
    """The coordinate-wise beta-trimmed mean of the real clients' deltas.

    Update rule: with m real clients and `b = floor(beta * m)`, for every coordinate d
    drop the b largest and the b smallest of `{Delta_i[d]}` and average the other
    `m - 2b`. Unweighted; padding clients (weight 0) are ignored. `beta = 0` is the
    unweighted mean.

    Args:
      beta: fraction trimmed on each side, `0 <= beta < 0.5` (so at least one value
        remains whenever m >= 1).

    Returns:
      A stateless `Aggregator`; metrics: `aggregate/num_clients` (m) and
      `aggregate/num_trimmed` (2b, values dropped per coordinate). No real client: zeros.

    Example:
      >>> agg = trimmed_mean(0.2)       # 10 real clients: drop 2 + 2 values per coordinate

    References:
      Yin, Chen, Ramchandran, Bartlett 2018, "Byzantine-Robust Distributed Learning:
      Towards Optimal Statistical Rates" (ICML), Definition 2 / Algorithm 1 (option II).
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean needs 0 <= beta < 0.5, got beta={beta}")

    def apply(deltas, weights, state, key=None, clients=None):
        del key, clients
        real, m = real_clients(weights)
        num_slots = jnp.shape(weights)[0]
        b = _count_table(beta, num_slots, "floor")[m]
        pos = jnp.arange(num_slots)
        keep = (pos >= b) & (pos < m - b)
        count = jnp.maximum(m - 2 * b, 1).astype(jnp.float32)

        def leaf(x):
            s = _sorted_real(x, real)
            total = jnp.sum(jnp.where(tree.per_client(keep, s), s, 0.0), axis=0)
            return (total / count).astype(x.dtype)

        return jax.tree.map(leaf, deltas), state, {
            "aggregate/num_clients": m.astype(jnp.float32),
            "aggregate/num_trimmed": (2 * b).astype(jnp.float32)}

    return Aggregator(_empty_state, apply)


# ----------------------------------------------------------------------------- Krum

def _pairwise_sq_distances(deltas, num_slots: int) -> Array:
    """`D[i, j] = ||Delta_i - Delta_j||^2` over all leaves, `[clients, clients]`.

    Computed from differences, one row at a time (`lax.map`), rather than from a Gram
    matrix: honest deltas are close to one another, and `|a|^2 + |b|^2 - 2ab` loses
    their distances to float32 cancellation. Memory stays one `[clients, ...]` stack.
    """
    leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(deltas)]

    def row(i):
        return sum(jnp.sum(jnp.square(x - x[i]).reshape(num_slots, -1), axis=1)
                   for x in leaves)

    if not leaves:
        return jnp.zeros((num_slots, num_slots), jnp.float32)
    return jax.lax.map(row, jnp.arange(num_slots))


def krum(num_byzantine: int = 1, multi: int | None = 1) -> Aggregator:
    """Krum and Multi-Krum: the average of the deltas closest to their neighbours.

    Update rule: with m real clients and f = `num_byzantine`, each real client i gets
    the score `s(i) = sum_{j in N_i} ||Delta_i - Delta_j||^2`, N_i its `k = m - f - 2`
    nearest other real clients; the aggregate is the unweighted mean of the `multi`
    real clients with the lowest scores (ties: lowest slot first). `multi = 1` is Krum;
    `multi = None` selects `m - f` clients (El Mhamdi et al.'s Multi-Krum choice).
    Padding clients (weight 0) neither count as neighbours nor get selected.

    Krum needs `k >= 1`, i.e. `m >= f + 3`. When the cohort has fewer than `f + 3`
    slots this can never hold and `apply` raises a ValueError at trace time. When a
    round has fewer real clients than that (the count is traced, so this cannot be
    checked statically), the scores use `k = 1` (each client's nearest neighbour; a
    lone client scores 0 and is selected) and the metric `aggregate/krum_degenerate` is 1.
    The number selected is clipped to `[1, m]`.

    Args:
      num_byzantine: f, the number of Byzantine clients to tolerate (>= 0).
      multi: how many best-scored deltas to average (>= 1), or None for `m - f`.

    Returns:
      A stateless `Aggregator`; metrics: `aggregate/krum_selected` (cohort slot of the
      best-scored client), `aggregate/krum_num_selected`, `aggregate/krum_degenerate`.
      No real client: zeros.

    Example:
      >>> agg = krum(num_byzantine=2)             # Krum; needs >= 5 real clients
      >>> agg = krum(num_byzantine=2, multi=None)  # Multi-Krum over m - 2 clients

    References:
      Blanchard, El Mhamdi, Guerraoui, Stainer 2017, "Machine Learning with Adversaries:
      Byzantine Tolerant Gradient Descent" (NeurIPS), Section 4. El Mhamdi, Guerraoui,
      Rouault 2018, "The Hidden Vulnerability of Distributed Learning in Byzantium"
      (ICML), Multi-Krum; Damaskinos et al. 2019, "AggregaThor" (SysML).
    """
    if num_byzantine < 0:
        raise ValueError(f"krum needs num_byzantine >= 0, got {num_byzantine}")
    if multi is not None and multi < 1:
        raise ValueError(f"krum needs multi >= 1 or None, got {multi}")

    def apply(deltas, weights, state, key=None, clients=None):
        del key, clients
        num_slots = jnp.shape(weights)[0]
        if num_slots - num_byzantine - 2 < 1:
            raise ValueError(
                f"krum(num_byzantine={num_byzantine}) needs at least {num_byzantine + 3} "
                f"clients per round (m - f - 2 >= 1); the cohort has {num_slots} slots")
        real, m = real_clients(weights)
        k = m - num_byzantine - 2
        degenerate = k < 1
        k = jnp.maximum(k, 1)

        dist = _pairwise_sq_distances(deltas, num_slots)
        pair_ok = real[:, None] & real[None, :] & ~jnp.eye(num_slots, dtype=bool)
        near = jnp.sort(jnp.where(pair_ok, dist, jnp.inf), axis=1)
        take = jnp.arange(num_slots)[None, :] < k
        scores = jnp.sum(jnp.where(take & jnp.isfinite(near), near, 0.0), axis=1)
        scores = jnp.where(real, scores, jnp.inf)
        order = jnp.argsort(scores, stable=True)

        count = (m - num_byzantine) if multi is None else jnp.asarray(multi, jnp.int32)
        count = jnp.clip(count, 1, jnp.maximum(m, 1))
        rank = jnp.zeros(num_slots, jnp.int32).at[order].set(jnp.arange(num_slots, dtype=jnp.int32))
        chosen = (rank < count) & real
        num_chosen = jnp.sum(chosen.astype(jnp.int32))

        def leaf(x):  # a masked sum, not a matmul: no reduced-precision dot on GPU
            total = jnp.sum(jnp.where(tree.per_client(chosen, x), x.astype(jnp.float32), 0.0), axis=0)
            return (total / jnp.maximum(num_chosen, 1)).astype(x.dtype)

        return jax.tree.map(leaf, deltas), state, {
            "aggregate/krum_selected": jnp.where(m > 0, order[0], -1).astype(jnp.float32),
            "aggregate/krum_num_selected": num_chosen.astype(jnp.float32),
            "aggregate/krum_degenerate": (degenerate & (m > 0)).astype(jnp.float32),
        }

    return Aggregator(_empty_state, apply)


# ----------------------------------------------------------------------------- norm bounding

def norm_bounding(max_norm: float = 1.0, inner: Aggregator | str | None = None) -> Aggregator:
    """Clip each client's delta to L2 norm `max_norm`, then aggregate with `inner`.

    Update rule: `Delta = inner({Delta_i * min(1, M / ||Delta_i||_2)}, {n_i})`, the norm
    taken over all leaves of one client's delta; with the default inner aggregator,
    `sum_i n_i clip(Delta_i) / sum_i n_i`. Padding clients keep weight 0.

    Args:
      max_norm: M > 0, the norm bound.
      inner: the aggregator of the clipped deltas (an `Aggregator`, or a registered
        aggregator's name built with its defaults); default the weighted `mean()`.

    Returns:
      An `Aggregator` whose state is `inner`'s. Metrics: `aggregate/num_clipped` (real
      clients whose norm exceeded M), `aggregate/mean_client_norm` (unweighted mean norm
      of the real clients before clipping), plus `inner`'s metrics.

    Example:
      >>> agg = norm_bounding(max_norm=3.0)

    References:
      Sun, Kairouz, Suresh, McMahan 2019, "Can You Really Backdoor Federated Learning?"
      (arXiv:1911.07963), Section 4 (norm thresholding of updates).
    """
    if not max_norm > 0:
        raise ValueError(f"norm_bounding needs max_norm > 0, got {max_norm}")
    inner = _resolve(inner) if inner is not None else mean()

    def apply(deltas, weights, state, key=None, clients=None):
        real, m = real_clients(weights)
        norms = tree.client_norms(deltas)                      # [clients]
        factor = tree.clip_factor(norms, max_norm)
        clipped = jax.tree.map(lambda x: x * tree.per_client(factor, x).astype(x.dtype), deltas)
        aggregate, state, metrics = inner.apply(clipped, weights, state, key, clients)
        return aggregate, state, {
            **metrics,
            "aggregate/num_clipped": jnp.sum((norms > max_norm) & real).astype(jnp.float32),
            "aggregate/mean_client_norm":
                jnp.sum(jnp.where(real, norms, 0.0)) / jnp.maximum(m, 1).astype(jnp.float32),
        }

    return Aggregator(inner.init, apply)


# ----------------------------------------------------------------------------- registry

ENTRIES = [
    AggregatorEntry(
        "coordinate_median", "coordinate-wise median of the real clients' deltas",
        lambda: coordinate_median(),
        "Yin et al. 2018, Byzantine-Robust Distributed Learning (ICML)"),
    AggregatorEntry(
        "trimmed_mean", "coordinate-wise mean after dropping the beta fraction "
        "largest and smallest values",
        lambda beta=0.1: trimmed_mean(beta),
        "Yin et al. 2018, Byzantine-Robust Distributed Learning (ICML)"),
    AggregatorEntry(
        "krum", "Krum: the delta closest to its m-f-2 nearest neighbours",
        lambda num_byzantine=1, multi=1: krum(num_byzantine, multi),
        "Blanchard et al. 2017, Machine Learning with Adversaries (NeurIPS)"),
    AggregatorEntry(
        "multi_krum", "Multi-Krum: mean of the m-f best Krum-scored deltas",
        lambda num_byzantine=1, multi=None: krum(num_byzantine, multi),
        "El Mhamdi et al. 2018, The Hidden Vulnerability of Distributed Learning "
        "in Byzantium (ICML)"),
    AggregatorEntry(
        "norm_bounding", "clip each client's delta to L2 norm max_norm, then an inner "
        "aggregator",
        lambda max_norm=1.0, inner="mean": norm_bounding(max_norm, inner),
        "Sun et al. 2019, Can You Really Backdoor Federated Learning?"),
]
