"""Simulated secure aggregation (Bonawitz et al. 2017): the server learns only a sum.

Round t, cohort of m real clients (weight > 0; padding clients never take part), each
with a flattened delta x_i of d coordinates, b-bit arithmetic (everything mod 2^b):

    clip:    x_i <- x_i min(1, C / ||x_i||_2)                  so every |x_i[k]| <= C
    encode:  q = floor((2^(b-1) - 1) / m),  s = q / C           the fixed-point scale
             u_i = round_stochastic(s x_i) mod 2^b              in [-q, q] before the mod
    mask:    y_i = u_i + PRG(b_i) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)
    drop:    the clients D (exactly round(f m) of them) drop after masking; the others,
             U, send y_i
    unmask:  z = sum_{i in U} y_i - sum_{i in U} PRG(b_i)
                 - sum_{i in U, j in D} sign(j - i) PRG(s_ij)  =  sum_{i in U} u_i
    decode:  Delta = signed_b(z) / (s |U|)                      the unweighted mean

with `signed_b` the two's-complement reading of a b-bit word. `|u_i[k]| <= q` and
`m q <= 2^(b-1) - 1`, so the sum of up to m encoded clients never wraps: the decode is
exact up to the stochastic rounding, `|Delta[k] - mean_{i in U} x_i[k]| < 1 / s`, and
unbiased, `E[Delta] = mean_{i in U} x_i` (up to the float32 rounding of `s x_i`, a
relative 2^-24, which dominates at b = 32 where `s x_i` exceeds 2^24).

What is simulated, and how:
- Key agreement. In the protocol client i and j agree on `s_ij` by Diffie-Hellman over
  advertised public keys; here `s_ij = fold_in(fold_in(fold_in(key, PAIR_KEY), min(i,
  j)), max(i, j))`, a key both ends (and, in a simulation, the server) can compute.
  Client i's self-mask seed is `b_i = fold_in(fold_in(key, SELF_MASK_KEY), i)`; its
  stochastic-rounding key is `fold_in(key, i)`; which clients drop comes from
  `fold_in(key, DROPOUT_KEY)`. i, j are cohort slots; `key` is the aggregator's key.
- PRG. `PRG(seed) = jax.random.bits(seed, (d,), uint32)` (threefry), reduced mod 2^b.
- Secret sharing and recovery. In the protocol every client t-of-n shares `b_i` and its
  key-agreement secret; after the drop the survivors send the server shares of `b_i`
  for survivors and of the secret keys of dropped clients, from which the server
  rebuilds `PRG(b_i)` and the `s_ij` with j dropped. Here the server computes those
  seeds directly (the result is identical whenever at least t clients survive); the
  threshold t, the share messages and the consistency round are not simulated. A round
  in which every real client drops aggregates to zeros (the protocol would abort).
- Double masking. The self mask `PRG(b_i)` is what makes recovery safe: a client whose
  `y_i` arrives late, after its pairwise seeds were revealed, is still hidden by
  `PRG(b_i)`, and the server never learns both `b_i` and the secret key of one client.
  `self_masks=False` gives single masking, the paper's intermediate sketch, which a
  late-arriving `y_i` breaks.

Arithmetic is uint32, which wraps mod 2^32; for b < 32 words are reduced with
`& (2^b - 1)`, consistent because 2^b divides 2^32. The scale uses the round's number m
of real clients (known to all after the key-advertising round), so no choice of m
overflows; rounds with fewer real clients get a finer scale.

Cost: every client expands one PRG per other slot, so a round computes O(n^2 d) PRG
words for n cohort slots (each pair's words twice, once at each end; the server's
recovery words come from the same pass), at O(chunk d) memory (clients are vmapped in
chunks by `parallel.map_clients`, partners run in a `fori_loop`). Fine for simulation,
and every shape stays fixed: padding slots are masked out, not skipped.
"""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_core import keys, parallel, tree
from fedjax_core.aggregate.base import Aggregator, AggregatorEntry, real_clients
from fedjax_core.typing import Array, ArrayLike, Float, PRNGKey, PyTree

