"""Compression aggregators: unbiasedness, the Hadamard transform, bit counts, top-k with
error feedback against a Python reference, padding, and a FedAvg round with each."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from fedjax_core import parallel
from fedjax_core.aggregate import compression as c
from fedjax_core.aggregate.base import Aggregator, AggregatorEntry
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.data import pack_cohort
from tests.fedjax_core.helpers import Rows, tiny_softmax_model, unequal_clients

DRAWS = 2000


def sylvester(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def draws(fn, seed=0):
    """`fn(key)` for DRAWS keys, stacked (one jitted vmap)."""
    return jax.jit(jax.vmap(fn))(jax.random.split(jax.random.key(seed), DRAWS))


# ----------------------------------------------------------------------------- Hadamard


def test_fwht_is_sylvester_hadamard_and_orthogonal():
    h8 = sylvester(8)
    np.testing.assert_array_equal(h8 @ h8.T, 8 * np.eye(8))
    fwht = jax.jit(c.fwht)
    # fwht(e_i) is column i of H (H is symmetric); batched over the leading axis.
    np.testing.assert_array_equal(fwht(jnp.eye(8)), h8)
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    np.testing.assert_allclose(fwht(x), x @ h8.T, atol=1e-5)
    np.testing.assert_allclose(fwht(fwht(x)), 8 * x, atol=1e-5)
    np.testing.assert_array_equal(fwht(jnp.array([3.0])), [3.0])
    with pytest.raises(ValueError, match="power-of-two"):
        c.fwht(jnp.ones(6))


def test_rotation_is_orthonormal_with_padding():
    x = jax.random.normal(jax.random.key(0), (13,))
    key = jax.random.key(7)
    z, back, signs = jax.jit(lambda x, k: (
        c.rotate(x, k), c.unrotate(c.rotate(x, k), k, 13), c.hadamard_signs(k, 16)))(x, key)
    assert z.shape == (16,)
    np.testing.assert_allclose(jnp.linalg.norm(z), jnp.linalg.norm(x), rtol=1e-5)
    np.testing.assert_allclose(back, x, atol=1e-5)
    dense = sylvester(16) * np.asarray(signs)[None, :] / 4.0     # R = H D / sqrt(16)
    np.testing.assert_allclose(z, dense @ np.pad(np.asarray(x), (0, 3)), atol=1e-5)


# ----------------------------------------------------------------------------- unbiasedness


def test_stochastic_quantization_is_unbiased_on_the_grid():
    bits, d = 2, 20
    x = jax.random.normal(jax.random.key(1), (d,))
    def roundtrip(k):
        msg = c.stochastic_quantize(x, bits, k)
        return msg, c.dequantize(msg, bits)
    msgs, dec = draws(roundtrip)
    assert msgs.levels.min() == 0 and msgs.levels.max() == 2 ** bits - 1
    step = float((x.max() - x.min()) / (2 ** bits - 1))
    # Every decode is one of the two levels around x_j ...
    assert np.all(np.abs(np.asarray(dec) - np.asarray(x)) <= step * (1 + 1e-5))
    # ... and the mean is within 5 standard errors (Var <= step^2 / 4) of x.
    bound = 5 * step / 2 / np.sqrt(DRAWS) + 1e-5
    np.testing.assert_array_less(np.abs(np.asarray(dec.mean(0) - x)), bound)
    # Deterministic rounding to the nearest level would be biased by up to step / 2.
    nearest = x.min() + jnp.round((x - x.min()) / step) * step
    assert np.max(np.abs(np.asarray(nearest - x))) > bound


def test_rotated_quantization_is_unbiased():
    bits, d = 2, 21
    x = jax.random.normal(jax.random.key(2), (d,)) + 3.0 * (jnp.arange(d) == 4)
    def roundtrip(k):
        msg = c.rotated_quantize(x, bits, k)
        return msg, c.rotated_dequantize(msg, bits, k, d)
    msgs, dec = draws(roundtrip)
    assert msgs.levels.shape == (DRAWS, 32)
    # Each rotated coordinate has variance <= step^2 / 4, R is orthonormal, so each
    # decoded coordinate has variance <= E[step^2] / 4.
    steps = (msgs.hi - msgs.lo) / (2 ** bits - 1)
    bound = 5 * np.sqrt(float(jnp.mean(steps ** 2)) / 4 / DRAWS) + 1e-5
    np.testing.assert_array_less(np.abs(np.asarray(dec.mean(0) - x)), bound)


def test_drive_with_uniform_rotation_is_unbiased():
    d = 10
    x = jax.random.normal(jax.random.key(3), (d,))
    def roundtrip(k):
        msg = c.drive_encode(x, k, "uniform")
        # The paper's other scale, ||Rx||_1 / d, minimises one vector's error but is biased.
        other = msg._replace(scale=jnp.sum(jnp.abs(jax.random.orthogonal(k, d) @ x)) / d)
        return c.drive_decode(msg, k, d, "uniform"), c.drive_decode(other, k, d, "uniform")
    dec, biased = draws(roundtrip)
    # The unbiased scale makes <x^, x> = ||x||^2 for every rotation.
    np.testing.assert_allclose(dec @ x, jnp.sum(x ** 2) * jnp.ones(DRAWS), rtol=1e-4)
    se = np.asarray(dec.std(0)) / np.sqrt(DRAWS)
    np.testing.assert_array_less(np.abs(np.asarray(dec.mean(0) - x)), 5 * se)
    assert np.max(np.abs(np.asarray(biased.mean(0) - x)) / se) > 5


def test_drive_with_hadamard_is_nearly_unbiased_in_high_dimension():
    d = 256
    x = jax.random.normal(jax.random.key(4), (d,))
    def roundtrip(k):
        msg = c.drive_encode(x, k)
        return msg, c.drive_decode(msg, k, d), jnp.sum(jnp.abs(c.rotate(x, k)))
    msgs, dec, l1 = draws(roundtrip)
    np.testing.assert_allclose(msgs.scale, jnp.sum(x ** 2) / l1, rtol=1e-5)
    np.testing.assert_allclose(dec @ x, jnp.sum(x ** 2) * jnp.ones(DRAWS), rtol=1e-4)
    # One draw has normalised error ~ pi/2 - 1; the mean of 2000 ~ 0.017.
    rel = float(jnp.linalg.norm(dec.mean(0) - x) / jnp.linalg.norm(x))
    assert rel < 0.05, rel


def test_drive_with_hadamard_is_biased_in_two_dimensions():
    """The documented limitation: in d = 2, x = (2, 1) always decodes to (2.5, 0)."""
    x = jnp.array([2.0, 1.0])
    dec = draws(lambda k: c.drive_decode(c.drive_encode(x, k), k, 2))
    np.testing.assert_allclose(dec, np.tile([2.5, 0.0], (DRAWS, 1)), atol=1e-5)


def tiny_deltas(num_clients=3, seed=0, padding=True):
    """Stacked deltas shaped like {"w": [2, 3], "b": [3]} (d = 9), the last client padding."""
    rng = np.random.default_rng(seed)
    deltas = {"w": jnp.asarray(rng.normal(size=(num_clients, 2, 3)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(num_clients, 3)), jnp.float32)}
    weights = jnp.asarray([3.0, 1.0, 2.0, 5.0][:num_clients])
    if padding:
        weights = weights.at[-1].set(0.0)
    return deltas, weights


def weighted_mean_np(deltas, weights):
    w = np.asarray(weights) / np.sum(weights)
    return jax.tree.map(lambda x: np.tensordot(w, np.asarray(x), axes=1), deltas)


@pytest.mark.parametrize("agg", [c.stochastic_quantization(bits=2),
                                 c.rotated_quantization(bits=1)],
                         ids=["quantize", "rotated"])
def test_aggregate_is_unbiased(agg):
    """Through `apply`: the mean over keys of the aggregate is the weighted mean of the
    real clients' deltas (the padding client's garbage delta does not count)."""
    deltas, weights = tiny_deltas()
    deltas = jax.tree.map(lambda x: x.at[-1].set(1e3), deltas)
    state = agg.init(jax.tree.map(lambda x: x[0], deltas))
    out = draws(lambda k: agg.apply(deltas, weights, state, k, None)[0], seed=9)
    target = weighted_mean_np(deltas, weights)
    for leaf, want in zip(jax.tree.leaves(out), jax.tree.leaves(target)):
        se = np.asarray(leaf.std(0)) / np.sqrt(DRAWS)
        np.testing.assert_array_less(np.abs(np.asarray(leaf.mean(0)) - want), 5 * se + 1e-5)


def test_each_client_uses_its_slot_key():
    """Client s encodes with fold_in(key, s): the aggregate is the weighted mean of the
    codecs' decodes under those keys (two identical deltas decode differently)."""
    x = jax.random.normal(jax.random.key(5), (9,))
    deltas = {"v": jnp.stack([x, x, 2 * x])}
    weights = jnp.array([1.0, 3.0, 0.0])
    key = jax.random.key(11)
    codecs = [
        (c.stochastic_quantization(bits=1),
         lambda x, k: c.dequantize(c.stochastic_quantize(x, 1, k), 1)),
        (c.rotated_quantization(bits=1),
         lambda x, k: c.rotated_dequantize(c.rotated_quantize(x, 1, k), 1, k, 9)),
        (c.drive(), lambda x, k: c.drive_decode(c.drive_encode(x, k), k, 9)),
    ]

    @jax.jit
    def run(deltas, weights, key):
        out = []
        for agg, roundtrip in codecs:
            got = agg.apply(deltas, weights, agg.init({"v": x}), key, None)[0]["v"]
            a, b = (roundtrip(x, jax.random.fold_in(key, s)) for s in (0, 1))
            out.append((got, (a + 3 * b) / 4, a, b))
        return out

    for got, want, a, b in run(deltas, weights, key):
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert np.max(np.abs(np.asarray(a - b))) > 1e-3


