"""Secure aggregation: exact mask cancellation and dropout recovery on integers, the
fixed-point codec and its error bound, padding, b = 16 and 32, and a FedAvg round."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core.aggregate import registry, secure
from fedjax_core.aggregate.secure import (
    decode,
    encode,
    fixed_point_scale,
    masked_vectors,
    modular_sum,
    pair_seed,
    prg,
    secure_sum,
    select_dropouts,
    self_mask_seed,
    to_signed,
    unmask_sum,
)
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.data import pack_cohort
from fedjax_core.keys import AGGREGATOR as AGGREGATOR_KEY
from tests.fedjax_core.helpers import (
    plain_local_train,
    tiny_softmax_model,
    unequal_clients,
)

KEY = jax.random.key(0)
GARBAGE = 1e6  # values of padding clients: any leak shows
DRAWS = 2000
CLIP = 1.5

MASK = jax.jit(masked_vectors, static_argnums=(3, 4, 5))
UNMASK = jax.jit(unmask_sum, static_argnums=(4, 5, 6))


@functools.cache
def shared_agg(bits=16, dropout=0.4, chunk_size=None):
    """One aggregator object per configuration, so that jit compiles each once."""
    return secure_sum(clip_norm=CLIP, bits=bits, dropout_fraction=dropout,
                      chunk_size=chunk_size)


def random_words(shape, bits, seed=0):
    return np.random.default_rng(seed).integers(0, 2**bits, size=shape, dtype=np.uint64)


def np_modsum(words, include, bits):
    """Exact reference: Python-width integers, then mod 2^b."""
    return (np.asarray(words, np.uint64)[np.asarray(include)].sum(axis=0) % (1 << bits)
            ).astype(np.uint64)


def cohort_deltas(seed=0, slots=6, padding=(2,)):
    """{"w": [slots, 3, 2], "b": [slots, 2]} with norms around 1-4; padding slots hold
    GARBAGE and weight 0."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(slots, 3, 2)).astype(np.float32)
    b = rng.normal(size=(slots, 2)).astype(np.float32)
    weights = rng.integers(1, 9, size=slots).astype(np.float32)
    for p in padding:
        w[p], b[p], weights[p] = GARBAGE, -GARBAGE, 0.0
    return {"w": jnp.asarray(w), "b": jnp.asarray(b)}, weights


def flat_stack(deltas):
    n = deltas["b"].shape[0]
    return np.concatenate([np.asarray(deltas["b"]).reshape(n, -1),
                           np.asarray(deltas["w"]).reshape(n, -1)], axis=1)  # leaves order


def flat(tree):
    return np.concatenate([np.asarray(tree["b"]).reshape(-1), np.asarray(tree["w"]).reshape(-1)])


def clipped_mean(x, include, clip_norm):
    x = x[np.asarray(include)].astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))).mean(axis=0)