PAIR_KEY = keys.SECURE_PAIR
"""`fold_in(key, PAIR_KEY)` is the root of the pairwise seeds `s_ij`."""

SELF_MASK_KEY = keys.SECURE_SELF_MASK
"""`fold_in(key, SELF_MASK_KEY)` is the root of the self-mask seeds `b_i`."""

DROPOUT_KEY = keys.SECURE_DROPOUT
"""`fold_in(key, DROPOUT_KEY)` decides which clients drop."""


# ----------------------------------------------------------------------------- fixed point

def _word_mask(bits: int) -> np.uint32:
    return np.uint32((1 << bits) - 1)


def _check_bits(bits: int) -> int:
    if int(bits) != bits or not 2 <= bits <= 32:
        raise ValueError(f"bits must be an integer in [2, 32] (uint32 words), got {bits}")
    return int(bits)


def fixed_point_scale(clip_norm: float, bits: int,
                      num_clients: ArrayLike) -> tuple[Array, Array]:
    """The scale s and the per-coordinate bound q such that m encoded clients never wrap.

    `q = floor((2^(b-1) - 1) / m)` and `s = q / C`: a clipped coordinate `|x| <= C`
    encodes to an integer in `[-q, q]`, and a sum of m of them stays within the signed
    b-bit range `[-(2^(b-1) - 1), 2^(b-1) - 1]`.

    Args:
      clip_norm: C > 0.
      bits: b in [2, 32].
      num_clients: m, the number of clients that may be summed (may be traced; values
        below 1 count as 1).

    Returns:
      `(scale, bound)`, float32 scalars; `bound` is q rounded down to a float32 (exact
      for q < 2^24).

    Example:
      >>> fixed_point_scale(1.0, 16, 5)        # q = floor(32767 / 5) = 6553
      (Array(6553., dtype=float32), Array(6553., dtype=float32))
    """
    bits = _check_bits(bits)
    m = jnp.maximum(jnp.asarray(num_clients, jnp.int32), 1)
    q = jnp.int32((1 << (bits - 1)) - 1) // m
    q_float = q.astype(jnp.float32)
    # int32 -> float32 rounds to nearest: step back one ulp where that rounded up.
    q_float = jnp.where(q >= 2**24, jnp.nextafter(q_float, jnp.float32(0)), q_float)
    return q_float / jnp.float32(clip_norm), q_float


def encode(x: Float[Array, " d"], scale: ArrayLike, bound: ArrayLike, bits: int,
           key: PRNGKey) -> Array:
    """Fixed-point encoding `round_stochastic(s x) mod 2^b`, as uint32 words.

    `s x` is clipped to `[-bound, bound]` (a no-op for clipped inputs, up to float
    rounding), then rounded up with probability equal to its fractional part, so
    `E[to_signed(encode(x))] = s x`, and reduced mod 2^b in two's complement.

    Args:
      x: `Float[Array, "d"]`.
      scale: s from `fixed_point_scale`.
      bound: q from `fixed_point_scale` (`< 2^31`).
      bits: b in [2, 32].
      key: the client's rounding key.

    Returns:
      `UInt32[Array, "d"]`, each word in `[0, 2^b)`.

    Example:
      >>> encode(jnp.array([0.5, -0.25]), 4.0, 4.0, 8, key)   # 2 and -1 exactly
      Array([  2, 255], dtype=uint32)
    """
    bits = _check_bits(bits)
    bound = jnp.asarray(bound)
    v = jnp.clip(jnp.asarray(x, jnp.float32) * scale, -bound, bound)
    lo = jnp.floor(v)
    up = jax.random.uniform(key, v.shape, jnp.float32) < v - lo
    ints = (lo + up.astype(jnp.float32)).astype(jnp.int32)
    return jax.lax.bitcast_convert_type(ints, jnp.uint32) & _word_mask(bits)