# ----------------------------------------------------------------------------- bit counts


def test_helpers_for_bit_counts():
    assert [c.index_bits(d) for d in (1, 2, 3, 4, 5, 18, 1024, 1025)] == [
        0, 1, 2, 2, 3, 5, 10, 11]
    assert [c.padded_dim(d) for d in (1, 2, 3, 18, 32, 33)] == [1, 2, 4, 32, 32, 64]
    assert c.top_k_count(18, 0.01) == 1 and c.top_k_count(18, 0.1) == 2
    assert c.top_k_count(100, 0.07) == 7 and c.top_k_count(18, k=40) == 18


def test_exact_bit_counts():
    cases = {
        "quantize": (c.stochastic_quantization(bits=4), 4 * 18 + 64),
        "rotated": (c.rotated_quantization(bits=3), 3 * 32 + 64),
        "top_k": (c.top_k(k=3, error_feedback=False), 3 * (5 + 32)),
        "top_k_fraction": (c.top_k(fraction=0.1, error_feedback=False), 2 * (5 + 32)),
        "drive": (c.drive(), 32 + 32),
        "drive_uniform": (c.drive(rotation="uniform"), 18 + 32),
    }
    rng = np.random.default_rng(0)
    deltas = {"w": jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32),   # d = 15 + 3
              "b": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
    weights = jnp.array([2.0, 0.0, 7.0, 1.0])                               # 3 real clients

    @jax.jit
    def all_metrics(deltas, weights, key):
        out = {}
        for name, (agg, _) in cases.items():
            state = agg.init(jax.tree.map(lambda x: x[0], deltas))
            out[name] = agg.apply(deltas, weights, state, key, None)[2]
        return out

    metrics = all_metrics(deltas, weights, jax.random.key(0))
    for name, (_, bits) in cases.items():
        assert float(metrics[name]["aggregate/bits_per_client"]) == bits, name
        assert float(metrics[name]["aggregate/bits_per_round"]) == 3 * bits, name
        np.testing.assert_allclose(metrics[name]["aggregate/compression_ratio"], 32 * 18 / bits)


