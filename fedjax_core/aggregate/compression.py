"""Compressed uplink: each client encodes its delta, the server decodes and averages.

Every client flattens its delta to a d-vector `x_i` (`ravel_pytree`), encodes it into a
short message with its own key `k_i = fold_in(key, slot_i)` (the server knows the
keys: "shared randomness"), and the server decodes `x^_i` and combines the decoded
deltas with the example-weighted mean (or any `inner` aggregator):

    Delta = sum_i n_i x^_i / sum_i n_i

| aggregator                   | message of one client                  | bits per client         |
| ---------------------------- | -------------------------------------- | ----------------------- |
| `stochastic_quantization(b)` | b-bit level of each x_j, min, max      | `b d + 64`              |
| `rotated_quantization(b)`    | the same for `R x` (R from shared key) | `b d' + 64`             |
| `top_k(k)`                   | k (index, value) pairs                 | `k (ceil(log2 d) + 32)` |
| `drive()`                    | sign(R x), one scale S                 | `d' + 32`               |

with `d' = 2^ceil(log2 d)` (the Hadamard transform pads with zeros), floats counted as
32 bits and indices as `ceil(log2 d)` bits. The seeds of the random rotations are not
sent: they derive from the round key and the client's slot, which the server knows.
Each aggregator emits `aggregate/bits_per_client` (the formula above),
`aggregate/bits_per_round` (bits per client times the number of real clients, those with
weight > 0) and `aggregate/compression_ratio` (`32 d / bits_per_client`). They are
float32, exact up to 2^24 bits.

Unlike FedJAX (google/fedjax, fedjax/aggregators/compression.py), which quantizes every
leaf of the delta with its own range and counts two floats per leaf, the whole delta is
one vector here, as in the papers.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_core import client_state, keys, parallel, tree
from fedjax_core.aggregate.base import Aggregator, AggregatorEntry
from fedjax_core.aggregate.mean import mean
from fedjax_core.typing import Array, ArrayLike, Float, Int, PRNGKey, State

FLOAT_BITS = 32
"""Bits of one transmitted float (a scale, a min/max, a top-k value)."""

INNER_KEY = keys.INNER
"""`fold_in(key, INNER_KEY)` is the inner aggregator's key; client i's is `fold_in(key, slot_i)`."""


# ----------------------------------------------------------------------------- helpers


def padded_dim(d: int) -> int:
    """The smallest power of two `>= d` (the Hadamard transform's length)."""
    return 1 << max(0, (d - 1).bit_length())


def index_bits(d: int) -> int:
    """`ceil(log2 d)`: bits of one coordinate index in `[0, d)` (0 when d = 1)."""
    return max(0, (d - 1).bit_length())


def fwht(x: ArrayLike) -> Array:
    """Fast Walsh-Hadamard transform over the last axis, unnormalised: `H x`.

    `H` is Sylvester's Hadamard matrix (`H_1 = [1]`, `H_2n = [[H_n, H_n], [H_n, -H_n]]`),
    symmetric with `H H^T = n I`, so `fwht(fwht(x)) = n x`. log2(n) butterfly stages,
    O(n log n) additions.

    Args:
      x: `Float[Array, "... n"]` with n a power of two.

    Returns:
      `Float[Array, "... n"]`.

    Example:
      >>> fwht(jnp.array([1.0, 0.0, 0.0, 0.0]))
      Array([1., 1., 1., 1.], dtype=float32)
    """
    x = jnp.asarray(x)
    n = x.shape[-1]
    if n & (n - 1) or n == 0:
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    batch = x.shape[:-1]
    h = 1
    while h < n:
        pairs = x.reshape(batch + (n // (2 * h), 2, h))
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(batch + (n,))
        h *= 2
    return x


def hadamard_signs(key: PRNGKey, n: int) -> Float[Array, " n"]:
    """The random diagonal `D` (i.i.d. +-1) of the rotation `R = H D / sqrt(n)`."""
    return jax.random.rademacher(key, (n,), jnp.float32)


def rotate(x: Float[Array, " d"], key: PRNGKey) -> Float[Array, " n"]:
    """`R x` with `R = H D / sqrt(n)` (orthonormal), x zero-padded to `n = padded_dim(d)`."""
    n = padded_dim(x.shape[-1])
    x = jnp.pad(x, (0, n - x.shape[-1]))
    return fwht(hadamard_signs(key, n) * x) / jnp.sqrt(jnp.float32(n))


def unrotate(z: Float[Array, " n"], key: PRNGKey, d: int) -> Float[Array, " d"]:
    """`R^{-1} z = R^T z = D H z / sqrt(n)`, truncated to the first d coordinates."""
    n = z.shape[-1]
    return (hadamard_signs(key, n) * fwht(z) / jnp.sqrt(jnp.float32(n)))[:d]


# ----------------------------------------------------------------------------- codecs


class Quantized(NamedTuple):
    """A stochastically quantized vector: `x^_j = lo + levels_j (hi - lo) / (2^b - 1)`.

    Attributes:
      levels: `Int[Array, "d"]` in `[0, 2^b)`, b bits each on the wire.
      lo: the vector's minimum (32 bits).
      hi: the vector's maximum (32 bits).
    """

    levels: Array
    lo: Array
    hi: Array


def stochastic_quantize(x: Float[Array, " d"], bits: int, key: PRNGKey) -> Quantized:
    """Suresh et al.'s `pi_sk` with `k = 2^bits` levels evenly spaced on `[min x, max x]`.

    A coordinate between levels `B_r <= x_j < B_{r+1}` is rounded up with probability
    `(x_j - B_r) / (B_{r+1} - B_r)` and down otherwise, so `E[dequantize] = x`.
    """
    num_levels = 2 ** bits
    lo, hi = jnp.min(x), jnp.max(x)
    step = (hi - lo) / (num_levels - 1)
    t = jnp.clip((x - lo) / jnp.where(step > 0, step, 1.0), 0.0, num_levels - 1)
    floor = jnp.floor(t)
    up = jax.random.uniform(key, x.shape) < t - floor
    levels = jnp.minimum(floor + up, num_levels - 1).astype(jnp.int32)
    return Quantized(levels, lo, hi)


def dequantize(msg: Quantized, bits: int) -> Float[Array, " d"]:
    """The server's decode of `stochastic_quantize`."""
    step = (msg.hi - msg.lo) / (2 ** bits - 1)
    return msg.lo + msg.levels.astype(jnp.float32) * step


def rotated_quantize(x: Float[Array, " d"], bits: int, key: PRNGKey) -> Quantized:
    """Suresh et al.'s `pi_srk`: `stochastic_quantize(R x)` with `R = H D / sqrt(d')`.

    `key` is split into the rotation's seed (shared with the server, not sent) and the
    rounding key.
    """
    rot_key, round_key = jax.random.split(key)
    return stochastic_quantize(rotate(x, rot_key), bits, round_key)


def rotated_dequantize(msg: Quantized, bits: int, key: PRNGKey, d: int) -> Float[Array, " d"]:
    """`R^{-1} dequantize(msg)` with the rotation regenerated from the client's key."""
    rot_key, _ = jax.random.split(key)
    return unrotate(dequantize(msg, bits), rot_key, d)


class Sparse(NamedTuple):
    """k coordinates of a d-vector: `ceil(log2 d)` bits per index, 32 per value."""

    indices: Int[Array, " k"]
    values: Float[Array, " k"]


def top_k_sparsify(x: Float[Array, " d"], k: int) -> Sparse:
    """The k largest-magnitude coordinates of x (ties: the lower index first)."""
    _, indices = jax.lax.top_k(jnp.abs(x), k)
    return Sparse(indices, x[indices])


def densify(msg: Sparse, d: int) -> Float[Array, " d"]:
    """The d-vector that is `msg.values` at `msg.indices` and 0 elsewhere."""
    return jnp.zeros((d,), msg.values.dtype).at[msg.indices].set(msg.values)


class DriveMessage(NamedTuple):
    """DRIVE's message: one bit per rotated coordinate and one 32-bit scale.

    Attributes:
      positive: `Bool[Array, "d'"]`, `R x >= 0` (a 0 is sent as +1).
      scale: S.
    """

    positive: Array
    scale: Array


def _drive_rotation(key: PRNGKey, d: int, rotation: str):
    """(forward, inverse) of the client's rotation; inverse maps back to d coordinates."""
    if rotation == "hadamard":
        return (lambda x: rotate(x, key)), (lambda z: unrotate(z, key, d))
    q = jax.random.orthogonal(key, d)
    return ((lambda x: jnp.matmul(q, x, precision=tree.EXACT)),
            (lambda z: jnp.matmul(q.T, z, precision=tree.EXACT)))


def drive_encode(x: Float[Array, " d"], key: PRNGKey, rotation: str = "hadamard") -> DriveMessage:
    """DRIVE's client side: `z = R x`, send `sign(z)` and the unbiased scale
    `S = ||x||_2^2 / ||z||_1` (0 for x = 0)."""
    forward, _ = _drive_rotation(key, x.shape[-1], rotation)
    z = forward(x)
    l1 = jnp.sum(jnp.abs(z))
    scale = jnp.where(l1 > 0, jnp.sum(jnp.square(x)) / jnp.where(l1 > 0, l1, 1.0), 0.0)
    return DriveMessage(z >= 0, scale)


def drive_decode(msg: DriveMessage, key: PRNGKey, d: int,
                 rotation: str = "hadamard") -> Float[Array, " d"]:
    """DRIVE's server side: `x^ = S R^{-1} sign(R x)`."""
    _, inverse = _drive_rotation(key, d, rotation)
    return msg.scale * inverse(jnp.where(msg.positive, 1.0, -1.0))


# ----------------------------------------------------------------------------- aggregators


class CompressionState(NamedTuple):
    """State of a stateless compressor: only its inner aggregator's state."""

    inner: State


class TopKState(NamedTuple):
    """State of top-k with error feedback.

    Attributes:
      residuals: `ClientStore` of rows `Float[Array, "d"]`, each client's unsent mass
        `e_i` (clients seen for the first time start from 0).
      inner: the inner aggregator's state.
    """

    residuals: client_state.ClientStore
    inner: State


def _resolve_inner(inner: Aggregator | str | None) -> Aggregator:
    """`inner` itself, the registered aggregator of that name, or `mean()` for None."""
    if inner is None:
        return mean()
    if isinstance(inner, str):
        from fedjax_core.aggregate import registry  # lazy: registry imports this module
        return registry.get(inner).build()
    return inner


def _bit_metrics(bits_per_client: int, d: int, weights: Array) -> dict:
    real = jnp.sum(jnp.asarray(weights) > 0).astype(jnp.float32)
    bits = jnp.float32(bits_per_client)
    return {
        "aggregate/bits_per_client": bits,
        "aggregate/bits_per_round": bits * real,
        "aggregate/compression_ratio": jnp.float32(FLOAT_BITS * d / bits_per_client),
    }


def _num_clients(weights) -> int:
    return jnp.shape(weights)[0]


def _plan(chunk_size: int | None, num_clients: int) -> parallel.Plan:
    return parallel.Plan(chunk_size or max(1, num_clients))


def _flat_shape(deltas) -> tuple[int, Callable]:
    """d and the unravel function of one client's delta, from stacked `[clients, ...]`."""
    flat, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], deltas))
    return flat.shape[0], unravel