def to_signed(z: ArrayLike, bits: int) -> Array:
    """The two's-complement value of b-bit words: `z` if `z < 2^(b-1)`, else `z - 2^b`.

    Args:
      z: uint32 words in `[0, 2^b)`, any shape.
      bits: b in [2, 32].

    Returns:
      int32 values in `[-2^(b-1), 2^(b-1))`, same shape.

    Example:
      >>> to_signed(jnp.array([1, 127, 128, 255], jnp.uint32), 8)
      Array([   1,  127, -128,   -1], dtype=int32)
    """
    bits = _check_bits(bits)
    shift = np.uint32(32 - bits)
    shifted = jnp.left_shift(jnp.asarray(z, jnp.uint32) & _word_mask(bits), shift)
    return jnp.right_shift(jax.lax.bitcast_convert_type(shifted, jnp.int32),
                           np.int32(32 - bits))


def decode(z: ArrayLike, scale: ArrayLike, bits: int) -> Array:
    """`to_signed(z) / s`: b-bit words back to floats (divide a sum by the count after)."""
    return to_signed(z, bits).astype(jnp.float32) / scale


def modular_sum(words: ArrayLike, include: ArrayLike, bits: int) -> Array:
    """`sum_{i: include_i} words_i mod 2^b` over the leading (clients) axis.

    Args:
      words: `UInt32[Array, "clients d"]`.
      include: `Bool[Array, "clients"]`.
      bits: b in [2, 32].

    Returns:
      `UInt32[Array, "d"]` in `[0, 2^b)`.
    """
    words = jnp.asarray(words, jnp.uint32)
    kept = jnp.where(jnp.asarray(include)[:, None], words, jnp.uint32(0))
    return jnp.sum(kept, axis=0, dtype=jnp.uint32) & _word_mask(bits)


# ----------------------------------------------------------------------------- masks

def pair_seed(key: PRNGKey, i: ArrayLike, j: ArrayLike) -> PRNGKey:
    """`s_ij = s_ji`, the seed clients i and j agree on (simulated key agreement)."""
    root = jax.random.fold_in(key, PAIR_KEY)
    return jax.random.fold_in(jax.random.fold_in(root, jnp.minimum(i, j)), jnp.maximum(i, j))


def self_mask_seed(key: PRNGKey, i: ArrayLike) -> PRNGKey:
    """`b_i`, client i's self-mask seed (double masking)."""
    return jax.random.fold_in(jax.random.fold_in(key, SELF_MASK_KEY), i)


def prg(seed: PRNGKey, d: int) -> Array:
    """`PRG(seed)`: d uniform uint32 words."""
    return jax.random.bits(seed, (d,), jnp.uint32)


def _pads(key, i, real, dropped, d, self_mask):
    """Client i's pad and the part of it the server must remove if i survives:
    `pad = [PRG(b_i)] + sum_{j real, j != i} sign(j - i) PRG(s_ij)` and
    `recovery = [PRG(b_i)] + sum_{j dropped} sign(j - i) PRG(s_ij)`, mod 2^32, from one
    PRG expansion per pair (the server regenerates the same words from the revealed
    seeds; computing both in one pass only saves time)."""
    num_slots = real.shape[0]
    start = prg(self_mask_seed(key, i), d) if self_mask else jnp.zeros((d,), jnp.uint32)

    def body(j, acc):
        pad, recovery = acc
        g = prg(pair_seed(key, i, j), d)
        term = jnp.where(j > i, g, jnp.uint32(0) - g)
        zero = jnp.uint32(0)
        other = j != i
        return (pad + jnp.where(real[j] & other, term, zero),
                recovery + jnp.where(dropped[j] & other, term, zero))

    return jax.lax.fori_loop(0, num_slots, body, (start, start))


def _plan(chunk_size, num_slots):
    return parallel.Plan(chunk_size or max(1, num_slots))


def _all_pads(key, real, dropped, d, self_masks, chunk_size):
    """`_pads` of every slot: `(pads, recoveries)`, each `UInt32[Array, "clients d"]`."""
    num_slots = real.shape[0]
    return parallel.map_clients(
        lambda i: _pads(key, i, real, dropped, d, self_masks),
        jnp.arange(num_slots, dtype=jnp.int32), _plan(chunk_size, num_slots))