# ----------------------------------------------------------------------------- top-k


def test_top_k_error_feedback_by_hand():
    agg = c.top_k(k=1)
    state = agg.init({"a": jnp.zeros(4)})
    index = Rows()
    state, slots = index.prepare(state, [7])
    out, state, _ = agg.apply({"a": jnp.array([[3.0, -1.0, 0.5, 2.0]])}, jnp.array([1.0]),
                              state, None, slots)
    np.testing.assert_array_equal(out["a"], [3.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(state.residuals.rows[0], [0.0, -1.0, 0.5, 2.0])
    # Round 2: v = [1, 1, 1, 0.5] + [0, -1, 0.5, 2] = [1, 0, 1.5, 2.5]; send the 2.5.
    state, slots = index.prepare(state, [7])
    out, state, _ = agg.apply({"a": jnp.array([[1.0, 1.0, 1.0, 0.5]])}, jnp.array([1.0]),
                              state, None, slots)
    np.testing.assert_array_equal(out["a"], [0.0, 0.0, 0.0, 2.5])
    np.testing.assert_array_equal(state.residuals.rows[0], [1.0, 0.0, 1.5, 0.0])
    # Without error feedback round 2 sends the largest coordinate of the delta alone.
    plain = c.top_k(k=1, error_feedback=False)
    out, _, _ = plain.apply({"a": jnp.array([[1.0, 1.0, 3.0, 0.5]])}, jnp.array([1.0]),
                            plain.init({"a": jnp.zeros(4)}), None, None)
    np.testing.assert_array_equal(out["a"], [0.0, 0.0, 3.0, 0.0])
    # Sending every coordinate is the plain weighted mean.
    deltas, weights = tiny_deltas()
    full = c.top_k(fraction=1.0, error_feedback=False)
    out, _, _ = full.apply(deltas, weights, full.init(None), None, None)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out,
                 weighted_mean_np(deltas, weights))


def reference_top_k_round(deltas, weights, ids, residuals, k, error_feedback=True):
    """Plain Python: flatten each real client's delta, add its residual (a dict by client
    id), send the k largest magnitudes, keep the rest; weighted mean of what was sent."""
    sent, ws = [], []
    _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], deltas))
    for i, cid in enumerate(ids):
        if weights[i] == 0:
            continue
        x = np.asarray(ravel_pytree(jax.tree.map(lambda leaf: leaf[i], deltas))[0])
        v = x + (residuals.get(cid, np.zeros_like(x)) if error_feedback else 0.0)
        keep = np.argsort(-np.abs(v), kind="stable")[:k]
        s = np.zeros_like(v)
        s[keep] = v[keep]
        if error_feedback:
            residuals[cid] = v - s
        sent.append(s)
        ws.append(float(weights[i]))
    flat = sum(w * s for w, s in zip(ws, sent)) / sum(ws)
    return jax.tree.map(np.asarray, unravel(jnp.asarray(flat)))


