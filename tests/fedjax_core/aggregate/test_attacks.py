"""Attack simulation: who attacks, what they send, and robust rules under attack."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core.aggregate import attacks, registry, robust
from fedjax_core.aggregate.attacks import attack, num_attackers_for
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.aggregate.mean import mean
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.data import pack_cohort
from fedjax_core.keys import AGGREGATOR as AGGREGATOR_KEY
from tests.fedjax_core.aggregate.test_robust import reference_deltas
from tests.fedjax_core.helpers import Rows, tiny_softmax_model, unequal_clients


def spy() -> Aggregator:
    """An inner 'aggregator' that returns the stacked deltas it was given."""
    return Aggregator(lambda p: optax.EmptyState(),
                      lambda deltas, weights, state, key=None, clients=None: (deltas, state, {}))


def stacked(num_slots=8, pad=(2, 6)):
    """Distinct nonzero deltas {"w": [slots, 3], "b": [slots]}; slots in `pad` have weight 0."""
    w = np.arange(1, 3 * num_slots + 1, dtype=np.float32).reshape(num_slots, 3)
    b = -np.arange(1, num_slots + 1, dtype=np.float32)
    weights = np.arange(1, num_slots + 1, dtype=np.float32)
    weights[list(pad)] = 0
    return {"w": jnp.asarray(w), "b": jnp.asarray(b)}, jnp.asarray(weights)


def attacked_rows(agg, deltas, weights, key, clients=None, state=None):
    state = agg.init(None) if state is None else state
    out, state, metrics = jax.jit(agg.apply)(deltas, weights, state, key, clients)
    changed = np.any(np.asarray(out["w"]) != np.asarray(deltas["w"]), axis=1)
    return out, changed, metrics, state


def test_rounding_of_the_attacker_count():
    assert num_attackers_for(0.1, 5) == 1      # 0.5 rounds up
    assert num_attackers_for(0.1, 4) == 0
    assert num_attackers_for(0.1, 15) == 2     # 1.5 rounds up
    assert num_attackers_for(0.3, 10) == 3
    assert num_attackers_for(0.7, 5) == 4      # 3.5 rounds up, despite 0.7 * 5 < 3.5 in floats
    assert num_attackers_for(0.0, 9) == 0 and num_attackers_for(1.0, 9) == 9


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_exact_count_among_real_clients_and_deterministic_per_key(fraction):
    deltas, weights = stacked()
    agg = attack(spy(), fraction, "sign_flip")
    real = np.asarray(weights) > 0
    expected = num_attackers_for(fraction, int(real.sum()))   # of 6 real clients
    seen = set()
    for k in range(12):
        key = jax.random.key(k)
        _, rows, metrics, _ = attacked_rows(agg, deltas, weights, key)
        assert rows.sum() == expected == metrics["aggregate/num_attackers"]
        assert not rows[~real].any()                           # padding never attacks
        _, again, _, _ = attacked_rows(agg, deltas, weights, key)
        np.testing.assert_array_equal(rows, again)             # same key, same attackers
        seen.add(tuple(rows))
    if 0 < expected < 6:
        assert len(seen) > 1                                   # the key matters


@pytest.mark.parametrize("kind, scale, row", [
    ("sign_flip", None, lambda w: -w),
    ("sign_flip", 4.0, lambda w: -4 * w),
    ("scale", None, lambda w: 10 * w),
    ("same_value", None, lambda w: np.full_like(w, 100.0)),
    ("same_value", -3.0, lambda w: np.full_like(w, -3.0)),
])
def test_deterministic_kinds(kind, scale, row):
    deltas, weights = stacked()
    out, rows, _, _ = attacked_rows(attack(spy(), 0.5, kind, scale), deltas, weights,
                                    jax.random.key(3))
    assert rows.sum() == 3
    w = np.asarray(deltas["w"])
    np.testing.assert_allclose(np.asarray(out["w"])[rows], row(w[rows]))
    np.testing.assert_allclose(np.asarray(out["w"])[~rows], w[~rows])
    np.testing.assert_allclose(np.asarray(out["b"])[~rows], np.asarray(deltas["b"])[~rows])


def test_random_kind_uses_honest_std_or_the_given_one():
    # 5 real clients + 1 padding; honest coordinates alternate -2, +2 (std 2), except the
    # last coordinate, equal for all honest clients (std 0).
    num = 4000
    honest = np.where(np.arange(6)[:, None] % 2 == 0, -2.0, 2.0) * np.ones((6, num))
    honest[:, -1] = 7.0
    deltas = {"w": jnp.asarray(honest, jnp.float32), "b": jnp.ones(6)}
    weights = jnp.array([1.0, 1, 1, 1, 1, 0])
    agg = attack(spy(), 0.2, "random")                          # 1 attacker of 5
    out, rows, _, _ = attacked_rows(agg, deltas, weights, jax.random.key(0))
    # sigma: per coordinate, the std (ddof 0) of the 4 honest clients' values.
    w = np.asarray(out["w"])[rows][0]
    honest_rows = honest[(np.asarray(weights) > 0) & ~rows]
    sigma = honest_rows[:, :-1].std(axis=0)
    z = w[:-1] / sigma
    assert abs(z.std() - 1.0) < 0.05 and abs(z.mean()) < 0.05
    assert w[-1] == 0.0                                         # std 0: no noise
    out, rows, _, _ = attacked_rows(attack(spy(), 0.2, "random", std=0.5), deltas, weights,
                                    jax.random.key(0))
    w = np.asarray(out["w"])[rows][0]
    assert abs(w.std() - 0.5) < 0.03 and abs(w.mean()) < 0.03
    out2, _, _, _ = attacked_rows(attack(spy(), 0.2, "random", std=0.5), deltas, weights,
                                  jax.random.key(0))
    np.testing.assert_array_equal(out["w"], out2["w"])          # same key, same noise


def test_bad_options():
    with pytest.raises(ValueError, match="unknown attack kind"):
        attack(mean(), 0.1, "label_flip")
    with pytest.raises(ValueError):
        attack(mean(), 1.5)
    with pytest.raises(ValueError):
        attack(mean(), 0.1, "sign_flip", std=1.0)
    with pytest.raises(ValueError, match="ClientSlots"):
        deltas, weights = stacked()
        agg = attack(mean(), 0.1, persistent=True)
        agg.apply(deltas, weights, agg.init(None), jax.random.key(0), None)


def test_robust_rules_resist_what_the_mean_does_not():
    """5 identical honest deltas (1, 1, 1) per client, 1 of 5 sign-flipped with scale 100:
    the answer does not depend on which client attacks."""
    deltas = {"w": jnp.ones((6, 2)), "b": jnp.ones(6)}
    weights = jnp.array([1.0, 1, 0, 1, 1, 1])                  # slot 2 is padding
    key = jax.random.key(5)

    def agg_of(inner):
        agg = attack(inner, 0.2, "sign_flip", scale=100.0)
        out, _, metrics = jax.jit(agg.apply)(deltas, weights, agg.init(None), key, None)
        assert metrics["aggregate/num_attackers"] == 1
        return np.asarray(out["w"]), float(out["b"])

    w, b = agg_of(mean())
    np.testing.assert_allclose(w, [-19.2, -19.2], rtol=1e-6)    # (4 - 100) / 5
    for inner in (robust.coordinate_median(), robust.trimmed_mean(0.2), robust.krum(1),
                  robust.krum(1, None)):
        w, b = agg_of(inner)
        np.testing.assert_allclose(w, [1.0, 1.0], rtol=1e-6)
        assert b == pytest.approx(1.0)
    # Norm bounding limits the damage to max_norm: (4 * 1 - 1 * 1) / 5 per coordinate
    # when the attacker's (-100, -100, -100) is clipped to norm sqrt(3).
    w, b = agg_of(robust.norm_bounding(np.sqrt(3.0)))
    np.testing.assert_allclose(w, [0.6, 0.6], rtol=1e-5)


def test_persistent_attackers_stay_malicious_across_rounds():
    population, fraction = 40, 0.5
    agg = attack(spy(), fraction, "same_value", persistent=True)
    apply = jax.jit(agg.apply)
    state = {"agg": agg.init(None)}
    index = Rows()
    role = {}
    rng = np.random.default_rng(0)
    for r in range(12):
        ids = rng.choice(population, 6, replace=False)
        weights = np.ones(6, np.float32)
        weights[r % 6] = 0                                      # an empty client this round
        state, slots = index.prepare(state, ids)
        deltas = {"w": jnp.zeros((6, 2)), "b": jnp.zeros(6)}
        out, agg_state, metrics = apply(deltas, jnp.asarray(weights), state["agg"],
                                        jax.random.key(r), slots)
        state = {"agg": agg_state}
        attacked = np.asarray(out["b"]) == 100.0
        assert metrics["aggregate/num_attackers"] == attacked.sum()
        assert not attacked[weights == 0].any()
        for i, a, n in zip(ids, attacked, weights):
            if n > 0:
                assert role.setdefault(int(i), bool(a)) == bool(a)   # never changes
    assert 0.3 < np.mean(list(role.values())) < 0.7                  # about `fraction`
    # A client first seen empty is drawn when it first has examples, not fixed as honest.
    store = state["agg"].malicious.rows
    for i, row in index.row_of.items():
        assert bool(store["assigned"][row]) == (i in role)


def test_entry_resolves_inner_by_name(monkeypatch):
    for e in robust.ENTRIES + attacks.ENTRIES:
        monkeypatch.setitem(registry.AGGREGATORS, e.name, e)
    entry = registry.get("attack")
    deltas = {"w": jnp.ones((6, 2)), "b": jnp.ones(6)}
    weights = jnp.array([1.0, 1, 0, 1, 1, 1])
    for inner, expected in (("mean", -19.2), ("coordinate_median", 1.0), ("krum", 1.0)):
        agg = entry.build(inner=inner, fraction=0.2, kind="sign_flip", scale=100.0)
        out, _, metrics = jax.jit(agg.apply)(deltas, weights, agg.init(None),
                                             jax.random.key(0), None)
        np.testing.assert_allclose(out["w"], [expected] * 2, rtol=1e-6)
    agg = entry.build()                                          # defaults: 10% sign flip, mean
    _, _, metrics = agg.apply(deltas, weights, agg.init(None), jax.random.key(0), None)
    assert metrics["aggregate/num_attackers"] == 1             # round(0.1 * 5) = 1


@pytest.mark.parametrize("inner", ["mean", "median"])
def test_one_fedavg_round_matches_python(inner):
    """Attackers send 100 in every coordinate; the Python side draws the same slots from
    the aggregator key `fold_in(round_key, AGGREGATOR_KEY)`."""
    model = tiny_softmax_model()
    data = unequal_clients(sizes=(5, 2, 0, 9, 1, 4))
    client_opt = optax.sgd(0.3)
    agg = attack(mean() if inner == "mean" else robust.coordinate_median(), 0.4, "same_value")
    alg = fedavg(client_opt, optax.sgd(1.0), aggregator=agg)
    params = model.init(jax.random.key(1))
    cohort = pack_cohort(data, [3, 2, 0, 5, 1, 4], batch_size=2, epochs=1, seed=3, round_num=0)
    round_key = jax.random.key(11)
    state, metrics = jit_round(alg, model)(alg.init(params), cohort, round_key)

    deltas, weights = reference_deltas(model, params, cohort, client_opt)
    real = weights > 0
    choice = np.asarray(attacks._per_round_attackers(
        jax.random.fold_in(jax.random.fold_in(round_key, AGGREGATOR_KEY), 0),
        jnp.asarray(real), int(real.sum()), 0.4))
    assert choice.sum() == 2 == metrics["aggregate/num_attackers"]   # round(0.4 * 5)
    sent = [jax.tree.map(lambda x: np.full_like(x, 100.0), d) if a else d
            for d, a in zip(deltas, choice)]
    if inner == "mean":
        delta = jax.tree.map(lambda *xs: sum(n * x for n, x in zip(weights, xs)) / weights.sum(),
                             *sent)
    else:
        delta = jax.tree.map(lambda *xs: np.median(np.stack([x for x, r in zip(xs, real) if r]), 0),
                             *sent)
    expected = jax.tree.map(lambda p, d: np.asarray(p) - d, params, delta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 state.params, expected)


def test_all_attackers_in_fedavg_flip_the_mean():
    model = tiny_softmax_model()
    data = unequal_clients()
    params = model.init(jax.random.key(1))
    cohort = pack_cohort(data, [0, 1, 2], batch_size=2, epochs=1, seed=0, round_num=0)
    honest = fedavg(optax.sgd(0.3), optax.sgd(1.0))
    flipped = fedavg(optax.sgd(0.3), optax.sgd(1.0), aggregator=attack(mean(), 1.0, "sign_flip"))
    a, _ = jit_round(honest, model)(honest.init(params), cohort, jax.random.key(0))
    b, _ = jit_round(flipped, model)(flipped.init(params), cohort, jax.random.key(0))
    # w - Delta vs w + Delta: b = 2 w - a.
    jax.tree.map(lambda p, x, y: np.testing.assert_allclose(y, 2 * p - x, atol=1e-6),
                 params, a.params, b.params)