def _check_chunk(chunk_size):
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be None or at least 1, got {chunk_size}")


def _stateless(name: str, roundtrip: Callable, message_bits: Callable[[int], int],
               inner: Aggregator | str | None, chunk_size: int | None,
               randomised: bool = True) -> Aggregator:
    """An aggregator that decodes `roundtrip(x_i, k_i, d)` for every client, then `inner`."""
    inner = _resolve_inner(inner)
    _check_chunk(chunk_size)

    def init(params):
        return CompressionState(inner.init(params))

    def apply(deltas, weights, state, key=None, clients=None):
        if key is None and randomised:
            raise ValueError(f"the {name} aggregator is randomised: pass a PRNG key")
        d, unravel = _flat_shape(deltas)
        n = _num_clients(weights)

        def one_client(c):
            delta, slot = c
            x, _ = ravel_pytree(delta)
            client_key = None if key is None else jax.random.fold_in(key, slot)
            x_hat = roundtrip(x.astype(jnp.float32), client_key, d)
            return unravel(x_hat.astype(x.dtype))

        decoded = parallel.map_clients(
            one_client, (deltas, jnp.arange(n, dtype=jnp.int32)), _plan(chunk_size, n))
        inner_key = None if key is None else jax.random.fold_in(key, INNER_KEY)
        aggregate, inner_state, metrics = inner.apply(
            decoded, weights, state.inner, inner_key, clients)
        return aggregate, CompressionState(inner_state), {
            **metrics, **_bit_metrics(message_bits(d), d, weights)}

    return Aggregator(init, apply, bits_per_client=message_bits)


