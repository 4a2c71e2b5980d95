"""`fedjax_core.sweep`: every member of a vmapped sweep equals its own separate run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import client_state, sweep
from fedjax_core.aggregate import registry as aggregators
from fedjax_core.algorithms import registry
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.algorithms.scaffold import scaffold
from fedjax_core.data import pack_cohort, uniform_without_replacement
from fedjax_core.data.device import device_examples, gather, index_cohort
from fedjax_core.data.pack import pad_cohort
from fedjax_core.parallel import Plan
from tests.fedjax_core.helpers import close, tiny_softmax_model, unequal_clients

MODEL = tiny_softmax_model()
DATA = unequal_clients(sizes=(5, 2, 9, 1, 4, 7))
ROUNDS = 2


def cohort_of(seed, round_num, clients=3):
    """The cohort a run with `seed` trains on in round `round_num` (batch 2, 2 epochs)."""
    idx = uniform_without_replacement(len(DATA.client_ids), clients, seed, round_num)
    return pack_cohort(DATA, idx, batch_size=2, epochs=2, seed=seed, round_num=round_num)


def separate_run(algorithm, seed, cohorts):
    """What `fedjax_api.Server` does for one run: init from fold_in(key(seed), INIT_KEY),
    then one `jit_round` per cohort with the round key fold_in(key(seed), r)."""
    key = jax.random.key(seed)
    state = algorithm.init(jax.jit(MODEL.init)(jax.random.fold_in(key, sweep.INIT_KEY)))
    step = jit_round(algorithm, MODEL)
    history = []
    for r, cohort in enumerate(cohorts):
        state, metrics = step(state, cohort, jax.random.fold_in(key, r))
        history.append(metrics)
    return state, history


def run_sweep(build, members, names, cohort_fn=cohort_of, seeds_together=1):
    """Runs `members` (tuples `(*values of names, seed)`) as one sweep for ROUNDS rounds."""
    lay = sweep.layout([m[-1] for m in members])
    hparams = {n: sweep.on_grid(lay, [m[i] for m in members]) for i, n in enumerate(names)}
    state = sweep.sweep_init(build, MODEL, lay, hparams)
    step = sweep.sweep_round(build, MODEL, seeds_together=seeds_together)
    keys = sweep.seed_keys(lay.seeds)
    history = []
    for r in range(ROUNDS):
        cohorts = sweep.stack_cohorts([cohort_fn(s, r) for s in lay.seeds])
        state, metrics = step(state, cohorts, keys, r, hparams)
        history.append(metrics)
    return lay, state, history


def check_members(lay, state, history, members, make_algorithm, cohort_fn=cohort_of):
    for k, m in enumerate(members):
        seed = m[-1]
        want_state, want_history = separate_run(
            make_algorithm(*m[:-1]), seed, [cohort_fn(seed, r) for r in range(ROUNDS)])
        close(sweep.member(state, lay, k), want_state)
        for got, want in zip(history, want_history):
            close(sweep.member(got, lay, k), want)


# Members differ in client lr, server lr and seed; seed 0 has three members, seed 1 one
# (its row is filled with copies of it).
FEDAVG_MEMBERS = [(0.1, 1.0, 0), (0.3, 1.0, 0), (0.1, 0.5, 0), (0.2, 0.7, 1)]


def build_fedavg(hp):
    return fedavg(optax.sgd(hp["client_lr"]), optax.sgd(hp["server_lr"]))


@pytest.fixture(scope="module")
def fedavg_sweep():
    """`run_sweep` of FEDAVG_MEMBERS (rows one after another): run once, checked against the
    separate runs by the next test and against the vmapped rows by the one after it."""
    return run_sweep(build_fedavg, FEDAVG_MEMBERS, ["client_lr", "server_lr"])


def test_fedavg_members_equal_their_separate_runs(fedavg_sweep):
    lay, state, history = fedavg_sweep
    assert lay.seeds == (0, 1) and lay.width == 3
    assert jax.tree.leaves(state)[0].shape[:2] == (2, 3)
    check_members(lay, state, history, FEDAVG_MEMBERS,
                  lambda c, s: fedavg(optax.sgd(c), optax.sgd(s)))
    # the members really differ: not one run copied K times
    finals = [sweep.member(state, lay, k).params["w"] for k in range(len(FEDAVG_MEMBERS))]
    assert min(float(jnp.max(jnp.abs(a - b))) for i, a in enumerate(finals)
               for b in finals[i + 1:]) > 1e-3


def test_fedadam_from_the_registry_with_a_fixed_option():
    members = [(0.1, 0.05, 0), (0.3, 0.01, 0), (0.2, 0.02, 1)]

    def build(hp):
        return registry.build("fedadam", optax.sgd(hp["client_lr"]), hp["server_lr"], b2=0.999)

    lay, state, history = run_sweep(build, members, ["client_lr", "server_lr"])
    check_members(lay, state, history, members,
                  lambda c, s: registry.build("fedadam", optax.sgd(c), s, b2=0.999))


def test_an_algorithm_option_can_be_swept():
    members = [(0.0, 0), (0.9, 0)]  # FedAvgM's server momentum

    def build(hp):
        return registry.build("fedavgm", optax.sgd(0.2), 1.0, momentum=hp["momentum"])

    lay, state, history = run_sweep(build, members, ["momentum"])
    check_members(lay, state, history, members,
                  lambda m: registry.build("fedavgm", optax.sgd(0.2), 1.0, momentum=m))


def test_rows_under_vmap_equal_rows_one_after_another(fedavg_sweep):
    names = ["client_lr", "server_lr"]
    _, mapped, _ = fedavg_sweep
    _, vmapped, _ = run_sweep(build_fedavg, FEDAVG_MEMBERS, names, seeds_together=2)
    close(vmapped, mapped)


def test_cohorts_of_different_sizes_are_padded_without_changing_a_member():
    def cohort_fn(seed, r):  # seed 1 draws 2 clients, seed 0 draws 4: as Poisson sampling can
        return cohort_of(seed, r, clients=2 if seed == 1 else 4)

    members = [(0.1, 1.0, 0), (0.3, 1.0, 1)]

    def build(hp):
        return fedavg(optax.sgd(hp["client_lr"]), optax.sgd(hp["server_lr"]))

    lay, state, history = run_sweep(build, members, ["client_lr", "server_lr"], cohort_fn)
    check_members(lay, state, history, members,
                  lambda c, s: fedavg(optax.sgd(c), optax.sgd(s)), cohort_fn)


def test_device_resident_cohorts_share_their_examples():
    examples = device_examples(DATA)

    def indexed(seed, r):
        idx = uniform_without_replacement(len(DATA.client_ids), 3, seed, r)
        return index_cohort(examples, idx, batch_size=2, epochs=2, seed=seed, round_num=r)

    stacked = sweep.stack_cohorts([indexed(0, 0), pad_cohort(indexed(1, 0), 3)])
    assert stacked.batches.source is examples.features
    assert stacked.batches.index.shape[:2] == (2, 3)
    np.testing.assert_array_equal(
        gather(stacked.batches)["x"][1][stacked.mask[1]],
        cohort_of(1, 0).batches["x"][cohort_of(1, 0).mask])

    members = [(0.1, 1.0, 0), (0.3, 0.5, 1)]

    def build(hp):
        return fedavg(optax.sgd(hp["client_lr"]), optax.sgd(hp["server_lr"]))

    lay, state, history = run_sweep(build, members, ["client_lr", "server_lr"], indexed)
    check_members(lay, state, history, members,
                  lambda c, s: fedavg(optax.sgd(c), optax.sgd(s)))  # against dense cohorts


def test_stack_cohorts_pads_clients_and_steps():
    a = pack_cohort(DATA, [2, 0], batch_size=2, epochs=1, seed=0, round_num=0)  # 9, 5 ex.
    b = pack_cohort(DATA, [1], batch_size=2, epochs=1, seed=0, round_num=0)  # 2 examples
    assert (a.num_steps, b.num_steps) == (6, 1)
    s = sweep.stack_cohorts([a, b])
    assert s.mask.shape == (2, 2, 6, 2) and s.batches["x"].shape == (2, 2, 6, 2, 3)
    np.testing.assert_array_equal(s.mask[0], a.mask)
    assert s.mask[1, 0, 0].all() and not s.mask[1, 0, 1:].any() and not s.mask[1, 1].any()
    assert s.client_index.tolist() == [[2, 0], [1, -1]]
    assert s.num_examples.tolist() == [[9, 5], [2, 0]]


def test_layout_and_grid():
    lay = sweep.layout([0, 0, 1, 1, 1])
    assert lay.seeds == (0, 1) and lay.width == 3
    assert lay.cells.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]]
    assert lay.filler.tolist() == [[False, False, True], [False, False, False]]
    grid = sweep.on_grid(lay, [0.5, 0.25, 2.0, 3.0, 4.0])
    assert grid.dtype == np.float32
    assert grid.tolist() == [[0.5, 0.25, 0.5], [2.0, 3.0, 4.0]]  # filler copies its row's first
    assert sweep.on_grid(lay, [1, 2, 3, 4, 5]).dtype == np.int32
    with pytest.raises(ValueError, match="one value per member"):
        sweep.on_grid(lay, [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one member"):
        sweep.layout([])


def test_seed_keys_are_the_runs_keys():
    keys = sweep.seed_keys([0, 7, 2**40])
    for k, seed in zip(keys, [0, 7, 2**40]):
        np.testing.assert_array_equal(jax.random.key_data(k),
                                      jax.random.key_data(jax.random.key(seed)))


def test_a_shape_setting_hyperparameter_is_refused_by_name():
    def build(hp):  # HypCluster's number of clusters sets the shape of its state
        return registry.build("hypcluster", optax.sgd(hp["client_lr"]), 1.0,
                              num_clusters=hp["num_clusters"])

    lay = sweep.layout([0, 0])
    hparams = {"client_lr": sweep.on_grid(lay, [0.1, 0.2]),
               "num_clusters": sweep.on_grid(lay, [2, 3])}
    with pytest.raises(sweep.SweepError, match=r"cannot sweep 'num_clusters': .*shape or a "
                                               r"Python branch.*one value"):
        sweep.sweep_init(build, MODEL, lay, hparams)


def test_a_branching_hyperparameter_is_refused_at_the_first_round():
    def build(hp):  # q-FFL branches on its client learning rate in every round
        return registry.build("qffl", optax.sgd(hp["client_lr"]), hp["server_lr"],
                              client_learning_rate=hp["client_lr"])

    members = [(0.1, 1.0, 0), (0.2, 0.5, 0)]
    with pytest.raises(sweep.SweepError, match=r"cannot sweep 'client_lr': .*Python branch"):
        run_sweep(build, members, ["client_lr", "server_lr"])


def test_an_algorithm_that_computes_while_built_is_refused_unless_only_seeds_differ():
    def build(hp):  # FedNova checks its client optimizer by running it when it is built
        lr = hp.get("client_lr", 0.1)
        return registry.build("fednova", optax.sgd(lr), 1.0, client_learning_rate=lr)

    with pytest.raises(sweep.SweepError, match=r"cannot sweep 'client_lr': .*while it is "
                                               r"built.*only the seed"):
        run_sweep(build, [(0.1, 0), (0.2, 0)], ["client_lr"])
    members = [(0,), (1,)]  # seeds only: built once, outside the program
    lay, state, history = run_sweep(build, members, [])
    check_members(lay, state, history, members,
                  lambda: registry.build("fednova", optax.sgd(0.1), 1.0,
                                         client_learning_rate=0.1))


@pytest.mark.parametrize("make", [
    lambda lr: scaffold(optax.sgd(lr), 1.0, client_learning_rate=0.1, num_clients=6),
    lambda lr: fedavg(optax.sgd(lr), aggregator=aggregators.build("top_k")),  # error feedback
], ids=["scaffold", "fedavg+top_k"])
def test_an_algorithm_with_per_client_state_is_refused(make):
    def build(hp):
        return make(hp["client_lr"])

    lay = sweep.layout([0, 0])
    hparams = {"client_lr": sweep.on_grid(lay, [0.1, 0.2])}
    with pytest.raises(sweep.SweepError, match=r"cannot sweep an algorithm that keeps state "
                                               r"per client.*separate runs"):
        sweep.sweep_init(build, MODEL, lay, hparams)
    # A state built elsewhere is refused by the round too.
    state = make(0.1).init(MODEL.init(jax.random.key(0)))
    assert client_state.has_stores(state)
    state = jax.tree.map(lambda x: jnp.stack([jnp.stack([x, x])]), state)
    with pytest.raises(sweep.SweepError, match="keeps state per client"):
        sweep.sweep_round(build, MODEL)(state, sweep.stack_cohorts([cohort_of(0, 0)]),
                                         sweep.seed_keys([0]), 0, hparams)


def test_errors_that_are_not_about_sweeping_pass_through():
    def build(hp):
        raise RuntimeError("broken algorithm")

    lay = sweep.layout([0])
    with pytest.raises(RuntimeError, match="broken algorithm"):
        sweep.sweep_init(build, MODEL, lay, {"client_lr": sweep.on_grid(lay, [0.1])})


def test_plan_chunks_inside_a_member():
    def build(hp):
        return fedavg(optax.sgd(hp["client_lr"]), optax.sgd(1.0))

    members = [(0.1, 0), (0.3, 0)]
    lay = sweep.layout([0, 0])
    hparams = {"client_lr": sweep.on_grid(lay, [0.1, 0.3])}
    state = sweep.sweep_init(build, MODEL, lay, hparams)
    step = sweep.sweep_round(build, MODEL, Plan(chunk_size=2))
    state, _ = step(state, sweep.stack_cohorts([cohort_of(0, 0)]), sweep.seed_keys([0]), 0,
                    hparams)
    for k, (lr, seed) in enumerate(members):
        want, _ = separate_run(fedavg(optax.sgd(lr), optax.sgd(1.0)), seed, [cohort_of(0, 0)])
        close(sweep.member(state, lay, k), want)
