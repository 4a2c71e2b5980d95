"""Cohorts split over several devices (`Plan(mesh=...)`) give the one-device results.

tests/conftest.py starts 8 CPU devices. Every comparison is against the same round on
one device; the tolerance (1e-6) covers float reassociation across devices.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import client_state, parallel
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.scaffold import scaffold
from fedjax_core.data import pack_cohort
from tests.fedjax_core.helpers import close, tiny_softmax_model, unequal_clients

TOL = 1e-6
SIZES = (5, 2, 9, 1, 4, 7, 3, 6, 8, 2, 5, 11)  # unequal clients: unequal local gradients


def mesh(n):
    return parallel.client_mesh(n)


def test_eight_devices_are_configured():
    assert len(jax.devices()) == 8  # tests/conftest.py


# ------------------------------------------------------------------------- map_clients


def per_client_grads(w, xs):
    """Each client's gradient of `sum((x w)^2)` at the shared, closed-over `w`."""
    def one(x):
        return jax.grad(lambda p: jnp.sum((x @ p) ** 2))(w)
    return one


@pytest.mark.parametrize("devices, chunk, clients", [
    (8, 1, 8), (8, 1, 11), (8, 2, 11), (3, 1, 11), (3, 3, 11), (2, 2, 5), (2, 4, 12)])
def test_map_clients_over_devices_gives_each_clients_own_gradient(devices, chunk, clients):
    w = jnp.array([[1.0, -2.0], [0.5, 3.0]])
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(clients, 4, 2)), jnp.float32)

    @functools.partial(jax.jit, static_argnums=2)
    def run(w, xs, plan):
        return parallel.map_clients(per_client_grads(w, xs), xs, plan)

    want = jax.vmap(per_client_grads(w, xs))(xs)
    got = run(w, xs, parallel.Plan(chunk, mesh(devices)))
    assert got.shape == (clients, 2, 2)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    # Summed over devices (the shard_map pitfall) every client would get the same total.
    assert not np.allclose(got[0], got[1])


def test_gradients_summed_over_devices_would_fail_this_comparison():
    """What `check_vma=True` does to a closed-over replicated value: the gradient becomes
    the sum over the devices. The comparison above tells the two apart."""
    w = jnp.array([[1.0, -2.0], [0.5, 3.0]])
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4, 2)), jnp.float32)
    spec = jax.sharding.PartitionSpec(parallel.CLIENTS)

    @jax.jit
    def summed(w, xs):
        return jax.shard_map(lambda x: jax.lax.map(per_client_grads(w, x), x), mesh=mesh(8),
                             in_specs=(spec,), out_specs=spec, check_vma=True)(xs)

    want = jax.vmap(per_client_grads(w, xs))(xs)
    np.testing.assert_allclose(summed(w, xs)[0], want.sum(0), rtol=1e-5)
    assert not np.allclose(summed(w, xs), want, atol=TOL, rtol=TOL)


def test_outputs_stay_split_over_the_devices():
    xs = jnp.arange(16.0).reshape(8, 2)
    plan = parallel.Plan(1, mesh(8))
    out = jax.jit(lambda x: parallel.map_clients(lambda c: c * 2.0, x, plan))(xs)
    assert out.sharding.is_equivalent_to(parallel.cohort_sharding(plan), 2)
    np.testing.assert_array_equal(out, xs * 2.0)


def test_client_mesh_checks_the_device_count_and_axis():
    assert parallel.client_mesh().size == 8
    assert parallel.client_mesh(3).axis_names == (parallel.CLIENTS,)
    with pytest.raises(ValueError, match="asked for 9 devices but 8 are available"):
        parallel.client_mesh(9)
    with pytest.raises(ValueError, match="asked for 0 devices"):
        parallel.client_mesh(0)
    other = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    with pytest.raises(ValueError, match="needs an axis named 'clients'"):
        jax.jit(lambda x: parallel.map_clients(lambda c: c, x, parallel.Plan(1, other)))(
            jnp.ones(4))


def test_plan_with_mesh_is_hashable_and_a_static_argument():
    a, b = parallel.Plan(2, mesh(4)), parallel.Plan(2, mesh(4))
    assert a == b and hash(a) == hash(b) and a != parallel.Plan(2, mesh(2))
    f = jax.jit(lambda x, plan: parallel.map_clients(lambda c: c + 1, x, plan), static_argnums=1)
    np.testing.assert_array_equal(f(jnp.zeros(5), a), jnp.ones(5))


# ---------------------------------------------------------------- placement helpers