def _check_bits(bits: int) -> int:
    if int(bits) != bits or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [1, 16], got {bits}")
    return int(bits)


def stochastic_quantization(bits: int = 8, inner: Aggregator | str | None = None,
                            chunk_size: int | None = None) -> Aggregator:
    """Stochastic uniform quantization of each client's delta (`pi_sk`), then the mean.

    Client i sends, for its flattened delta `x` (d coordinates), `min x`, `max x` and for
    every coordinate the index of one of the `2^bits` evenly spaced levels
    `B_r = min x + r (max x - min x) / (2^bits - 1)`, chosen by stochastic rounding
    between the two levels around `x_j` so that the decode is unbiased:
    `E[x^_j] = x_j`, `Var[x^_j] <= (max x - min x)^2 / (4 (2^bits - 1)^2)`.

    Args:
      bits: bits per coordinate, 1 to 16 (1 is Suresh et al.'s binary `pi_sb`).
      inner: how the decoded deltas are combined: an `Aggregator` or a registered name
        (e.g. "trimmed_mean"); the example-weighted `mean()` by default.
      chunk_size: clients encoded together under `vmap` (`parallel.Plan`); None: all.

    Returns:
      An `Aggregator` with state `CompressionState`. Metrics:
      `aggregate/bits_per_client = bits d + 64`, `aggregate/bits_per_round`,
      `aggregate/compression_ratio = 32 d / (bits d + 64)`, plus the inner aggregator's.

    Example:
      >>> agg = stochastic_quantization(bits=4)
      >>> delta, state, metrics = agg.apply(stacked_deltas, weights, agg.init(params), key, None)

    References:
      Suresh et al. 2017, "Distributed Mean Estimation with Limited Communication"
      (ICML), stochastic binary and k-level quantization (`pi_sb`, `pi_sk`).
    """
    bits = _check_bits(bits)

    def roundtrip(x, key, d):
        return dequantize(stochastic_quantize(x, bits, key), bits)

    return _stateless("quantize", roundtrip, lambda d: bits * d + 2 * FLOAT_BITS, inner,
                      chunk_size)