def _mask(encoded, pads, real, bits):
    return jnp.where(real[:, None], (encoded + pads) & _word_mask(bits), jnp.uint32(0))


def _unmask(masked, recoveries, survivors, bits):
    removed = jnp.where(survivors[:, None], recoveries, jnp.uint32(0))
    total = modular_sum(masked, survivors, 32) - jnp.sum(removed, axis=0, dtype=jnp.uint32)
    return total & _word_mask(bits)


def masked_vectors(encoded: ArrayLike, real: ArrayLike, key: PRNGKey, bits: int,
                   self_masks: bool = True, chunk_size: int | None = None) -> Array:
    """What each client sends: `y_i = u_i + PRG(b_i) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij)`.

    Sums run over the other real clients j (all of them: clients drop only after
    masking). Every word is mod 2^b. Padding slots send nothing (zeros here).

    Args:
      encoded: `UInt32[Array, "clients d"]`, the clients' `encode`d deltas u_i.
      real: `Bool[Array, "clients"]`, False for padding slots.
      key: the aggregator's key (all seeds derive from it).
      bits: b in [2, 32].
      self_masks: add the self mask `PRG(b_i)` (double masking).
      chunk_size: clients masked together under `vmap`; None: all.

    Returns:
      `UInt32[Array, "clients d"]` in `[0, 2^b)`. Over all real clients the pairwise
      masks cancel: `modular_sum(y, real) == modular_sum(u, real)` when
      `self_masks=False`, and after removing `sum_i PRG(b_i)` otherwise (`unmask_sum`).

    Example:
      >>> y = masked_vectors(u, weights > 0, key, bits=16)
    """
    bits = _check_bits(bits)
    encoded = jnp.asarray(encoded, jnp.uint32)
    real = jnp.asarray(real, bool)
    pads, _ = _all_pads(key, real, jnp.zeros_like(real), encoded.shape[1], self_masks,
                        chunk_size)
    return _mask(encoded, pads, real, bits)


def unmask_sum(masked: ArrayLike, survivors: ArrayLike, dropped: ArrayLike, key: PRNGKey,
               bits: int, self_masks: bool = True, chunk_size: int | None = None) -> Array:
    """The server's result: `sum_{i in U} y_i` minus the masks that do not cancel.

    `z = sum_{i in U} y_i - sum_{i in U} [PRG(b_i) + sum_{j in D} sign(j - i) PRG(s_ij)]`
    mod 2^b, which equals `sum_{i in U} u_i` mod 2^b exactly: the pairwise masks between
    two survivors cancel, those between a survivor and a dropped client are removed
    with the dropped client's recovered seeds, and the survivors' self masks with their
    revealed `b_i`. The rows of dropped clients are never read (they never arrived).

    Args:
      masked: `UInt32[Array, "clients d"]` from `masked_vectors`.
      survivors: `Bool[Array, "clients"]`, U: real clients whose `y_i` arrived.
      dropped: `Bool[Array, "clients"]`, D: real clients that dropped after masking.
      key, bits, self_masks, chunk_size: as given to `masked_vectors`.

    Returns:
      `UInt32[Array, "d"]` in `[0, 2^b)`.

    Example:
      >>> total = unmask_sum(y, real & ~dropped, dropped, key, bits=16)
      >>> mean = decode(total, scale, 16) / jnp.sum(real & ~dropped)
    """
    bits = _check_bits(bits)
    masked = jnp.asarray(masked, jnp.uint32)
    survivors = jnp.asarray(survivors, bool)
    dropped = jnp.asarray(dropped, bool)
    _, recoveries = _all_pads(key, survivors | dropped, dropped, masked.shape[1], self_masks,
                              chunk_size)
    return _unmask(masked, recoveries, survivors, bits)


def _half_up_table(fraction: float, num_slots: int) -> Array:
    """`table[m] = round(fraction m)` (halves up, on the exact decimal of `fraction`)."""
    r = Fraction(repr(float(fraction)))
    return jnp.asarray(np.asarray([int(r * m + Fraction(1, 2)) for m in range(num_slots + 1)],
                                  np.int32))


