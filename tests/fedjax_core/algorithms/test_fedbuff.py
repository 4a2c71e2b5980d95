"""FedBuff against a plain per-client Python loop with a list of past global models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import parallel
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.fedbuff import (
    ENTRY,
    client_staleness,
    fedbuff,
    staleness_scale,
    staleness_weight,
)
from fedjax_core.data import pack_clients, pack_cohort
from fedjax_core.data.sampling import SHUFFLE_STREAM, host_rng
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients

MODEL = tiny_softmax_model()
CLIENT_OPT, LR, MOMENTUM = optax.sgd(0.3), 0.8, 0.5
STEPS = 12  # every cohort is padded to 12 steps of 2 examples, so compiled rounds are shared
COHORTS = [[4, 0, 2, 1], [1, 2, 3, 0], [0, 3, 4, 2], [2, 1, 0, 4]]
_compiled = {}


def alg_for(max_staleness, staleness_in="weight", delay="uniform"):
    return fedbuff(CLIENT_OPT, optax.sgd(LR, momentum=MOMENTUM), max_staleness=max_staleness,
                   delay=delay, staleness_in=staleness_in)


def step_fn(max_staleness, staleness_in="weight", chunk_size=1):
    """One jitted round per configuration for the whole file: compiling dominates its time."""
    k = (max_staleness, staleness_in, chunk_size)
    if k not in _compiled:
        alg = alg_for(max_staleness, staleness_in)
        _compiled[k] = (alg, jit_round(alg, MODEL, parallel.Plan(chunk_size)))
    return _compiled[k]


def cohort_of(data, indices, round_num):
    return pack_cohort(data, indices, batch_size=2, epochs=2, seed=3, round_num=round_num,
                       steps=STEPS)


def assert_tree_close(a, b, atol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=1e-5), a, b)


def ref_train(params, cohort, c):
    w, opt_state = params, CLIENT_OPT.init(params)
    for s in range(cohort.num_steps):
        m = cohort.mask[c, s]
        if not m.any():
            continue
        batch = {k: jnp.asarray(v[c, s][m]) for k, v in cohort.batches.items()}
        grads = jax.grad(lambda p: jnp.mean(MODEL.loss(batch, MODEL.apply(p, batch))))(w)
        updates, opt_state = CLIENT_OPT.update(grads, opt_state, w)
        w = optax.apply_updates(w, updates)
    return w


def ref_round(past, mom, cohort, key, max_staleness, staleness_in, exponent=0.5):
    """One buffer: client i starts from past[t - tau_i]; its delta is applied to past[t]."""
    t = len(past) - 1
    taus = [min(int(x), t) for x in client_staleness(key, cohort.num_clients, max_staleness)]
    total_w, total = 0.0, None
    for c, tau in enumerate(taus):
        n = float(cohort.num_examples[c])
        start = past[t - tau]
        trained = ref_train(start, cohort, c)
        delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), start, trained)
        s = (1.0 + tau) ** -exponent
        if staleness_in == "weight":   # FLSim: weight n_i s_i on Delta_i
            weight, scale = n * s, 1.0
        else:                          # Algorithm 1: s_i Delta_i, weight n_i
            weight, scale = n, s
        contribution = jax.tree.map(lambda d: weight * scale * d, delta)
        total = contribution if total is None else jax.tree.map(np.add, total, contribution)
        total_w += weight
    delta = jax.tree.map(lambda d: d / total_w, total)
    mom = jax.tree.map(lambda m, d: MOMENTUM * m + d, mom, delta)
    past.append(jax.tree.map(lambda w, m: np.asarray(w) - LR * m, past[t], mom))
    real = [tau for c, tau in enumerate(taus) if cohort.num_examples[c] > 0]
    return mom, sum(real) / len(real)


@pytest.mark.parametrize("staleness_in", ["weight", "delta"])
def test_matches_plain_loop_with_staleness(staleness_in):
    data = unequal_clients()
    params = MODEL.init(jax.random.key(1))
    alg, step = step_fn(2, staleness_in)
    state = alg.init(params)
    past, mom = [params], jax.tree.map(np.zeros_like, params)
    stale_rounds = 0
    for r, indices in enumerate(COHORTS):
        key = jax.random.key(20 + r)
        cohort = cohort_of(data, indices, r)
        state, metrics = step(state, cohort, key)
        mom, mean_tau = ref_round(past, mom, cohort, key, 2, staleness_in)
        assert_tree_close(state.params, past[-1])
        np.testing.assert_allclose(metrics["fedbuff/mean_staleness"], mean_tau, rtol=1e-6)
        stale_rounds += mean_tau > 0
    assert int(state.server.version) == len(COHORTS)
    assert stale_rounds >= 2  # the check did exercise stale starts


def test_no_staleness_is_fedavg():
    data = unequal_clients()
    params = MODEL.init(jax.random.key(2))
    alg, step = step_fn(0)
    f = fedavg(CLIENT_OPT, optax.sgd(LR, momentum=MOMENTUM))
    sb, sf = alg.init(params), f.init(params)
    step_f = jit_round(f, MODEL)
    for r, indices in enumerate(COHORTS[:3]):
        cohort = cohort_of(data, indices, r)
        sb, mb = step(sb, cohort, jax.random.key(r))
        sf, mf = step_f(sf, cohort, jax.random.key(r))
        assert_tree_close(sb.params, sf.params, atol=1e-6)
        for name in mf:
            np.testing.assert_allclose(mb[name], mf[name], rtol=1e-6)
        assert float(mb["fedbuff/mean_staleness"]) == 0.0


def test_first_round_has_no_older_version():
    """In round 0 every client starts from w_0 whatever its draw: the round is FedAvg."""
    data = unequal_clients()
    params = MODEL.init(jax.random.key(3))
    cohort = cohort_of(data, COHORTS[0], 0)
    (alg2, step2), (alg0, step0) = step_fn(2), step_fn(0)
    key = jax.random.key(7)
    assert int(jnp.max(client_staleness(key, 4, 2))) > 0
    s2, m2 = step2(alg2.init(params), cohort, key)
    s0, _ = step0(alg0.init(params), cohort, key)
    assert_tree_close(s2.params, s0.params, atol=1e-6)
    assert float(m2["fedbuff/mean_staleness"]) == 0.0


def test_history_ring_buffer():
    data = unequal_clients()
    params = MODEL.init(jax.random.key(4))
    alg, step = step_fn(2)
    state = alg.init(params)
    seen = [params]
    for r, indices in enumerate(COHORTS):
        state, _ = step(state, cohort_of(data, indices, r), jax.random.key(r))
        seen.append(state.params)
    # Versions 2, 3, 4 sit in rows 2, 0, 1.
    for v in (2, 3, 4):
        row = jax.tree.map(lambda h: h[v % 3], state.server.history)
        assert_tree_close(row, seen[v], atol=0)


def test_per_client_staleness_is_each_slots_draw():
    data = unequal_clients()
    alg, _ = step_fn(2)
    step = jit_round(alg, MODEL, per_client=True)
    state = alg.init(MODEL.init(jax.random.key(0)))
    for r, indices in enumerate(COHORTS[:3]):
        key = jax.random.key(30 + r)
        state, metrics, per_client = step(state, cohort_of(data, indices, r), key)
        want = np.minimum(np.asarray(client_staleness(key, 4, 2)), r)  # t = r before the step
        np.testing.assert_array_equal(per_client["staleness"], want)
        np.testing.assert_allclose(metrics["fedbuff/mean_staleness"], want.mean(), rtol=1e-6)
    assert want.max() > 0


def test_result_does_not_depend_on_chunk_size():
    data = unequal_clients()
    params = MODEL.init(jax.random.key(0))
    (alg, step1), (_, step3) = step_fn(2), step_fn(2, chunk_size=3)
    s1 = s3 = alg.init(params)
    for r, indices in enumerate(COHORTS[:3]):
        cohort = cohort_of(data, indices, r)
        s1, m1 = step1(s1, cohort, jax.random.key(r))
        s3, m3 = step3(s3, cohort, jax.random.key(r))
        assert_tree_close(s1.params, s3.params, atol=1e-6)
        for name in m1:
            np.testing.assert_allclose(m1[name], m3[name], rtol=1e-5, atol=1e-6)


def test_padding_client_changes_nothing():
    data = unequal_clients()
    clients = [data.get_client(i) for i in (4, 0, 1)]
    empty = {k: v[:0] for k, v in clients[0].items()}
    alg, step = step_fn(2)
    tight_step = jit_round(alg, MODEL)
    a = b = alg.init(MODEL.init(jax.random.key(0)))
    for r in range(3):
        rngs = lambda: [host_rng(0, r, SHUFFLE_STREAM, s) for s in range(3)]  # noqa: E731
        tight = pack_clients(clients, batch_size=2, epochs=2, rngs=rngs(), bucket=False)
        padded = pack_clients(clients + [empty], batch_size=2, epochs=2, rngs=rngs() + [None],
                              steps=STEPS)
        a, ma = tight_step(a, tight, jax.random.key(r))
        b, mb = step(b, padded, jax.random.key(r))
        assert_tree_close(a.params, b.params, atol=1e-6)
        for name in ma:
            np.testing.assert_allclose(ma[name], mb[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("delay", ["uniform", "half_normal", "exponential"])
def test_delay_draws(delay):
    key = jax.random.key(0)
    tau = np.asarray(client_staleness(key, 2000, max_staleness=4, delay=delay))
    assert tau.dtype == np.int32 and tau.min() == 0 and tau.max() == 4
    np.testing.assert_array_equal(tau, client_staleness(key, 2000, 4, delay))
    # A trailing slot does not change the others' draws.
    np.testing.assert_array_equal(tau[:7], client_staleness(key, 7, 4, delay))
    counts = np.bincount(tau, minlength=5) / tau.size
    if delay == "uniform":
        np.testing.assert_allclose(counts, 0.2, atol=0.04)
    elif delay == "half_normal":  # P(floor(2|Z|) = 0) = P(|Z| < 0.5) = 0.383
        np.testing.assert_allclose(counts[0], 0.383, atol=0.04)
    else:  # P(floor(d) = 0) = 1 - exp(-1/2) = 0.393, P(d >= 4) = exp(-2) = 0.135
        np.testing.assert_allclose([counts[0], counts[4]], [0.393, 0.135], atol=0.04)
    assert not np.asarray(client_staleness(key, 50, 0, delay)).any()


def test_staleness_weight_by_hand():
    np.testing.assert_allclose(staleness_weight(jnp.array([0, 1, 3, 8])),
                               [1.0, 2 ** -0.5, 0.5, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(staleness_weight(jnp.array([0, 3]), exponent=1.0), [1.0, 0.25])


def test_staleness_weighting_by_hand():
    """Two clients with equal data sizes whose deltas are known: one fresh, one 3 rounds stale."""
    from fedjax_core.aggregate.mean import mean

    deltas = jnp.array([[4.0], [8.0]])
    s = staleness_weight(jnp.array([0, 3]))  # 1, 1/2
    n = jnp.array([10.0, 10.0])
    weight_mode, _, _ = mean().apply(deltas, n * s, None)
    delta_mode, _, _ = mean().apply(deltas * s[:, None], n, None)
    np.testing.assert_allclose(weight_mode, [(4 + 0.5 * 8) / 1.5])   # 16/3
    np.testing.assert_allclose(delta_mode, [(4 + 0.5 * 8) / 2])      # Algorithm 1: 4


def test_entry_and_options():
    alg = ENTRY.build(optax.sgd(0.1), 1.0)
    state = alg.init(MODEL.init(jax.random.key(0)))
    assert jax.tree.leaves(state.server.history)[0].shape[0] == 5  # max_staleness 4 + 1
    momentum = ENTRY.build(optax.sgd(0.1), 1.0, server_momentum=0.9, max_staleness=1)
    assert jax.tree.leaves(momentum.init(MODEL.init(jax.random.key(0))).server.opt_state)
    with pytest.raises(ValueError, match="delay"):
        fedbuff(delay="pareto")
    with pytest.raises(ValueError, match="max_staleness"):
        fedbuff(max_staleness=-1)
    with pytest.raises(ValueError, match="staleness_in"):
        fedbuff(staleness_in="both")
    with pytest.raises(ValueError, match="delay_scale"):
        fedbuff(delay="exponential", delay_scale=0.0)


@pytest.mark.parametrize("fn", ["polynomial", "hinge"])
def test_fedasync_matches_plain_mixing(fn):
    """FedAsync, one arrival per server step with the timeline's staleness (Cohort.staleness):
    x_{t+1} = (1 - alpha s(tau)) x_t + alpha s(tau) x_new, x_new trained from x_{t - tau}."""
    alpha, hinge = 0.6, dict(hinge_a=2.0, hinge_b=1)
    data = unequal_clients()
    params = MODEL.init(jax.random.key(4))
    alg = fedbuff(CLIENT_OPT, optax.sgd(alpha), max_staleness=3, rule="fedasync",
                  staleness_fn=fn, **hinge)
    step = jit_round(alg, MODEL)
    state, past = alg.init(params), [params]
    arrivals = [(4, 0), (1, 1), (0, 2), (2, 3), (3, 3), (1, 0), (0, 3)]  # (client, tau)
    for t, (client, tau) in enumerate(arrivals):
        cohort = cohort_of(data, [client], t)._replace(staleness=np.array([tau], np.int32))
        state, metrics = step(state, cohort, jax.random.key(t))
        tau = min(tau, t)
        s = ((1.0 + tau) ** -0.5 if fn == "polynomial"
             else 1.0 if tau <= 1 else 1.0 / (2.0 * (tau - 1) + 1.0))
        x_new = ref_train(past[t - tau], cohort, 0)
        past.append(jax.tree.map(lambda x, y: (1 - alpha * s) * np.asarray(x)
                                 + alpha * s * np.asarray(y), past[t], x_new))
        assert_tree_close(state.params, past[-1])
        assert float(metrics["fedbuff/mean_staleness"]) == tau


def test_staleness_functions_by_hand():
    tau = jnp.array([0, 1, 4, 5, 7])
    np.testing.assert_allclose(staleness_scale(tau, "hinge", hinge_a=10.0, hinge_b=4),
                               [1, 1, 1, 1 / 11, 1 / 31], rtol=1e-6)
    np.testing.assert_allclose(staleness_scale(tau, "constant"), [1, 1, 1, 1, 1])
    np.testing.assert_allclose(staleness_scale(tau, "polynomial", exponent=1.0),
                               [1, 1 / 2, 1 / 5, 1 / 6, 1 / 8], rtol=1e-6)
    with pytest.raises(ValueError, match="rule"):
        fedbuff(rule="fedasyn")
    with pytest.raises(ValueError, match="staleness_fn"):
        fedbuff(staleness_fn="linear")