def run(agg, deltas, weights, key=KEY, jit=True):
    apply = jax.jit(agg.apply) if jit else agg.apply
    out, _, metrics = apply(deltas, jnp.asarray(weights, jnp.float32), agg.init(None), key, None)
    return jax.tree.map(np.asarray, out), {k: float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- fixed point

def test_fixed_point_scale_hand_values():
    scale, bound = fixed_point_scale(1.0, 16, 5)
    assert float(bound) == 6553 and float(scale) == 6553         # floor(32767 / 5)
    scale, bound = fixed_point_scale(0.5, 8, 4)
    assert float(bound) == 31 and float(scale) == 62             # floor(127 / 4) / 0.5
    _, bound = fixed_point_scale(1.0, 16, 0)                      # no client counts as one
    assert float(bound) == 32767
    # b = 32: q = 2^31 - 1 is no float32; the bound is rounded down, never up.
    _, bound = fixed_point_scale(1.0, 32, 1)
    assert float(bound) < 2**31 and float(bound) >= 2**31 - 256
    _, bound = fixed_point_scale(1.0, 32, 3)                       # q = 715827882
    assert 715827882 - 64 <= float(bound) <= 715827882


def test_encode_decode_hand_values():
    x = jnp.array([0.5, -0.25, 0.0, 1.0, -1.0])
    np.testing.assert_array_equal(encode(x, 4.0, 4.0, 8, KEY), [2, 255, 0, 4, 252])
    np.testing.assert_array_equal(encode(x, 4.0, 4.0, 32, KEY),
                                  [2, 2**32 - 1, 0, 4, 2**32 - 4])
    np.testing.assert_array_equal(decode(encode(x, 4.0, 4.0, 8, KEY), 4.0, 8), x)
    # out-of-range inputs saturate at +-bound instead of wrapping
    np.testing.assert_array_equal(encode(jnp.array([9.0, -9.0]), 4.0, 4.0, 8, KEY), [4, 252])
    np.testing.assert_array_equal(to_signed(jnp.array([1, 127, 128, 255], jnp.uint32), 8),
                                  [1, 127, -128, -1])
    np.testing.assert_array_equal(
        to_signed(jnp.array([5, 2**31 - 1, 2**31, 2**32 - 1], jnp.uint32), 32),
        [5, 2**31 - 1, -(2**31), -1])
    np.testing.assert_array_equal(to_signed(jnp.array([2**15, 2**16 - 2], jnp.uint32), 16),
                                  [-(2**15), -2])


def test_stochastic_rounding_is_unbiased_and_within_one_step():
    x = jnp.array([0.3, -0.7, 0.55, 0.05, -0.999])
    scale, bound = 10.0, 10.0                                     # s x = 3, -7, 5.5, .5, -9.99
    dec = jax.jit(jax.vmap(lambda k: decode(encode(x, scale, bound, 16, k), scale, 16)))(
        jax.random.split(jax.random.key(3), DRAWS))
    dec = np.asarray(dec, np.float64)
    assert np.all(np.abs(dec - np.asarray(x)) < 1 / scale + 1e-6)
    # Bernoulli rounding: std <= 0.5 / s per draw; 6 sigma over DRAWS draws.
    np.testing.assert_allclose(dec.mean(0), x, atol=6 * 0.5 / scale / np.sqrt(DRAWS))
    # and it is random: 0.55 rounds both ways
    assert 0.3 < np.mean(dec[:, 2] > 0.55) < 0.7


# ----------------------------------------------------------------------------- masking

@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize("self_masks", [False, True])
def test_masks_cancel_exactly_and_dropouts_are_recovered_exactly(bits, self_masks):
    slots, d = 7, 300
    real = np.array([1, 1, 0, 1, 1, 0, 1], bool)                 # two padding slots
    u = random_words((slots, d), bits)
    y = MASK(jnp.asarray(u, jnp.uint32), jnp.asarray(real), KEY, bits, self_masks, None)
    y64 = np.asarray(y, np.uint64)
    assert y64.max() < 2**bits
    np.testing.assert_array_equal(y64[~real], 0)                 # padding sends nothing

    # everybody survives: the pairwise masks cancel in the plain modular sum
    total = np_modsum(y64, real, bits)
    if self_masks:   # the self masks remain until the server removes the revealed PRG(b_i)
        selfm = np.stack([np.asarray(prg(self_mask_seed(KEY, i), d), np.uint64)
                          for i in range(slots)])
        total = (total + (1 << bits) - np_modsum(selfm, real, bits)) % (1 << bits)
    np.testing.assert_array_equal(total, np_modsum(u, real, bits))
    nobody = jnp.zeros(slots, bool)
    np.testing.assert_array_equal(UNMASK(y, jnp.asarray(real), nobody, KEY, bits, self_masks,
                                         None), np_modsum(u, real, bits))

    # clients 1 and 4 drop after masking: their y never arrive, masks no longer cancel
    dropped = np.array([0, 1, 0, 0, 1, 0, 0], bool)
    survivors = real & ~dropped
    naive = np_modsum(y64, survivors, bits)
    assert np.mean(naive == np_modsum(u, survivors, bits)) < 0.01
    recovered = UNMASK(y, jnp.asarray(survivors), jnp.asarray(dropped), KEY, bits,
                       self_masks, 2)
    np.testing.assert_array_equal(recovered, np_modsum(u, survivors, bits))
    # whatever sits in a dropped client's row (its y never arrived) changes nothing
    y_late = y.at[1].set(jnp.uint32(12345))
    np.testing.assert_array_equal(
        UNMASK(y_late, jnp.asarray(survivors), jnp.asarray(dropped), KEY, bits, self_masks,
               2), recovered)


@pytest.mark.parametrize("bits", [16, 32])
def test_masked_vectors_follow_the_formula_and_hide_the_input(bits):
    d, mod = 500, 1 << bits
    u = random_words((3, d), bits, seed=1)
    real = jnp.ones(3, bool)
    g = {(i, j): np.asarray(prg(pair_seed(KEY, i, j), d), np.uint64) for i in range(3)
         for j in range(3) if i < j}
    b = [np.asarray(prg(self_mask_seed(KEY, i), d), np.uint64) for i in range(3)]
    np.testing.assert_array_equal(np.asarray(prg(pair_seed(KEY, 2, 0), d)), g[0, 2])  # s_ij = s_ji
    y = np.asarray(masked_vectors(jnp.asarray(u, jnp.uint32), real, KEY, bits), np.uint64)
    # y_i = u_i + PRG(b_i) + sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)   (mod 2^b)
    expected = [(u[0] + b[0] + g[0, 1] + g[0, 2]) % mod,
                (u[1] + b[1] + g[1, 2] + 2 * mod - g[0, 1] % mod) % mod,
                (u[2] + b[2] + 2 * mod - g[0, 2] % mod - g[1, 2] % mod) % mod]
    np.testing.assert_array_equal(y, np.stack(expected))
    # alone, a masked vector shares (almost) no coordinate with its input and looks uniform
    assert np.mean(y == u) < 0.01
    for row in y.astype(np.float64) / mod:
        assert abs(row.mean() - 0.5) < 5 * np.sqrt(1 / 12 / d)
    # without self masks, two clients' pads are exact negatives
    y2 = np.asarray(masked_vectors(jnp.asarray(u[:2], jnp.uint32), jnp.ones(2, bool), KEY,
                                   bits, self_masks=False), np.uint64)
    np.testing.assert_array_equal((y2[0] - u[0]) % mod, g[0, 1] % mod)
    np.testing.assert_array_equal((u[1] - y2[1]) % mod, g[0, 1] % mod)


def test_modular_sum_wraps():
    words = jnp.array([[2**16 - 1, 5], [3, 2**16 - 5], [7, 7]], jnp.uint32)
    np.testing.assert_array_equal(modular_sum(words, jnp.array([1, 1, 0], bool), 16), [2, 0])
    words = jnp.array([[2**32 - 1], [2]], jnp.uint32)
    np.testing.assert_array_equal(modular_sum(words, jnp.ones(2, bool), 32), [1])


# ----------------------------------------------------------------------------- dropouts

def test_select_dropouts_counts_and_uniformity():
    slots = 10
    for fraction in (0.0, 0.1, 0.25, 0.5, 0.7):
        for m in range(slots + 1):
            real = np.zeros(slots, bool)
            real[np.random.default_rng(m).permutation(slots)[:m]] = True
            drop = np.asarray(select_dropouts(KEY, jnp.asarray(real), fraction))
            assert drop.sum() == int(fraction * m + 0.5 + 1e-9)   # halves up: 0.1 * 5 -> 1
            assert not np.any(drop & ~real)
    real = jnp.array([1, 0, 1, 1, 0, 1], bool)
    keys = jax.random.split(jax.random.key(5), DRAWS)
    drops = np.asarray(jax.jit(jax.vmap(lambda k: select_dropouts(k, real, 0.5)))(keys))
    assert np.all(drops.sum(1) == 2)
    freq = drops.mean(0)
    np.testing.assert_array_equal(freq[[1, 4]], 0)
    np.testing.assert_allclose(freq[[0, 2, 3, 5]], 0.5, atol=6 * np.sqrt(0.25 / DRAWS))


# ----------------------------------------------------------------------------- aggregator

@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_aggregate_is_the_survivors_clipped_mean_within_one_step(bits, dropout):
    deltas, weights = cohort_deltas()
    clip = CLIP
    out, metrics = run(shared_agg(bits, dropout), deltas, weights)
    real = weights > 0
    survivors = real & ~np.asarray(select_dropouts(KEY, jnp.asarray(real), dropout))
    m, n_surv = real.sum(), survivors.sum()
    assert n_surv == 5 - int(dropout * 5 + 0.5)
    ref = clipped_mean(flat_stack(deltas), survivors, clip)
    scale = float(fixed_point_scale(clip, bits, m)[0])
    err = flat(out) - ref
    assert np.all(np.abs(err) < 1 / scale + 2e-7 * clip)       # float32 at b = 32
    d = ref.size
    assert metrics["aggregate/bits_per_client"] == bits * d
    assert metrics["aggregate/bits_per_round"] == bits * d * n_surv
    assert metrics["aggregate/num_clients"] == n_surv
    assert metrics["aggregate/num_dropped"] == m - n_surv
    assert metrics["aggregate/quantization_error"] == pytest.approx(
        np.linalg.norm(err), rel=1e-3, abs=1e-6)
    assert metrics["aggregate/quantization_error"] < np.sqrt(d) / scale + 1e-6
    # the rounding is random, not a fixed rounding: the error is not zero at b = 16
    if bits == 16:
        assert metrics["aggregate/quantization_error"] > 0.05 / scale


def test_aggregate_is_unbiased_over_keys():
    deltas, weights = cohort_deltas(seed=4, slots=5, padding=(3,))   # 4 real clients
    agg = secure_sum(clip_norm=1.0, bits=8)                          # s = floor(127/4) = 31
    keys = jax.random.split(jax.random.key(11), DRAWS)
    outs = jax.jit(jax.vmap(lambda k: agg.apply(deltas, jnp.asarray(weights), agg.init(None),
                                                k, None)[0]))(keys)
    dec = np.stack([np.concatenate([np.asarray(outs["b"][t]).ravel(),
                                    np.asarray(outs["w"][t]).ravel()]) for t in range(DRAWS)])
    ref = clipped_mean(flat_stack(deltas), weights > 0, 1.0)
    assert np.all(np.abs(dec - ref) < 1 / 31 + 1e-6)
    # per draw std <= sqrt(m / 4) / (s m) = 1 / (4 s); a biased rounding would be ~1 / (4 s)
    np.testing.assert_allclose(dec.mean(0), ref, atol=6 / (4 * 31) / np.sqrt(DRAWS))


def test_padding_clients_are_ignored_and_one_compilation_serves_every_cohort():
    deltas, weights = cohort_deltas(slots=6, padding=())
    agg = shared_agg(16, 0.4)
    traces = []

    def counted(*args):
        traces.append(1)
        return agg.apply(*args)

    apply = jax.jit(counted)
    x = flat_stack(deltas)
    for real in ([1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]):
        real = np.array(real, bool)
        w = np.where(real, weights, 0.0).astype(np.float32)
        out, _, metrics = apply(deltas, jnp.asarray(w), agg.init(None), KEY, None)
        survivors = real & ~np.asarray(select_dropouts(KEY, jnp.asarray(real), 0.4))
        assert metrics["aggregate/num_clients"] == survivors.sum() > 0
        scale = float(fixed_point_scale(CLIP, 16, real.sum())[0])
        np.testing.assert_allclose(flat(out), clipped_mean(x, survivors, CLIP), atol=1 / scale)
        # whatever a padding slot holds, the output is bit-for-bit the same
        keep = jnp.asarray(real)
        garbage = jax.tree.map(lambda v, keep=keep: jnp.where(
            keep.reshape((-1,) + (1,) * (v.ndim - 1)), v, GARBAGE), deltas)
        out2, _, _ = apply(garbage, jnp.asarray(w), agg.init(None), KEY, None)
        np.testing.assert_array_equal(flat(out2), flat(out))
    assert len(traces) == 1


def test_no_survivor_or_no_real_client_gives_zeros():
    deltas, weights = cohort_deltas()
    one = np.zeros_like(weights)
    one[0] = 3.0
    agg = secure_sum(dropout_fraction=0.9)
    out, metrics = run(agg, deltas, one)                          # round(0.9) = 1 drops
    np.testing.assert_array_equal(flat(out), 0.0)
    assert metrics["aggregate/num_dropped"] == 1 and metrics["aggregate/num_clients"] == 0
    out, metrics = run(agg, deltas, np.zeros_like(weights))
    np.testing.assert_array_equal(flat(out), 0.0)
    assert metrics["aggregate/quantization_error"] == 0


def test_chunking_self_masks_and_dtypes_do_not_change_the_result():
    deltas, weights = cohort_deltas()
    ref, ref_metrics = run(shared_agg(16, 0.4), deltas, weights)
    # the masks cancel exactly, so neither chunking nor the self masks change one bit
    for agg in (shared_agg(16, 0.4, chunk_size=4),
                secure_sum(CLIP, 16, 0.4, self_masks=False)):
        out, metrics = run(agg, deltas, weights)
        np.testing.assert_array_equal(flat(out), flat(ref))
        assert metrics == ref_metrics
    # a different key: different rounding (and dropouts)
    other, _ = run(shared_agg(16, 0.4), deltas, weights, key=jax.random.key(1))
    assert not np.array_equal(flat(other), flat(ref))
    bf = jax.tree.map(lambda v: v.astype(jnp.bfloat16), deltas)
    out, _ = run(shared_agg(16, 0.4), bf, weights)
    assert out["w"].dtype == jnp.bfloat16 and out["w"].shape == (3, 2)
    np.testing.assert_allclose(flat(out).astype(np.float32), flat(ref), atol=0.02)


def test_bad_options_raise():
    for kwargs in ({"clip_norm": 0.0}, {"bits": 1}, {"bits": 33},
                   {"dropout_fraction": 1.0}, {"dropout_fraction": -0.1}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            secure_sum(**kwargs)
    # A float where `bits: int` is annotated: the factory's own check raises ValueError; under
    # the test-time type checker (tests/conftest.py) the annotation raises a TypeError first.
    with pytest.raises((ValueError, TypeError), match="bits"):
        secure_sum(bits=16.5)
    deltas, weights = cohort_deltas()
    with pytest.raises(ValueError, match="raise bits"):          # 2^(2-1) - 1 = 1 < 6 slots
        run(secure_sum(bits=2), deltas, weights)
    agg = secure_sum()
    with pytest.raises(ValueError, match="PRNG key"):
        agg.apply(deltas, jnp.asarray(weights), agg.init(None), None, None)


def test_entry_builds_with_defaults(monkeypatch):
    assert [e.name for e in secure.ENTRIES] == ["secure_sum"]
    for e in secure.ENTRIES:
        monkeypatch.setitem(registry.AGGREGATORS, e.name, e)
    assert registry.options("secure_sum") == {
        "clip_norm": 1.0, "bits": 32, "dropout_fraction": 0.0, "self_masks": True,
        "chunk_size": None}
    deltas, weights = cohort_deltas()
    out, metrics = run(registry.build("secure_sum", bits=16, clip_norm=100.0), deltas, weights)
    real = weights > 0
    np.testing.assert_allclose(flat(out), flat_stack(deltas)[real].mean(0), atol=1e-2)
    assert metrics["aggregate/bits_per_client"] == 16 * 8


# ----------------------------------------------------------------------------- inside FedAvg

@pytest.mark.parametrize("bits, dropout", [(16, 0.0), (32, 0.2)])
def test_one_fedavg_round_is_the_clipped_mean_within_the_quantization_error(bits, dropout):
    model = tiny_softmax_model()
    data = unequal_clients(sizes=(5, 2, 0, 9, 1, 4))      # client 2 is empty: weight 0
    client_opt = optax.sgd(0.3)
    clip = 0.3
    alg = fedavg(client_opt, optax.sgd(1.0),
                 aggregator=secure_sum(clip_norm=clip, bits=bits, dropout_fraction=dropout))
    params = model.init(jax.random.key(1))
    cohort = pack_cohort(data, [3, 2, 0, 5, 1, 4], batch_size=2, epochs=2, seed=3, round_num=0)
    round_key = jax.random.key(7)
    state, metrics = jit_round(alg, model)(alg.init(params), cohort, round_key)

    deltas, weights = [], []
    for c in range(cohort.num_clients):
        w = plain_local_train(model, params, cohort, c, client_opt)
        deltas.append(np.concatenate([(np.asarray(params[k]) - np.asarray(w[k])).ravel()
                                      for k in ("b", "w")]))
        weights.append(float(cohort.num_examples[c]))
    x, real = np.stack(deltas), np.array(weights) > 0
    assert np.any(np.linalg.norm(x[real], axis=1) > clip)          # clipping is active
    agg_key = jax.random.fold_in(round_key, AGGREGATOR_KEY)
    survivors = real & ~np.asarray(select_dropouts(agg_key, jnp.asarray(real), dropout))
    assert survivors.sum() == real.sum() - int(dropout * real.sum() + 0.5)
    expected = np.concatenate([np.asarray(params[k]).ravel() for k in ("b", "w")]) \
        - clipped_mean(x, survivors, clip)
    got = np.concatenate([np.asarray(state.params[k]).ravel() for k in ("b", "w")])
    scale = float(fixed_point_scale(clip, bits, real.sum())[0])
    np.testing.assert_allclose(got, expected, atol=1 / scale + 2e-6, rtol=0)
    assert metrics["aggregate/num_dropped"] == real.sum() - survivors.sum()
    assert metrics["aggregate/quantization_error"] < np.sqrt(x.shape[1]) / scale + 1e-6