def test_local_slots_global_clients_and_local_copy_on_one_process():
    plan = parallel.Plan(1, mesh(4))
    assert parallel.local_slots(8, plan) == range(8)  # one process holds every slot
    with pytest.raises(ValueError, match="do not split evenly over 4 devices"):
        parallel.local_slots(6, plan)
    x = np.arange(24.0).reshape(8, 3)
    g = parallel.global_clients({"x": x}, plan, 8)["x"]
    assert g.sharding == parallel.cohort_sharding(plan)
    assert [s.data.shape for s in g.addressable_shards] == [(2, 3)] * 4
    np.testing.assert_array_equal(g, x)
    r = parallel.replicate({"w": jnp.ones(3), "k": jax.random.key(0)}, plan)
    assert r["w"].sharding == parallel.replicated(plan) and len(r["w"].devices()) == 4
    local = parallel.local_copy(r)
    assert len(local["w"].devices()) == 1 and len(local["k"].devices()) == 1
    np.testing.assert_array_equal(jax.random.key_data(local["k"]),
                                  jax.random.key_data(jax.random.key(0)))
    assert len(parallel.local_copy(g).devices()) == 1
    assert parallel.shard_clients(x[:6], plan) is not None
    assert not isinstance(parallel.shard_clients(x[:6], plan), jax.Array)  # 6 % 4: left as is


# -------------------------------------------------------------------- whole rounds


def cohorts(data, clients, rounds=3):
    return [pack_cohort(data, list(range(clients)), 2, 1, seed=0, round_num=r)
            for r in range(rounds)]


def run_rounds(alg, model, plan, cohorts_, stateful=False):
    """Rounds as the facade runs them: the state replicated on the mesh, outputs too."""
    step = jit_round(alg, model, plan)
    state = parallel.replicate(alg.init(model.init(jax.random.key(1))), plan)
    for r, cohort in enumerate(cohorts_):
        assert client_state.has_stores(state) == stateful
        state, metrics = step(state, cohort, jax.random.fold_in(jax.random.key(7), r))
    return state, metrics


ALGORITHMS = {
    "fedavg": (lambda: fedavg(optax.sgd(0.5), optax.adam(0.05)), False),
    "scaffold": (lambda: scaffold(optax.sgd(0.3), 1.0, client_learning_rate=0.3,
                                  num_clients=len(SIZES)), True),
    "median": (lambda: fedavg(optax.sgd(0.5), optax.sgd(1.0),
                              aggregator=aggregators.build("coordinate_median")), False),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
@pytest.mark.parametrize("devices, chunk, clients", [(8, 1, 8), (3, 1, 11), (2, 3, 11)])
def test_rounds_over_devices_match_one_device(name, devices, chunk, clients):
    make, stateful = ALGORITHMS[name]
    model, data = tiny_softmax_model(), unequal_clients(sizes=SIZES)
    cs = cohorts(data, clients)
    alg = make()
    want, want_metrics = run_rounds(alg, model, parallel.Plan(chunk), cs, stateful)
    plan = parallel.Plan(chunk, mesh(devices))
    got, got_metrics = run_rounds(alg, model, plan, cs, stateful)
    close(got, want, TOL)
    close(got_metrics, want_metrics, TOL)
    leaf = jax.tree.leaves(got)[0]
    assert leaf.sharding == parallel.replicated(plan)  # the state sits whole on every device
    if stateful:  # SCAFFOLD's per-client control variates, one store row per client
        rows = np.asarray(got.store.rows["w"])[:clients]
        assert np.abs(rows).sum(axis=(1, 2)).min() > 0  # every client trained and kept its c_i


def with_domains(data):
    from fedjax_core.data import InMemoryFederatedData
    return InMemoryFederatedData({
        cid: {**data.get_client(i), "domain_id": np.full(n, i % 2, np.int32)}
        for i, (cid, n) in enumerate(zip(data.client_ids, data.client_sizes))})


@pytest.mark.parametrize("name", ["adam_clients", "fedsgd", "mime", "agnostic_fedavg"])
def test_kernels_that_create_arrays_like_the_closed_over_params(name):
    """Client optimizers with state (`adam.init` is `zeros_like(params)`), FedSGD's and
    Mime's full-batch gradients (`zeros_like(params)`) and AFL's domain weights, all
    inside the shard_map, of values the kernel closes over (see `jit_replicated`)."""
    from fedjax_core.algorithms import registry
    model, data = tiny_softmax_model(), with_domains(unequal_clients(sizes=SIZES))
    if name == "adam_clients":
        alg = fedavg(optax.adam(0.05), optax.sgd(1.0))
    else:
        entry = registry.get(name)
        facts = {"num_clients": len(SIZES), "num_domains": 2, "client_learning_rate": 0.3}
        alg = registry.build(name, optax.sgd(0.3), 1.0, **{k: facts[k] for k in entry.needs})
    cs = cohorts(data, 11, rounds=2)
    want, _ = run_rounds(alg, model, parallel.Plan(), cs)
    got, _ = run_rounds(alg, model, parallel.Plan(2, mesh(3)), cs)
    close(got, want, TOL)
