import json

import jax
import jax.flatten_util
import numpy as np
import optax
import pytest

from fedjax_api import Client, ConfigError, Experiment, Server, config, tasks
from fedjax_api.rundir import read_metrics
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from tests.fedjax_api.tiny_task import NAME


def test_paper_like_script_runs_and_matches_the_core_loop():
    task = tasks.get(NAME)
    alg = fedavg(client_optimizer=optax.sgd(0.5), server_optimizer=optax.adam(1e-2))
    server = Server.create(alg, task.model, seed=0)
    for r in range(3):
        cohort = task.train.sample(clients=3, round=r)
        server = server.step(cohort)
    metrics = server.evaluate(task.test)
    assert server.round == 3 and 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num_examples"] == 7

    # The same rounds through the core API with the documented keys give the same bits.
    key = jax.random.key(0)
    state = alg.init(jax.jit(task.model.init)(jax.random.fold_in(key, 2**31 - 1)))
    step = jit_round(alg, task.model)
    for r in range(3):
        state, _ = step(state, task.train.sample(clients=3, round=r), jax.random.fold_in(key, r))
    jax.tree.map(np.testing.assert_array_equal, state.params, server.params)


def test_server_is_immutable():
    task = tasks.get(NAME)
    s0 = Server.create(fedavg(optax.sgd(0.5)), task.model)
    s1 = s0.step(task.train.sample(clients=2, round=0))
    assert s0.round == 0 and s1.round == 1
    with pytest.raises(AttributeError):
        s1.round = 5


def test_client_train_equals_a_one_client_round():
    """Client.train(seed, round, slot=0) trains exactly as slot 0 of that round does."""
    from fedjax_core.data import pack_cohort

    task = tasks.get(NAME, seed=4)
    params = task.model.init(jax.random.key(0))
    idx = 2
    client = Client(id=task.train.data.client_ids[idx], data=task.train.data.get_client(idx))
    update = client.train(params, model=task.model, optimizer=optax.sgd(0.5), batch_size=2,
                          seed=4, round=2, slot=0)
    assert float(update.weight) == 9 and float(update.stats.examples_seen) == 9
    # A one-client FedAvg round with server sgd(1.0) lands on w - delta.
    alg = fedavg(optax.sgd(0.5), optax.sgd(1.0))
    one = pack_cohort(task.train.data, [idx], 2, 1, seed=4, round_num=2)
    key = jax.random.fold_in(jax.random.key(4), 2)
    state, _ = jit_round(alg, task.model)(alg.init(params), one, key)
    jax.tree.map(lambda w, d, n: np.testing.assert_allclose(w - d, n, atol=1e-6),
                 params, update.delta, state.params)
    assert np.abs(jax.flatten_util.ravel_pytree(update.delta)[0]).max() > 1e-3