def rotated_quantization(bits: int = 8, inner: Aggregator | str | None = None,
                         chunk_size: int | None = None) -> Aggregator:
    """Stochastic quantization after a random Hadamard rotation (`pi_srk`), then the mean.

    Client i zero-pads its flattened delta to `d' = 2^ceil(log2 d)`, rotates it,
    `z = R x` with `R = H D / sqrt(d')` (H the Walsh-Hadamard matrix, D a diagonal of
    random +-1 from the client's key, known to the server), and sends
    `stochastic_quantize(z, bits)`. The server decodes `x^ = R^{-1} z^` (first d
    coordinates). The rotation spreads the mass of x evenly, so `max z - min z` is
    O(||x||_2 sqrt(log d / d)) with high probability and the mean squared error shrinks
    from O(d ||x||^2 / (2^bits - 1)^2) to O(log d ||x||^2 / (2^bits - 1)^2); the decode
    stays unbiased.

    Args:
      bits: bits per rotated coordinate, 1 to 16.
      inner: how the decoded deltas are combined (an `Aggregator` or a registered
        name); `mean()` by default.
      chunk_size: clients encoded together under `vmap`; None: all.

    Returns:
      An `Aggregator` with state `CompressionState`. Metrics:
      `aggregate/bits_per_client = bits d' + 64` (the seed of D is shared randomness
      and not sent), `aggregate/bits_per_round`, `aggregate/compression_ratio`.

    Example:
      >>> agg = rotated_quantization(bits=2)

    References:
      Suresh et al. 2017, "Distributed Mean Estimation with Limited Communication"
      (ICML), stochastic rotated quantization (`pi_srk`).
    """
    bits = _check_bits(bits)

    def roundtrip(x, key, d):
        return rotated_dequantize(rotated_quantize(x, bits, key), bits, key, d)

    return _stateless("rotated_quantize", roundtrip,
                      lambda d: bits * padded_dim(d) + 2 * FLOAT_BITS, inner, chunk_size)


