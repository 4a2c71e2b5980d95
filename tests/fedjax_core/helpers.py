"""Tiny models and data shared by core tests."""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_core.data import InMemoryFederatedData
from fedjax_core.models.base import Model


def tiny_softmax_model(features: int = 3, classes: int = 4) -> Model:
    """Linear softmax classifier: logits = x W + b."""

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"w": 0.5 * jax.random.normal(k1, (features, classes)),
                "b": 0.1 * jax.random.normal(k2, (classes,))}

    def apply(params, batch, key=None, train=False):
        del key, train
        return batch["x"] @ params["w"] + params["b"]

    def loss(batch, logits):
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, batch["y"][:, None], axis=-1)[:, 0]

    def metrics(batch, logits):
        ones = jnp.ones(batch["y"].shape, jnp.float32)
        correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
        return {"loss": (loss(batch, logits), ones), "accuracy": (correct, ones)}

    return Model(init, apply, loss, metrics)


def unequal_clients(sizes=(5, 2, 9, 1, 4), features=3, classes=4, seed=0) -> InMemoryFederatedData:
    rng = np.random.default_rng(seed)
    return InMemoryFederatedData({
        f"c{i}": {"x": rng.normal(size=(n, features)).astype(np.float32),
                  "y": rng.integers(0, classes, size=n).astype(np.int32)}
        for i, n in enumerate(sizes)})


def plain_local_train(model: Model, params, cohort, c: int, client_opt, grad_fn=None):
    """Client `c` of `cohort` trained as the papers write it: a Python loop over its non-empty
    steps, `w <- w + ClientOpt(grad)`. `grad_fn(w, batch)` replaces the plain gradient of
    the batch's mean loss (e.g. FedProx's proximal gradient)."""
    import optax

    if grad_fn is None:
        def grad_fn(w, batch):
            return jax.grad(lambda p: jnp.mean(model.loss(batch, model.apply(p, batch))))(w)
    w, opt_state = params, client_opt.init(params)
    for s in range(cohort.num_steps):
        m = cohort.mask[c, s]
        if not m.any():
            continue
        batch = {k: jnp.asarray(v[c, s][m]) for k, v in cohort.batches.items()}
        updates, opt_state = client_opt.update(grad_fn(w, batch), opt_state, w)
        w = optax.apply_updates(w, updates)
    return w


def close(a, b, tol=1e-5):
    """Every leaf of `a` equals `b`'s within `tol` (absolute and relative)."""
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=tol, rtol=tol), a, b)


def uniform_mean():
    """A non-default aggregator: the plain mean over real clients (it checks it is given the
    cohort's slots)."""
    import optax

    from fedjax_core import tree
    from fedjax_core.aggregate.base import Aggregator

    def apply(deltas, weights, state, key=None, clients=None):
        del key
        assert clients is not None
        return tree.weighted_mean(deltas, (weights > 0).astype(jnp.float32)), state, {}
    return Aggregator(lambda params: optax.EmptyState(), apply)


class Rows:
    """Store rows for tests that drive an aggregator's `apply` by hand (inside a round,
    the skeleton does this): `state, slots = rows.prepare(state, ids)`."""

    def __init__(self):
        from fedjax_core import client_state
        self._cs = client_state
        self.index = client_state.empty_index()

    def prepare(self, state, ids):
        ids = np.asarray(ids, np.int32)
        state, index = self._cs.fit((state, self.index), ids)
        self.index, slots = self._cs.assign(index, jnp.asarray(ids))
        return state, slots

    @property
    def row_of(self) -> dict:
        """`{position: row}` of the clients seen."""
        rows = np.asarray(self.index.row_of)
        return {int(p): int(r) for p, r in enumerate(rows) if r >= 0}


def mlp_round_memory(alg, clients: int) -> tuple[int, int]:
    """(compiled temporaries of one round of `alg`, bytes of its per-client stores) on a
    cohort of `clients` 4-example clients of an MLP 16 -> 256 -> 64 (21k params, so that
    per-client copies of the parameters dominate memory), chunks of 4."""
    from fedjax_core import client_state, parallel
    from fedjax_core.algorithms.base import jit_round
    from fedjax_core.data import pack_cohort
    from fedjax_core.models.linear import mlp

    model = mlp((16,), (256,), num_classes=64)
    rng = np.random.default_rng(0)
    data = InMemoryFederatedData({
        f"c{i}": {"x": rng.normal(size=(4, 16)).astype(np.float32),
                  "y": rng.integers(0, 64, size=4).astype(np.int32)} for i in range(clients)})
    cohort = pack_cohort(data, list(range(clients)), batch_size=4, epochs=1, seed=0, round_num=0)
    state = alg.init(model.init(jax.random.key(0)))
    compiled = jit_round(alg, model, parallel.Plan(4)).lower(
        state, cohort, jax.random.key(1)).compile()
    state = client_state.fit(state, cohort.client_index)
    stores = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
        x, client_state.ClientStore)) if isinstance(s, client_state.ClientStore)]
    store_bytes = sum(x.nbytes for s in stores for x in jax.tree.leaves(s.rows))
    return compiled.memory_analysis().temp_size_in_bytes, store_bytes