def test_experiment_writes_run_dir_and_is_reproducible(tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = config.resolve(NAME, rounds=4, eval_every=2, out=str(tmp_path / name))
        result = Experiment.from_config(cfg).run()
        runs.append(result)
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert saved["rounds"] == 4 and saved["task"] == NAME and saved["server_lr"] == 1.0
        records = read_metrics(tmp_path / name)
        assert [r["round"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
        assert [r["round"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
        assert not list((tmp_path / name).glob(".*tmp"))
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in h]  # noqa: E731
    assert strip(runs[0].history) == strip(runs[1].history)
    assert set(runs[0].final) == {"train", "test"} and "accuracy" in runs[0].final["test"]


def test_config_defaults_and_errors(tmp_path):
    cfg = config.resolve(NAME, algorithm="fedadam")
    assert cfg.server_lr == 0.05 and cfg.rounds == 3 and cfg.batch_size == 2
    with pytest.raises(ConfigError, match="unknown task 'nope'; choose one of: .*shakespeare-plays"):
        config.resolve("nope")
    with pytest.raises(ConfigError, match="unknown algorithm 'fedsgdx'; did you mean 'fedsgd'\\? "
                                          "choose one of: agnostic_fedavg, apfl"):
        config.resolve(NAME, algorithm="fedsgdx")
    with pytest.raises(ConfigError, match="rounds must be at least 1, got 0"):
        config.resolve(NAME, rounds=0)
    with pytest.raises(ConfigError, match="client-lr must be a non-negative number, got -0.1"):
        config.resolve(NAME, client_lr=-0.1)
    with pytest.raises(ConfigError, match="between 1 and the 6 training clients"):
        Experiment.from_config(config.resolve(NAME, clients_per_round=7))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write to output directory"):
        Experiment.from_config(config.resolve(NAME, out=str(blocker / "sub")))


def test_options_and_aggregator_reach_the_algorithm():
    cfg = config.resolve(NAME, algorithm="fedavgm", algorithm_options={"momentum": 0.5},
                         rounds=2)
    assert cfg.algorithm_options == {"momentum": 0.5} and cfg.aggregator == "mean"
    exp = Experiment.from_config(cfg)
    result = exp.run()
    # Reproduce by hand: fedavgm with momentum 0.5 from the core.
    from fedjax_core.algorithms.fedopt import fedavgm
    alg = fedavgm(optax.sgd(cfg.client_lr), cfg.server_lr, momentum=0.5)
    server = Server.create(alg, exp.task.model, seed=0)
    for r in range(2):
        server = server.step(exp.task.train.sample(cfg.clients_per_round, r))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 result.server.params, server.params)
    with pytest.raises(ConfigError, match="has no option 'mu'; its options are: momentum"):
        config.resolve(NAME, algorithm="fedavgm", algorithm_options={"mu": 0.5})
    with pytest.raises(ConfigError, match="unknown aggregator 'avg'; choose one of: .*mean"):
        config.resolve(NAME, aggregator="avg")
    with pytest.raises(ConfigError, match="aggregator 'mean' has no option 'beta'"):
        config.resolve(NAME, aggregator_options={"beta": 0.1})


def test_client_accuracy_distribution_and_personalization(tmp_path):
    cfg = config.resolve(NAME, rounds=2, personalize_steps=3)
    result = Experiment.from_config(cfg).run()
    test = result.final["test"]
    exp_task = tasks.get(NAME)
    from fedjax_core.evaluate import evaluate_per_client
    per_client = evaluate_per_client(exp_task.model, result.server.params, exp_task.test.data)
    assert test["accuracy_clients_mean"] == pytest.approx(np.mean(per_client["accuracy"]))
    assert test["accuracy_clients_worst"] == pytest.approx(np.min(per_client["accuracy"]))
    from fedjax_core.data import AlignedFederatedData
    from fedjax_core.personalization import client_distribution, finetune_evaluate
    tuned = finetune_evaluate(
        exp_task.model, result.server.params, optax.sgd(cfg.client_lr), 3,
        AlignedFederatedData(exp_task.train_eval.data, exp_task.test.data.client_ids),
        exp_task.test.data, cfg.batch_size, 4, seed=0, round_num=2)
    want = client_distribution(tuned["accuracy"], "personalized_accuracy_")
    for k, v in want.items():
        assert test[k] == pytest.approx(v)


def test_sampled_cohorts_are_ordered_by_size_and_deterministic():
    from fedjax_core.data import uniform_without_replacement
    task = tasks.get(NAME)
    train = task.train
    for r in range(5):
        cohort = train.sample(4, r)
        drawn = uniform_without_replacement(train.num_clients, 4, train.seed, r)
        assert sorted(cohort.client_index.tolist()) == sorted(drawn.tolist())  # same clients
        assert list(cohort.num_examples) == sorted(cohort.num_examples, reverse=True)
        np.testing.assert_array_equal(cohort.mask, train.sample(4, r).mask)


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetched_experiment_equals_a_plain_server_loop(depth):
    # Cohorts come from a background thread; the rounds must be exactly those of a
    # loop that samples each cohort right before its round.
    task = tasks.get(NAME)
    exp = Experiment(task=task, algorithm=fedavg(optax.sgd(0.5)), rounds=4,
                     clients_per_round=3, prefetch_depth=depth)
    result = exp.run()
    server = Server.create(fedavg(optax.sgd(0.5)), task.model, seed=0)
    for r in range(4):
        server = server.step(task.train.sample(clients=3, round=r))
    jax.tree.map(np.testing.assert_array_equal, result.server.params, server.params)
    assert set(result.host) == {"host_s", "wait_s", "hidden_fraction"}
    assert result.host["host_s"] > 0 and 0.0 <= result.host["hidden_fraction"] <= 1.0