def drive(rotation: str = "hadamard", inner: Aggregator | str | None = None,
          chunk_size: int | None = None) -> Aggregator:
    """DRIVE: one bit per coordinate of the rotated delta and one scale, then the mean.

    Client i rotates its flattened delta, `z = R x`, and sends `sign(z)` (d' bits) and
    `S = ||x||_2^2 / ||z||_1` (32 bits); the server decodes `x^ = S R^{-1} sign(z)`.
    `<x^, x> = S ||z||_1 = ||x||^2` for every R; this is the paper's unbiased scale
    (the biased one, `||z||_1 / d`, minimises one vector's error). With a uniform random
    rotation the decode is unbiased, `E[x^] = x` (by symmetry, E[x^] is parallel to x,
    and `<E[x^], x> = ||x||^2`).

    With the randomized Hadamard rotation `R = H D / sqrt(d')` (d' = 2^ceil(log2 d),
    the paper's practical choice and its authors' code) the decode is only approximately
    unbiased: e.g. in d = 2, x = (2, 1) decodes to (2.5, 0) for every D. For vectors of
    many coordinates of comparable magnitude the bias is small (R x is nearly Gaussian).

    Args:
      rotation: "hadamard" (O(d log d), d' bits) or "uniform" (a Haar-random orthogonal
        d x d matrix, exactly unbiased; O(d^2) memory and O(d^3) time per client, for
        small models and tests only; d bits).
      inner: how the decoded deltas are combined (an `Aggregator` or a registered
        name); `mean()` by default.
      chunk_size: clients encoded together under `vmap`; None: all.

    Returns:
      An `Aggregator` with state `CompressionState`. Metrics:
      `aggregate/bits_per_client = d' + 32` (or `d + 32` for "uniform"),
      `aggregate/bits_per_round`, `aggregate/compression_ratio`.

    Example:
      >>> agg = drive()

    References:
      Vargaftik et al. 2021, "DRIVE: One-bit Distributed Mean Estimation" (NeurIPS),
      DRIVE with the unbiased scale and the randomized Hadamard transform; the
      authors' code (amitport/DRIVE-One-bit-Distributed-Mean-Estimation) uses the same.
    """
    if rotation not in ("hadamard", "uniform"):
        raise ValueError(f"rotation must be 'hadamard' or 'uniform', got {rotation!r}")

    def roundtrip(x, key, d):
        return drive_decode(drive_encode(x, key, rotation), key, d, rotation)

    dim = padded_dim if rotation == "hadamard" else (lambda d: d)
    return _stateless("drive", roundtrip, lambda d: dim(d) + FLOAT_BITS, inner, chunk_size)


def top_k_count(d: int, fraction: float = 0.01, k: int | None = None) -> int:
    """Coordinates sent: `k` if given, else `round(fraction d)`, clipped to `[1, d]`."""
    if k is None:
        k = int(round(fraction * d))
    return max(1, min(d, int(k)))