@pytest.mark.parametrize("error_feedback", [True, False])
def test_top_k_matches_python_reference_over_rounds(error_feedback):
    agg = c.top_k(k=2, error_feedback=error_feedback, chunk_size=2)
    state = agg.init({"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)})
    index, residuals = Rows(), {}
    step = jax.jit(agg.apply)
    cohorts = [[10, 11, 12, 13], [12, 14, 10, 15], [10, 12, 11, 13]]     # last: padding
    for r, ids in enumerate(cohorts):
        deltas, weights = tiny_deltas(num_clients=4, seed=r)
        slots = None
        if error_feedback:
            state, slots = index.prepare(state, ids)
        out, state, _ = step(deltas, weights, state, jax.random.key(r), slots)
        want = reference_top_k_round(deltas, weights, ids, residuals, 2, error_feedback)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out, want)
    if error_feedback:
        for cid, e in residuals.items():
            np.testing.assert_allclose(state.residuals.rows[index.row_of[cid]], e, atol=1e-6)
        assert 15 in index.row_of and 15 not in residuals                # padding: untouched
        np.testing.assert_array_equal(state.residuals.rows[index.row_of[15]], 0.0)


def test_inner_aggregator_gets_the_decoded_deltas():
    """`inner` combines the decodes, keeps its own state and adds its metrics."""
    def init(params):
        return jnp.zeros((), jnp.int32)

    def apply(deltas, weights, state, key, clients):
        first = jax.tree.map(lambda x: x[0], deltas)
        return first, state + 1, {"inner/calls": state + 1}

    counting = Aggregator(init, apply)
    deltas, weights = tiny_deltas()
    for ef in (False, True):
        agg = c.top_k(fraction=1.0, error_feedback=ef, inner=counting)   # lossless
        state = agg.init(jax.tree.map(lambda x: x[0], deltas))
        slots = None
        if ef:
            state, slots = Rows().prepare(state, [0, 1, 2])
        for r in (1, 2):
            out, state, metrics = agg.apply(deltas, weights, state, jax.random.key(0), slots)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b[0], atol=1e-6),
                         out, deltas)
            assert int(metrics["inner/calls"]) == r and int(state.inner) == r
            assert float(metrics["aggregate/bits_per_client"]) == 9 * (4 + 32)
    # A registered name works as `inner` too.
    named = c.stochastic_quantization(bits=16, inner="mean")
    out, _, _ = named.apply(deltas, weights, named.init(None), jax.random.key(0), None)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-3), out,
                 weighted_mean_np(deltas, weights))


