"""Every random stream of a run, named in one place.

A run's randomness is one tree of keys grown by `jax.random.fold_in`:

    experiment key  = key(seed)
    init            = fold_in(experiment, INIT)            # the model's initial params
    round r         = fold_in(experiment, r)
      client slot s = fold_in(round r, s)                  # its local steps: fold_in(client, k)
        personal    = fold_in(client, PERSONAL)            # Ditto's personal pass
        full grad   = fold_in(client, FULL_GRAD)           # Mime's full-batch gradient pass
        domains     = fold_in(client, DOMAIN)              # AFL's per-domain loss pass
      aggregator    = fold_in(round r, AGGREGATOR)         # randomised aggregators (DP noise, ...)
        inner       = fold_in(aggregator, INNER)           # a wrapped aggregator's key
      delays        = fold_in(round r, DELAY)              # FedBuff's simulated staleness
      k-means       = fold_in(round r, KMEANS)             # HypCluster's k-means++ draws

Cohort slots are small non-negative integers and the named streams sit at the top of the
31-bit range, so no two streams of one parent collide. Host-side (numpy) streams for
sampling and shuffling live in `fedjax_core.data.sampling`.

Example:
  >>> rk = keys.round_key(jax.random.key(0), 3)
  >>> keys.client_key(rk, 0), keys.aggregator_key(rk)
"""

import jax

from fedjax_core.typing import PRNGKey

INIT = 0x7FFFFFFF
"""`fold_in(experiment_key, INIT)` initialises the model."""

AGGREGATOR = 0x7FFFFFFF
"""`fold_in(round_key, AGGREGATOR)` is the aggregator's key of the round."""

DELAY = 0x7FFFFFFE
"""`fold_in(round_key, DELAY)` draws FedBuff's simulated staleness."""

KMEANS = 0x7FFFFFFE
"""`fold_in(round_key, KMEANS)` draws HypCluster's k-means++ initial centres."""

PERSONAL = 0x7FFFFFFE
"""`fold_in(client_key, PERSONAL)` keys Ditto's personal pass (step k: a further `fold_in(., k)`)."""

FULL_GRAD = 0x7FFFFFFE
"""`fold_in(client_key, FULL_GRAD)` keys Mime's full-batch gradient pass."""

DOMAIN = 0x7FFFFFFD
"""`fold_in(client_key, DOMAIN)` keys AFL's per-domain loss pass."""

INNER = 0x7FFFFFFE
"""`fold_in(aggregator_key, INNER)` is the key of an aggregator wrapped by another one
(compression, attacks)."""


def init_key(experiment_key: PRNGKey) -> PRNGKey:
    """The key of the model's initial parameters: `fold_in(experiment_key, INIT)`."""
    return jax.random.fold_in(experiment_key, INIT)


def round_key(experiment_key: PRNGKey, round_num) -> PRNGKey:
    """Round r's key: `fold_in(experiment_key, r)`."""
    return jax.random.fold_in(experiment_key, round_num)


def client_key(round_key: PRNGKey, slot) -> PRNGKey:
    """The key of the client in cohort slot `slot`: `fold_in(round_key, slot)`; its local
    step k uses `fold_in(client_key, k)`."""
    return jax.random.fold_in(round_key, slot)


def aggregator_key(round_key: PRNGKey) -> PRNGKey:
    """The aggregator's key of a round: `fold_in(round_key, AGGREGATOR)`."""
    return jax.random.fold_in(round_key, AGGREGATOR)


def stream(parent: PRNGKey, name: int) -> PRNGKey:
    """`fold_in(parent, name)` for one of this module's named streams."""
    return jax.random.fold_in(parent, name)


# Streams under an aggregator's key (`fold_in(aggregator_key, X)`), one family per aggregator.

NOISE = 0
"""DP aggregators: the noise on the clipped sum."""

COUNT_NOISE = 1
"""Adaptive clipping: the noise on the clipped-count estimate."""

ATTACK_CHOICE, ATTACK_NOISE, ATTACK_INNER = 0, 1, 2
"""Simulated attacks: which clients attack, their noise, the wrapped aggregator's key."""

SECURE_PAIR = 0x7FFFFFF0
"""Secure aggregation: the root of the pairwise mask seeds `s_ij`."""

SECURE_SELF_MASK = 0x7FFFFFF1
"""Secure aggregation: the root of the self-mask seeds `b_i`."""

SECURE_DROPOUT = 0x7FFFFFF2
"""Secure aggregation: which clients drop out."""