def top_k(fraction: float = 0.01, k: int | None = None, error_feedback: bool = True,
          inner: Aggregator | str | None = None, chunk_size: int | None = None) -> Aggregator:
    """Top-k sparsification of each client's delta, with error feedback, then the mean.

    Client i sends the k largest-magnitude coordinates (index and value) of
    `v_i = x_i + e_i`; the server decodes them into a d-vector `top_k(v_i)` (zeros
    elsewhere). With error feedback client i keeps the unsent mass,
    `e_i <- v_i - top_k(v_i)`, and adds it to its next delta (Stich et al.'s memory);
    e_i starts at 0 and is updated only in the rounds client i takes part in. Without
    it, `e_i = 0` always and the aggregator is stateless.

    Args:
      fraction: share of the d coordinates to send, `k = round(fraction d)` clipped to
        `[1, d]`; ignored if `k` is given.
      k: coordinates to send per client (clipped to d).
      error_feedback: keep a residual per client in a `client_state.ClientStore`. The
        algorithm must then pass the cohort's `ClientSlots` as `clients` (the round
        skeleton does: the state then holds a `ClientIndex`).
      inner: how the decoded deltas are combined (an `Aggregator` or a registered
        name); `mean()` by default.
      chunk_size: clients encoded together under `vmap`; None: all.

    Returns:
      An `Aggregator` with state `TopKState` (error feedback) or `CompressionState`.
      Metrics: `aggregate/bits_per_client = k (ceil(log2 d) + 32)`,
      `aggregate/bits_per_round`, `aggregate/compression_ratio`.

    Example:
      >>> agg = top_k(fraction=0.01)
      >>> state = agg.init(params)                   # holds an empty residual store
      >>> alg = fedavg(optax.sgd(0.1), aggregator=agg)     # the skeleton passes the slots
      >>> state, metrics = jit_round(alg, model)(alg.init(params), cohort, key)

    References:
      Stich et al. 2018, "Sparsified SGD with Memory" (NeurIPS), Algorithm 1.
      Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and other Gradient
      Compression Schemes" (ICML), Algorithm 2.
    """
    if k is None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if k is not None and k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    inner = _resolve_inner(inner)
    _check_chunk(chunk_size)

    def count(d):
        return top_k_count(d, fraction, k)

    def message_bits(d):
        return count(d) * (index_bits(d) + FLOAT_BITS)

    if not error_feedback:
        def roundtrip(x, key, d):
            del key
            return densify(top_k_sparsify(x, count(d)), d)
        return _stateless("top_k", roundtrip, message_bits, inner, chunk_size,
                          randomised=False)

    def init(params):
        flat, _ = ravel_pytree(params)
        return TopKState(client_state.empty_store(jnp.zeros_like(flat)), inner.init(params))

    def apply(deltas, weights, state, key=None, clients=None):
        if clients is None:
            raise ValueError(
                "top_k(error_feedback=True) keeps a residual per client: the algorithm "
                "must pass the cohort's slots (ClientSlots) as the aggregator's `clients` argument "
                "(every algorithm built on the round skeleton does)")
        d, unravel = _flat_shape(deltas)
        n = _num_clients(weights)
        residual_dtype = state.residuals.rows.dtype
        residuals = client_state.gather(state.residuals, clients,
                                        jnp.zeros((d,), residual_dtype))

        def one_client(c):
            delta, residual = c
            x, _ = ravel_pytree(delta)
            v = x.astype(residual_dtype) + residual
            sent = densify(top_k_sparsify(v, count(d)), d)
            return unravel(sent.astype(x.dtype)), v - sent

        decoded, new_residuals = parallel.map_clients(
            one_client, (deltas, residuals), _plan(chunk_size, n))
        store = client_state.scatter(state.residuals, clients, new_residuals,
                                     keep=jnp.asarray(weights) > 0)
        inner_key = None if key is None else jax.random.fold_in(key, INNER_KEY)
        aggregate, inner_state, metrics = inner.apply(
            decoded, weights, state.inner, inner_key, clients)
        return aggregate, TopKState(store, inner_state), {
            **metrics, **_bit_metrics(message_bits(d), d, weights)}

    return Aggregator(init, apply, bits_per_client=message_bits)


# ----------------------------------------------------------------------------- registry


suresh = "Suresh et al. 2017, Distributed Mean Estimation with Limited Communication (ICML)"
ENTRIES = [
    AggregatorEntry(
        "quantize", "stochastic uniform quantization of each client's delta, then an "
        "inner aggregator",
        lambda bits=8, inner="mean", chunk_size=None:
            stochastic_quantization(bits, inner, chunk_size),
        suresh),
    AggregatorEntry(
        "rotated_quantize", "stochastic quantization after a random Hadamard rotation",
        lambda bits=8, inner="mean", chunk_size=None:
            rotated_quantization(bits, inner, chunk_size),
        suresh),
    AggregatorEntry(
        "top_k", "top-k sparsification with per-client error feedback",
        lambda fraction=0.01, k=None, error_feedback=True, inner="mean", chunk_size=None:
            top_k(fraction, k, error_feedback, inner, chunk_size),
        "Stich et al. 2018, Sparsified SGD with Memory (NeurIPS); Karimireddy et al. "
        "2019, Error Feedback Fixes SignSGD (ICML)"),
    AggregatorEntry(
        "drive", "DRIVE: 1 bit per coordinate after a random Hadamard rotation and one "
        "unbiased scale",
        lambda rotation="hadamard", inner="mean", chunk_size=None:
            drive(rotation, inner, chunk_size),
        "Vargaftik et al. 2021, DRIVE: One-bit Distributed Mean Estimation (NeurIPS)"),
]