def test_top_k_with_error_feedback_needs_slots():
    agg = c.top_k(fraction=0.5)
    deltas, weights = tiny_deltas()
    with pytest.raises(ValueError, match="must pass the cohort's slots"):
        agg.apply(deltas, weights, agg.init(jax.tree.map(lambda x: x[0], deltas)),
                  jax.random.key(0), None)


def test_invalid_options():
    with pytest.raises(ValueError, match="bits"):
        c.stochastic_quantization(bits=0)
    with pytest.raises(ValueError, match="fraction"):
        c.top_k(fraction=0.0)
    with pytest.raises(ValueError, match="rotation"):
        c.drive(rotation="random")
    with pytest.raises(ValueError, match="key"):
        agg = c.drive()
        deltas, weights = tiny_deltas()
        agg.apply(deltas, weights, agg.init(None), None, None)


# ----------------------------------------------------------------------------- padding, chunks


ALL = {
    "quantize": lambda **kw: c.stochastic_quantization(bits=3, **kw),
    "rotated": lambda **kw: c.rotated_quantization(bits=2, **kw),
    "top_k": lambda **kw: c.top_k(k=2, **kw),
    "drive": lambda **kw: c.drive(**kw),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_padding_client_and_chunk_size_change_nothing(name):
    deltas, weights = tiny_deltas(num_clients=3, padding=False)
    padded = jax.tree.map(lambda x: jnp.concatenate([x, 7.0 * jnp.ones_like(x[:1])]), deltas)
    padded_weights = jnp.concatenate([weights, jnp.zeros(1)])
    key = jax.random.key(3)
    results = []
    for chunk_size, (ds, ws) in [(1, (deltas, weights)), (None, (padded, padded_weights))]:
        agg = ALL[name](chunk_size=chunk_size)
        state = agg.init(jax.tree.map(lambda x: x[0], deltas))
        index = Rows()
        state, slots = index.prepare(state, [5, 6, 7, 8][:ws.shape[0]])
        out, state, metrics = jax.jit(agg.apply)(ds, ws, state, key, slots)
        results.append((out, metrics))
        if name == "top_k" and ws.shape[0] == 4:
            np.testing.assert_array_equal(state.residuals.rows[3], 0.0)  # padding row kept
    for out, metrics in results[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out, results[0][0])
        assert float(metrics["aggregate/bits_per_round"]) == float(
            results[0][1]["aggregate/bits_per_round"])


# ----------------------------------------------------------------------------- in FedAvg


def plain_client_delta(model, params, cohort, i, lr):
    """Client i's SGD delta written as a loop over its non-empty steps."""
    w = params
    for s in range(cohort.num_steps):
        m = cohort.mask[i, s]
        if not m.any():
            continue
        batch = {k: jnp.asarray(v[i, s][m]) for k, v in cohort.batches.items()}
        grads = jax.grad(lambda p: jnp.mean(model.loss(batch, model.apply(p, batch))))(w)
        w = jax.tree.map(lambda p, g: p - lr * g, w, grads)
    return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, w)


