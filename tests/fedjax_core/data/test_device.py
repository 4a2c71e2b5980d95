"""Device-resident data: indexed cohorts gather to the dense cohorts, and rounds on them
give the dense rounds' numbers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import parallel
from fedjax_core.algorithms.agnostic_fedavg import agnostic_fedavg
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.fedsgd import fedsgd
from fedjax_core.algorithms.mime import mime
from fedjax_core.algorithms.scaffold import scaffold
from fedjax_core.data import pack_clients, pack_cohort
from fedjax_core.data.device import (
    IndexedBatches,
    device_examples,
    feature_names,
    gather,
    index_clients,
    index_cohort,
)
from fedjax_core.data.pack import num_steps, pad_cohort, positions, step_bucket
from tests.fedjax_core.helpers import tiny_softmax_model, unequal_clients

SIZES = (5, 2, 0, 9, 1, 4, 7, 3)  # client 2 has no examples


@pytest.fixture(scope="module")
def data():
    return unequal_clients(SIZES, seed=3)


@pytest.fixture(scope="module")
def examples(data):
    return device_examples(data)


def assert_same_cohort(dense, indexed):
    """Every field equal, dtypes included; the indexed batches gathered bit for bit."""
    gathered = gather(indexed.batches)
    assert sorted(gathered) == sorted(dense.batches)
    for k, v in dense.batches.items():
        g = np.asarray(gathered[k])
        assert g.dtype == v.dtype and g.shape == v.shape, k
        np.testing.assert_array_equal(g, v, err_msg=k)
    for field in ("mask", "num_examples", "client_index"):
        a, b = getattr(dense, field), getattr(indexed, field)
        assert a.dtype == b.dtype, field
        np.testing.assert_array_equal(a, b, err_msg=field)
    assert indexed.batches.index.dtype == np.int32


def test_device_examples_layout(data, examples):
    # Row 0 is zeros; client i's examples follow at offsets[i], in client order.
    np.testing.assert_array_equal(examples.sizes, SIZES)
    np.testing.assert_array_equal(examples.offsets, 1 + np.concatenate([[0], np.cumsum(SIZES)[:-1]]))
    assert examples.num_rows == sum(SIZES) + 1
    for k in ("x", "y"):
        src = np.asarray(examples.features[k])
        assert not src[0].any()
        for i, n in enumerate(SIZES):
            np.testing.assert_array_equal(src[examples.offsets[i]:examples.offsets[i] + n],
                                          data.get_client(i)[k])


def test_positions_hand_computed():
    np.testing.assert_array_equal(positions([3, 1, 0], batch_size=2, bucket=False),
                                  [[[0, 1], [2, -1]], [[0, -1], [-1, -1]], [[-1, -1], [-1, -1]]])
    # Two epochs, capped after 3 batches of 2: the stream 0 1 2 0 1 2 stops after 6 slots.
    np.testing.assert_array_equal(positions([3], batch_size=2, epochs=3, max_steps=3,
                                            bucket=False), [[[0, 1], [2, 0], [1, 2]]])


@pytest.mark.parametrize("indices,batch_size,epochs,max_steps,steps", [
    ([3, 0, 2], 2, 1, None, None),        # an empty client among them
    ([2], 3, 1, None, None),              # only an empty client
    ([7, 6, 1, 4, 5, 3], 3, 2, None, None),
    ([3, 6, 0], 2, 3, 4, None),           # max_steps cuts the stream
    ([0, 1, 2, 3, 4, 5, 6, 7], 4, 2, None, 12),  # padded to a fixed step count
])
def test_indexed_cohort_is_the_dense_cohort(data, examples, indices, batch_size, epochs,
                                            max_steps, steps):
    for round_num in (0, 5):
        dense = pack_cohort(data, indices, batch_size, epochs, seed=4, round_num=round_num,
                            steps=steps, max_steps=max_steps)
        indexed = index_cohort(examples, indices, batch_size, epochs, seed=4,
                               round_num=round_num, steps=steps, max_steps=max_steps)
        assert_same_cohort(dense, indexed)
    # Unshuffled (evaluation order), and padded with empty clients (Poisson cohorts).
    dense = pack_cohort(data, indices, batch_size, epochs, 4, 0, shuffle=False, bucket=False,
                        max_steps=max_steps)
    indexed = index_cohort(examples, indices, batch_size, epochs, 4, 0, shuffle=False,
                           bucket=False, max_steps=max_steps)
    assert_same_cohort(dense, indexed)
    pad_to = step_bucket(len(indices) + 1)
    assert_same_cohort(pad_cohort(dense, pad_to), pad_cohort(indexed, pad_to))


def test_index_clients_is_pack_clients(data, examples):
    rngs = lambda: [np.random.default_rng(i) for i in range(3)]  # noqa: E731
    dense = pack_clients([data.get_client(i) for i in (6, 2, 0)], 3, 2, rngs(),
                         client_index=[6, 2, 0])
    assert_same_cohort(dense, index_clients(examples, [6, 2, 0], 3, 2, rngs()))


def test_padded_slots_read_row_zero(examples):
    c = index_cohort(examples, [1, 2], batch_size=4, epochs=1, seed=0, round_num=0)
    assert c.batches.index.shape == c.mask.shape
    assert (c.batches.index[~c.mask] == 0).all() and (c.batches.index[c.mask] > 0).all()
    assert repr(c.batches) == ("IndexedBatches(source={'x': float32[32, 3], 'y': int32[32]}, "
                               "index=int32[2, 1, 4])")  # shapes, not the population


def test_device_examples_rejects_inconsistent_data():
    class Lying:
        client_ids = ("a",)
        client_sizes = np.array([3])

        def get_client(self, i):
            return {"x": np.zeros((2, 1), np.float32)}

    class Mixed(Lying):
        client_ids = ("a", "b")
        client_sizes = np.array([2, 2])

        def get_client(self, i):
            return {"x" if i == 0 else "z": np.zeros((2, 1), np.float32)}

    with pytest.raises(ValueError, match="client_sizes says 3"):
        device_examples(Lying())
    with pytest.raises(ValueError, match=r"client 1 has features \['z'\]"):
        device_examples(Mixed())


def test_map_clients_gathers_each_chunk(data, examples):
    indices = [6, 3, 2, 0, 4]
    dense = pack_cohort(data, indices, 2, 1, seed=1, round_num=2)
    indexed = index_cohort(examples, indices, 2, 1, seed=1, round_num=2)

    def one(c):
        batches, mask = c
        return jnp.sum(batches["x"] * mask[..., None]), jnp.sum(batches["y"] * mask)

    for chunk in (1, 2, 3, 5):
        plan = parallel.Plan(chunk_size=chunk)
        want = parallel.map_clients(one, (dense.batches, dense.mask), plan)
        run = jax.jit(functools.partial(lambda b, m, plan: parallel.map_clients(one, (b, m), plan),
                                        plan=plan))
        got = run(indexed.batches, indexed.mask)
        jax.tree.map(np.testing.assert_array_equal, got, want)


def _avals(jaxpr):
    """Every variable shape in `jaxpr` and its sub-jaxprs (loop bodies)."""
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in inner.eqns:
        for v in eqn.outvars:
            yield tuple(v.aval.shape), eqn.primitive.name
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    yield from _avals(sub)


def _source_gathers(alg, model, cohort, plan):
    state = alg.init(model.init(jax.random.key(0)))
    apply = functools.partial(alg.apply, model=model, plan=plan)
    shapes = list(_avals(jax.make_jaxpr(apply)(state, cohort, jax.random.key(0))))
    return {shape for shape, prim in shapes if prim == "gather" and shape[-1:] == (3,)}, shapes


def test_the_round_gathers_one_chunk_or_one_step_at_a_time(data, examples):
    # Inside the jitted round, gathered batches have a step's shape, never a chunk's or the
    # cohort's: every algorithm reads each step's rows straight from the source through the
    # one local loop (client.steps_loop), FedAvg's training and FedSGD's full-batch pass alike.
    model = tiny_softmax_model()
    indices = [0, 1, 3, 4, 5, 6]
    indexed = index_cohort(examples, indices, 2, 1, seed=0, round_num=0)
    dense = pack_cohort(data, indices, 2, 1, seed=0, round_num=0)
    c, s, b = indexed.mask.shape
    for chunk in (1, 2):
        plan = parallel.Plan(chunk_size=chunk)
        gathers, shapes = _source_gathers(fedavg(optax.sgd(0.3)), model, indexed, plan)
        assert gathers == {(b, 3) if chunk == 1 else (chunk, b, 3)}  # one step
        assert (c, s, b, 3) not in {shape for shape, _ in shapes}
        gathers, shapes = _source_gathers(fedsgd(None, 0.5), model, indexed, plan)
        assert gathers == {(b, 3) if chunk == 1 else (chunk, b, 3)}  # one step
        assert (c, s, b, 3) not in {shape for shape, _ in shapes}
    alg = fedavg(optax.sgd(0.3))
    state = alg.init(model.init(jax.random.key(0)))
    # The check can fail: the dense round does hold the whole cohort's batches.
    dense_apply = functools.partial(alg.apply, model=model, plan=parallel.Plan(2))
    dense_jaxpr = jax.make_jaxpr(dense_apply)(state, dense, jax.random.key(0))
    assert (c, s, b, 3) in {tuple(v.aval.shape) for v in dense_jaxpr.jaxpr.invars}


ALGORITHMS = {
    "fedavg": lambda: fedavg(optax.sgd(0.3), optax.sgd(1.0, momentum=0.5)),
    "scaffold": lambda: scaffold(optax.sgd(0.2), 1.0, client_learning_rate=0.2, num_clients=len(SIZES)),
    "fedsgd": lambda: fedsgd(None, 0.5),  # full-batch gradients (client.full_batch)
    "mime": lambda: mime(optax.sgd(0.1, momentum=0.9)),  # two maps over the same cohort
}


def run_rounds(alg, model, cohorts, plan):
    step = jit_round(alg, model, plan)
    state = alg.init(model.init(jax.random.key(1)))
    history = []
    for r, cohort in enumerate(cohorts):
        state, metrics = step(state, cohort, jax.random.fold_in(jax.random.key(7), r))
        history.append(metrics)
    return state, history


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_rounds_on_device_data_equal_the_denserun_rounds(data, examples, name):
    model = tiny_softmax_model()
    draws = [[6, 2, 0, 3, 5], [3, 1, 7, 4, 0], [5, 6, 2, 1, 3]]
    steps = step_bucket(num_steps(max(SIZES), 2, 2))  # one shape for every round
    dense = [pack_cohort(data, d, 2, 2, seed=0, round_num=r, steps=steps)
             for r, d in enumerate(draws)]
    indexed = [index_cohort(examples, d, 2, 2, seed=0, round_num=r, steps=steps)
               for r, d in enumerate(draws)]
    for chunk in (1, 3):
        plan = parallel.Plan(chunk_size=chunk)
        want_state, want_metrics = run_rounds(ALGORITHMS[name](), model, dense, plan)
        got_state, got_metrics = run_rounds(ALGORITHMS[name](), model, indexed, plan)
        close = functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=1e-6)
        jax.tree.map(close, got_state, want_state)
        jax.tree.map(close, got_metrics, want_metrics)
        assert float(want_metrics[-1]["train/num_examples"]) > 0


def test_feature_checks_read_indexed_batches(examples):
    # agnostic_fedavg checks the feature names outside map_clients.
    assert feature_names(index_cohort(examples, [0], 2, 1, 0, 0).batches) == ["x", "y"]
    alg = agnostic_fedavg(optax.sgd(0.1), optax.sgd(1.0), num_domains=2)
    model = tiny_softmax_model()
    cohort = index_cohort(examples, [0, 1], 2, 1, 0, 0)
    with pytest.raises(ValueError, match=r"'domain_id' feature .*found \['x', 'y'\]"):
        alg.apply(alg.init(model.init(jax.random.key(0))), cohort, jax.random.key(0),
                  model=model)


def test_indexed_batches_is_a_pytree(examples):
    c = index_cohort(examples, [0, 3], 2, 1, 0, 0)
    leaves = jax.tree.leaves(c.batches)
    assert len(leaves) == 3 and any(x.shape == c.mask.shape for x in leaves)
    assert isinstance(jax.tree.map(lambda x: x, c.batches), IndexedBatches)



def test_indexed_cohorts_on_a_device_mesh(data, examples):
    # Under shard_map the index is split over the devices and the source replicated.
    if not hasattr(parallel, "client_mesh"):
        pytest.skip("this parallel.py has no device mesh")
    model = tiny_softmax_model()
    draws = [[6, 2, 0, 3, 5], [3, 1, 7, 4, 0]]
    dense = [pack_cohort(data, d, 2, 1, seed=0, round_num=r, steps=6) for r, d in enumerate(draws)]
    indexed = [index_cohort(examples, d, 2, 1, seed=0, round_num=r, steps=6)
               for r, d in enumerate(draws)]
    want, _ = run_rounds(ALGORITHMS["fedavg"](), model, dense, parallel.Plan(2))
    mesh = parallel.Plan(2, mesh=parallel.client_mesh(4))
    got, _ = run_rounds(ALGORITHMS["fedavg"](), model, indexed, mesh)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=1e-6), got, want)


def test_step_batch_reads_one_step_as_the_dense_batch(data, examples):
    from fedjax_core.data.device import step_batch
    indexed = index_cohort(examples, [3, 0, 5], 2, 2, seed=1, round_num=4)
    dense = pack_cohort(data, [3, 0, 5], 2, 2, seed=1, round_num=4)
    for client in range(3):
        one = IndexedBatches(indexed.batches.source, indexed.batches.index[client])
        mine = {k: v[client] for k, v in dense.batches.items()}
        for k in range(indexed.mask.shape[1]):
            got = jax.jit(step_batch)(one, k)
            jax.tree.map(np.testing.assert_array_equal, got, step_batch(mine, k))
            np.testing.assert_array_equal(got["x"], dense.batches["x"][client, k])
