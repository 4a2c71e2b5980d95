"""Simulated Byzantine clients: an aggregator wrapper that poisons some clients' deltas.

Round t, cohort of m real clients (weight > 0). A set A of attackers is drawn, their
deltas are replaced, and the inner aggregator sees the poisoned cohort:

    Delta'_i = Delta_i                   for i not in A
    Delta'_i = -scale * Delta_i          "sign_flip"   (scale 1 by default)
    Delta'_i =  scale * Delta_i          "scale"       (scale 10 by default)
    Delta'_i =  scale * sigma * z_i      "random"      (z_i ~ N(0, I); sigma given, or the
                                                        honest deltas' per-coordinate std)
    Delta'_i =  scale * 1                "same_value"  (every coordinate = scale, 100 by default)
    Delta    = inner({Delta'_i}, {n_i})

Attackers keep their weights n_i. Two ways to choose A:

- per round (default): exactly `round(fraction * m)` of the m real clients, uniformly
  at random from the aggregator key (which derives from the run seed and the round).
  A client attacking in one round may be honest in the next.
- persistent: each client is malicious with probability `fraction`, drawn once, the
  first round it takes part with examples, and kept in a per-client store (one boolean
  per client seen), so a malicious client stays malicious. The number of attackers per
  round is then random.
"""

from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_core import client_state, keys, tree
from fedjax_core.aggregate.base import Aggregator, AggregatorEntry
from fedjax_core.typing import Array, State

KINDS = ("sign_flip", "scale", "random", "same_value")
DEFAULT_SCALE = {"sign_flip": 1.0, "scale": 10.0, "random": 1.0, "same_value": 100.0}

_CHOICE_STREAM, _NOISE_STREAM, _INNER_STREAM = keys.ATTACK_CHOICE, keys.ATTACK_NOISE, keys.ATTACK_INNER


class AttackState(NamedTuple):
    """State of `attack`: the inner aggregator's state and, when attackers persist,
    a `ClientStore` with rows `{"assigned": bool, "malicious": bool}` (EmptyState otherwise)."""

    inner: State
    malicious: client_state.ClientStore | optax.EmptyState


def num_attackers_for(fraction: float, num_real: int) -> int:
    """`round(fraction * num_real)`, rounding halves up, exact on the decimal `fraction`.

    Examples: fraction 0.1 of 5 real clients -> 1 (0.5 rounds up), of 4 -> 0, of 15 -> 2.
    """
    return int(Fraction(repr(float(fraction))) * num_real + Fraction(1, 2))


def _per_round_attackers(key, real, m, fraction) -> Array:
    """Exactly `num_attackers_for(fraction, m)` real clients, uniformly from `key`."""
    num_slots = real.shape[0]
    table = jnp.asarray(np.asarray(
        [num_attackers_for(fraction, n) for n in range(num_slots + 1)], np.int32))
    u = jnp.where(real, jax.random.uniform(key, (num_slots,)), jnp.inf)
    rank = jnp.argsort(jnp.argsort(u, stable=True), stable=True)
    return (rank < table[m]) & real


def _persistent_attackers(key, real, store, slots, fraction):
    """Malicious flags from the store; a real client without one draws it now."""
    rows = store.rows
    assigned = jnp.where(slots.is_new, False, rows["assigned"][slots.row])
    stored = jnp.where(slots.is_new, False, rows["malicious"][slots.row])
    draw = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r)))(
        client_state.key_rows(slots))
    malicious = jnp.where(assigned, stored, draw < fraction)
    store = client_state.scatter(
        store, slots, {"assigned": assigned | real, "malicious": malicious}, keep=real)
    return malicious & real, store


def _poison(deltas, attackers, honest, kind, scale, std, key):
    """The deltas with the attackers' rows replaced according to `kind`."""
    leaves, treedef = jax.tree.flatten(deltas)
    n_honest = jnp.maximum(jnp.sum(honest.astype(jnp.float32)), 1.0)
    out = []
    for idx, x in enumerate(leaves):
        x32 = x.astype(jnp.float32)
        if kind == "sign_flip":
            bad = -scale * x32
        elif kind == "scale":
            bad = scale * x32
        elif kind == "same_value":
            bad = jnp.full_like(x32, scale)
        else:  # random
            if std is None:
                h = tree.per_client(honest, x32)
                mu = jnp.sum(jnp.where(h, x32, 0.0), axis=0) / n_honest
                sigma = jnp.sqrt(jnp.sum(jnp.where(h, jnp.square(x32 - mu), 0.0), axis=0)
                                 / n_honest)
            else:
                sigma = jnp.float32(std)
            noise = jax.random.normal(jax.random.fold_in(key, idx), x32.shape, jnp.float32)
            bad = scale * sigma * noise
        out.append(jnp.where(tree.per_client(attackers, x32), bad, x32).astype(x.dtype))
    return jax.tree.unflatten(treedef, out)