def test_fedavg_with_top_k_error_feedback_matches_reference():
    model, data = tiny_softmax_model(), unequal_clients()
    alg = fedavg(optax.sgd(0.3), optax.sgd(1.0), aggregator=c.top_k(k=3))
    params = model.init(jax.random.key(0))
    state = alg.init(params)
    step = jit_round(alg, model, parallel.Plan(2))
    residuals, ref = {}, params
    for r, ids in enumerate([[4, 0, 2], [2, 1, 0]]):
        cohort = pack_cohort(data, ids, batch_size=2, epochs=1, seed=0, round_num=r)
        state, metrics = step(state, cohort, jax.random.key(r))
        deltas = stack([plain_client_delta(model, ref, cohort, i, 0.3) for i in range(3)])
        mean_delta = reference_top_k_round(deltas, cohort.num_examples, list(ids), residuals, 3)
        ref = jax.tree.map(lambda p, m: np.asarray(p) - m, ref, mean_delta)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                     state.params, ref)
    assert float(metrics["aggregate/bits_per_client"]) == 3 * (4 + 32)    # d = 16
    assert float(metrics["aggregate/bits_per_round"]) == 3 * 3 * (4 + 32)


def test_fedavg_round_with_each_aggregator():
    model, data = tiny_softmax_model(), unequal_clients()
    params = model.init(jax.random.key(0))
    cohort = pack_cohort(data, [0, 1, 2, 3], batch_size=3, epochs=1, seed=0, round_num=0)
    plain = fedavg(optax.sgd(0.2), optax.sgd(1.0))
    want, _ = jit_round(plain, model)(plain.init(params), cohort, jax.random.key(1))
    want_delta = jax.tree.map(np.subtract, params, want.params)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want_delta))
    for entry in c.ENTRIES:
        assert isinstance(entry, AggregatorEntry)
        agg = entry.build()
        assert isinstance(agg, Aggregator)
        alg = fedavg(optax.sgd(0.2), optax.sgd(1.0), aggregator=agg)
        state = alg.init(params)
        state, metrics = jit_round(alg, model)(state, cohort, jax.random.key(1))
        got = jax.tree.map(np.subtract, params, state.params)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(got))
        assert float(metrics["aggregate/bits_per_round"]) == 4 * float(
            metrics["aggregate/bits_per_client"])
        assert float(metrics["aggregate/compression_ratio"]) > 1.0
        if entry.name in ("quantize", "rotated_quantize"):                  # 8 bits: close
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0.05 * scale),
                         got, want_delta)
    assert [e.name for e in c.ENTRIES] == ["quantize", "rotated_quantize", "top_k", "drive"]