def select_dropouts(key: PRNGKey, real: ArrayLike, fraction: float) -> Array:
    """The clients that drop after masking: exactly `round(fraction m)` of the m real ones.

    `round` takes halves up, on the exact decimal value of `fraction` (0.1 * 5 -> 1).
    Which clients drop is a uniformly random subset from `fold_in(key, DROPOUT_KEY)`;
    padding slots never do.

    Args:
      key: the aggregator's key.
      real: `Bool[Array, "clients"]`.
      fraction: f in [0, 1).

    Returns:
      `Bool[Array, "clients"]`.
    """
    real = jnp.asarray(real, bool)
    num_slots = real.shape[0]
    m = jnp.sum(real.astype(jnp.int32))
    count = _half_up_table(fraction, num_slots)[m]
    slots = jnp.arange(num_slots, dtype=jnp.int32)
    order = jax.random.permutation(jax.random.fold_in(key, DROPOUT_KEY), num_slots)
    priority = jnp.where(real, order, num_slots + slots)    # padding after every real
    rank = jnp.zeros(num_slots, jnp.int32).at[jnp.argsort(priority)].set(slots)
    return real & (rank < count)


# ----------------------------------------------------------------------------- aggregator

def _flatten(deltas: PyTree):
    """`([clients, d] float32, unflatten)`: leaves in `jax.tree.leaves` order (as
    `ravel_pytree`); `unflatten(v [d])` restores one client's tree and dtypes."""
    leaves, treedef = jax.tree.flatten(deltas)
    n = leaves[0].shape[0]
    flat = jnp.concatenate([x.reshape(n, -1).astype(jnp.float32) for x in leaves], axis=1)
    sizes = [int(np.prod(x.shape[1:], dtype=np.int64)) for x in leaves]
    splits = np.cumsum(sizes)[:-1]

    def unflatten(v):
        parts = jnp.split(v, splits)
        return jax.tree.unflatten(treedef, [p.reshape(x.shape[1:]).astype(x.dtype)
                                            for p, x in zip(parts, leaves)])

    return flat, unflatten