def attack(inner: Aggregator | str = "mean", fraction: float = 0.1, kind: str = "sign_flip",
           scale: float | None = None, std: float | None = None,
           persistent: bool = False) -> Aggregator:
    """Wraps `inner` so that a fraction of each cohort's clients send poisoned deltas.

    Update rule: attackers A are chosen (below); `Delta'_i` is `-scale Delta_i`
    ("sign_flip"), `scale Delta_i` ("scale"), `scale sigma z_i` with `z_i ~ N(0, I)`
    ("random"), or `scale` in every coordinate ("same_value") for i in A, `Delta_i`
    otherwise; the aggregate is `inner({Delta'_i}, {n_i})`. Attackers keep their weights.

    Choice of attackers, from the aggregator key `keys.aggregator_key(round_key)`:
      - `persistent=False`: exactly `num_attackers_for(fraction, m)` =
        `round(fraction * m)` of the round's m real clients (halves round up, exactly
        on the decimal fraction: 0.1 of 5 clients is 1 attacker, of 4 clients 0),
        uniformly at random. The same key always picks the same cohort slots. The choice
        is per round: the aggregator sees cohort slots, not client identities.
      - `persistent=True`: each client is malicious with probability `fraction`, drawn
        the first round it takes part with examples and kept in a `ClientStore` in the
        state, so it stays malicious (or honest) for the whole run. Needs the cohort's
        `ClientSlots` (`clients`): algorithms built on the round skeleton pass them
        (the state then holds a `ClientIndex`); by hand, `client_state.assign` gives them.

    For "random", sigma is `std` when given (isotropic noise, as the Gaussian Byzantine
    workers of Blanchard et al. 2017), otherwise the per-coordinate standard deviation
    (ddof 0, unweighted) of this round's honest real clients' deltas (0 with fewer than
    two honest clients); the noise is zero-mean.

    Args:
      inner: the aggregator under attack, or a registered aggregator's name (built with
        its defaults; resolved through `fedjax_core.aggregate.registry`).
      fraction: fraction of attackers, in [0, 1].
      kind: one of "sign_flip", "scale", "random", "same_value".
      scale: the attack's magnitude; default 1 for "sign_flip" and "random" (a std
        multiplier), 10 for "scale", 100 for "same_value".
      std: for "random", a fixed noise std instead of the honest deltas' std.
      persistent: fix each client's role across rounds (see above).

    Returns:
      An `Aggregator` with `AttackState` state. Metrics: `aggregate/num_attackers` plus
      `inner`'s metrics.

    Example:
      >>> agg = attack(krum(num_byzantine=1), fraction=0.2, kind="sign_flip", scale=10.0)
      >>> alg = fedavg(optax.sgd(0.1), optax.sgd(1.0), aggregator=agg)

    References:
      Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
      Gradient Descent" (NeurIPS; Gaussian Byzantine workers). Li, Xu, Chen, Giannakis,
      Ling 2019, "RSA: Byzantine-Robust Stochastic Aggregation Methods for Distributed
      Learning from Heterogeneous Datasets" (AAAI; same-value and sign-flipping attacks).
      Bagdasaryan et al. 2020, "How To Backdoor Federated Learning" (AISTATS; scaled
      updates).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown attack kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"attack needs 0 <= fraction <= 1, got {fraction}")
    if std is not None and (kind != "random" or std < 0):
        raise ValueError(f"std={std} needs kind='random' and std >= 0")
    if isinstance(inner, str):
        from fedjax_core.aggregate import registry  # lazy: registry imports this module
        inner = registry.get(inner).build()
    scale = DEFAULT_SCALE[kind] if scale is None else float(scale)

    def init(params):
        store = (client_state.empty_store({"assigned": jnp.zeros((), bool),
                                           "malicious": jnp.zeros((), bool)})
                 if persistent else optax.EmptyState())
        return AttackState(inner.init(params), store)

    def apply(deltas, weights, state, key, clients=None):
        real = jnp.asarray(weights) > 0
        m = jnp.sum(real.astype(jnp.int32))
        choice_key = jax.random.fold_in(key, _CHOICE_STREAM)
        store = state.malicious
        if persistent:
            if clients is None:
                raise ValueError(
                    "attack(persistent=True) needs the cohort's ClientSlots: run it inside "
                    "an algorithm built on the round skeleton (it passes them), or pass "
                    "client_state.assign's slots as `clients`")
            attackers, store = _persistent_attackers(choice_key, real, store, clients, fraction)
        else:
            attackers = _per_round_attackers(choice_key, real, m, fraction)
        poisoned = _poison(deltas, attackers, real & ~attackers, kind, scale, std,
                           jax.random.fold_in(key, _NOISE_STREAM))
        aggregate, inner_state, metrics = inner.apply(
            poisoned, weights, state.inner, jax.random.fold_in(key, _INNER_STREAM), clients)
        return aggregate, AttackState(inner_state, store), {
            **metrics, "aggregate/num_attackers": jnp.sum(attackers).astype(jnp.float32)}

    return Aggregator(init, apply)


ENTRIES = [AggregatorEntry(
    "attack", "simulated attackers poisoning a fraction of the deltas before an inner "
    "aggregator (kind: sign_flip, scale, random or same_value)",
    lambda inner="mean", fraction=0.1, kind="sign_flip", scale=None, std=None,
    persistent=False: attack(inner, fraction, kind, scale, std, persistent),
    "Blanchard et al. 2017; Li et al. 2019 (RSA); Bagdasaryan et al. 2020")]