def secure_sum(clip_norm: float = 1.0, bits: int = 32, dropout_fraction: float = 0.0,
               self_masks: bool = True, chunk_size: int | None = None) -> Aggregator:
    """Secure aggregation of clipped, fixed-point deltas: the server sees only their sum.

    Update rule: with U the surviving real clients,
    `Delta = signed_b(sum_{i in U} y_i - recovered masks) / (s |U|)`
    `      = mean_{i in U} clip_C(Delta_i) + (stochastic rounding error, < 1/s per coordinate)`
    with `s = floor((2^(b-1) - 1) / m) / C` for m real clients (module docstring for the
    masking and recovery). The mean is unweighted: a weighted sum `sum n_i x_i` would
    need the bound `(sum n_i) C` in place of `m C`, costing a factor of the mean number
    of examples in precision, and clipped DP-style updates are usually averaged
    uniformly; the example counts only mark padding (weight 0).

    Args:
      clip_norm: C > 0, each client's L2 clipping norm (over all leaves).
      bits: b, bits per transmitted coordinate, 2 to 32 (uint32 words mod 2^b).
      dropout_fraction: f in [0, 1); exactly `round(f m)` random real clients drop
        after masking, every round (to exercise the recovery).
      self_masks: double masking (`PRG(b_i)`), as in the paper's full protocol.
      chunk_size: clients processed together under `vmap`; None: all.

    Returns:
      A stateless `Aggregator`. Metrics:
      `aggregate/bits_per_client = b d` (the masked vector only; the protocol's key
      advertisements, encrypted shares and unmasking shares, which depend on the
      key-agreement group and the secret-sharing field, are not counted),
      `aggregate/bits_per_round` (`b d |U|`), `aggregate/num_clients` (|U|),
      `aggregate/num_dropped` (|D|), `aggregate/quantization_error` (L2 norm of `Delta`
      minus the float mean of the same clipped surviving deltas).

    Example:
      >>> agg = secure_sum(clip_norm=0.1, bits=16, dropout_fraction=0.1)
      >>> delta, _, metrics = agg.apply(deltas, weights, agg.init(params), key, None)
      >>> alg = fedavg(optax.sgd(0.1), optax.sgd(1.0), aggregator=agg)

    References:
      Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth 2017,
      "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS):
      pairwise one-time-pad masks, double masking, dropout recovery from t-of-n shares.
    """
    if not clip_norm > 0:
        raise ValueError(f"secure_sum needs clip_norm > 0, got {clip_norm}")
    bits = _check_bits(bits)
    if not 0.0 <= dropout_fraction < 1.0:
        raise ValueError(f"secure_sum needs 0 <= dropout_fraction < 1, got {dropout_fraction}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be None or at least 1, got {chunk_size}")

    def init(params):
        del params
        return optax.EmptyState()

    def apply(deltas, weights, state, key=None, clients=None):
        del clients
        if key is None:
            raise ValueError("the secure_sum aggregator is randomised: pass a PRNG key")
        num_slots = jnp.shape(weights)[0]
        if (1 << (bits - 1)) - 1 < num_slots:
            raise ValueError(
                f"secure_sum(bits={bits}) cannot sum {num_slots} clients without overflow "
                f"(needs 2^(bits-1) - 1 >= clients): raise bits")
        x, unflatten = _flatten(deltas)
        d = x.shape[1]
        real, m = real_clients(weights)

        norms = jnp.sqrt(jnp.sum(jnp.square(x), axis=1))
        x = x * tree.clip_factor(norms, clip_norm)[:, None]
        x = jnp.where(real[:, None], x, 0.0)
        scale, bound = fixed_point_scale(clip_norm, bits, m)

        slots = jnp.arange(num_slots, dtype=jnp.int32)
        encoded = parallel.map_clients(
            lambda c: encode(c[0], scale, bound, bits, jax.random.fold_in(key, c[1])),
            (x, slots), _plan(chunk_size, num_slots))
        encoded = jnp.where(real[:, None], encoded, jnp.uint32(0))

        dropped = select_dropouts(key, real, dropout_fraction)
        survivors = real & ~dropped
        num_survivors = jnp.sum(survivors.astype(jnp.int32))
        pads, recoveries = _all_pads(key, real, dropped, d, self_masks, chunk_size)
        masked = _mask(encoded, pads, real, bits)                  # what survivors send
        total = _unmask(masked, recoveries, survivors, bits)       # = sum_U u_i mod 2^b

        count = jnp.maximum(num_survivors, 1).astype(jnp.float32)
        mean = jnp.where(num_survivors > 0, decode(total, scale, bits) / count, 0.0)
        plain = jnp.sum(jnp.where(survivors[:, None], x, 0.0), axis=0) / count
        bits_per_client = jnp.float32(bits * d)
        return unflatten(mean), state, {
            "aggregate/bits_per_client": bits_per_client,
            "aggregate/bits_per_round": bits_per_client * num_survivors.astype(jnp.float32),
            "aggregate/num_clients": num_survivors.astype(jnp.float32),
            "aggregate/num_dropped": jnp.sum(dropped.astype(jnp.float32)),
            "aggregate/quantization_error": jnp.sqrt(jnp.sum(jnp.square(mean - plain))),
        }

    return Aggregator(init, apply)


# ----------------------------------------------------------------------------- registry

ENTRIES = [
    AggregatorEntry(
        "secure_sum", "simulated secure aggregation: clipped fixed-point deltas under "
        "pairwise and self masks, with dropout recovery; unweighted mean of the survivors",
        lambda clip_norm=1.0, bits=32, dropout_fraction=0.0, self_masks=True, chunk_size=None:
            secure_sum(clip_norm, bits, dropout_fraction, self_masks, chunk_size),
        "Bonawitz et al. 2017, Practical Secure Aggregation for Privacy-Preserving "
        "Machine Learning (CCS)"),
]
