"""Simulated time through the facade: unchanged results with the homogeneous profile, the
time/ fields, exact resume of the clock, partial work, the timeline's staleness, refusals."""

import jax
import numpy as np
import pytest

from fedjax_api import ConfigError, Experiment, config
from fedjax_api.experiment import Interrupted
from fedjax_api.resume import resume_config
from fedjax_api.simtime import clock
from fedjax_core.client import num_steps
from tests.fedjax_api.tiny_task import NAME


def same_bits(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def train_records(result):
    return [r for r in result.history if r["kind"] == "train"]


@pytest.mark.parametrize("options", [
    dict(algorithm="fedavg"), dict(algorithm="scaffold"), dict(algorithm="fednova"),
    dict(algorithm="fedbuff", algorithm_options={"staleness_source": "drawn"}),
])
def test_homogeneous_always_on_changes_nothing(options):
    plain = Experiment.from_config(config.resolve(NAME, rounds=3, **options)).run()
    timed = Experiment.from_config(config.resolve(NAME, rounds=3, devices_profile="homogeneous",
                                                  **options)).run()
    same_bits(plain.server.state, timed.server.state)
    assert not any(k.startswith("time/") for r in plain.history for k in r)
    clock_s = [r["time/simulated_s"] for r in train_records(timed)]
    rounds_s = [r["time/round_simulated_s"] for r in train_records(timed)]
    assert clock_s == pytest.approx(np.cumsum(rounds_s).tolist(), rel=1e-12)
    assert all(s > 0 for s in rounds_s)


@pytest.mark.parametrize("sampling", ["uniform", "poisson"])
def test_homogeneous_always_on_cohorts_are_todays(sampling):
    """Every synchronous algorithm's round is a function of (state, cohort, key) alone, so
    equal cohorts give every such algorithm today's results: the clock's cohorts with the
    homogeneous, always-online profile are the sampler's, every field, round after round."""
    cfg = config.resolve(NAME, rounds=6, devices_profile="homogeneous", sampling=sampling,
                         clients_per_round=3)
    train = Experiment.from_config(cfg).task.train
    c = clock(cfg, train, Experiment.from_config(cfg).task.model.init(jax.random.key(0)))
    for r in range(6):
        plain = (train.sample_poisson(3 / train.num_clients, r) if sampling == "poisson"
                 else train.sample(3, r))
        timed = c.sample(r)
        assert timed.staleness is None and plain.staleness is None
        same_bits(timed._replace(staleness=0), plain._replace(staleness=0))


def test_resume_keeps_the_simulated_clock_exact(tmp_path):
    opts = dict(rounds=5, checkpoint_every=2, devices_profile="heterogeneous",
                availability="diurnal", selection="overcommit")
    whole = Experiment.from_config(config.resolve(NAME, out=str(tmp_path / "a"), **opts)).run()
    exp = Experiment.from_config(config.resolve(NAME, out=str(tmp_path / "b"), **opts))

    def stop(record):
        if record["kind"] == "train" and record["round"] == 2:
            exp.interrupt()

    with pytest.raises(Interrupted):
        exp.run(stop)
    resumed = Experiment.from_config(resume_config(tmp_path / "b"), resuming=True).run(
        resume=True)
    same_bits(whole.server.state, resumed.server.state)
    key = ("time/simulated_s", "time/round_simulated_s", "time/clients_dropped")
    assert ([[r[k] for k in key] for r in train_records(whole)]
            == [[r[k] for k in key] for r in train_records(resumed)])


def test_partial_work_cuts_the_steps_that_miss_the_deadline():
    cfg = config.resolve(NAME, rounds=1, devices_profile="heterogeneous", selection="deadline",
                         deadline=0.05, partial_work=True, batch_size=1, clients_per_round=4)
    exp = Experiment.from_config(cfg)
    c = clock(cfg, exp.task.train, exp.task.model.init(jax.random.key(0)))
    capped = 0
    for r in range(4):
        plan, cohort = c.plan(r), c.sample(r)
        steps = [int(num_steps(m)) for m in cohort.mask[:len(plan.clients)]]
        assert steps == plan.steps.tolist()
        full = c.timeline.model.steps[plan.clients]
        capped += int(np.sum(plan.steps < full))
        assert plan.seconds <= 0.05 + 1e-12
    assert capped > 0


def test_fedbuff_trains_on_the_timelines_staleness():
    cfg = config.resolve(NAME, rounds=4, algorithm="fedbuff", devices_profile="heterogeneous",
                         clients_per_round=2, concurrency=5)
    result = Experiment.from_config(cfg).run()
    exp = Experiment.from_config(cfg)
    c = clock(cfg, exp.task.train, exp.task.model.init(jax.random.key(0)))
    for r, record in enumerate(train_records(result)):
        tau = np.minimum(c.plan(r).staleness, min(r, 4))
        assert record["fedbuff/mean_staleness"] == pytest.approx(tau.mean())
        assert c.sample(r).staleness[:2].tolist() == c.plan(r).staleness.tolist()
    assert any(c.plan(r).staleness.max() > 0 for r in range(4))


def test_fedasync_steps_once_per_arrival_on_the_timeline():
    """FedAsync (fedbuff rule=fedasync, one client per round): each server step is one
    arrival of the event timeline, trained from the version its client downloaded."""
    cfg = config.resolve(NAME, rounds=6, algorithm="fedbuff", devices_profile="heterogeneous",
                         clients_per_round=1, concurrency=4, server_lr=0.6,
                         algorithm_options={"rule": "fedasync", "staleness_fn": "hinge",
                                            "hinge_a": 1.0, "hinge_b": 1, "max_staleness": 8})
    result = Experiment.from_config(cfg).run()
    exp = Experiment.from_config(cfg)
    c = clock(cfg, exp.task.train, exp.task.model.init(jax.random.key(0)))
    records = train_records(result)
    assert len(records) == 6
    ends = []
    for r, record in enumerate(records):
        plan = c.plan(r)
        assert len(plan.clients) == 1
        assert record["fedbuff/mean_staleness"] == min(int(plan.staleness[0]), r)
        assert record["time/simulated_s"] == plan.end_s
        ends.append(plan.end_s)
    assert ends == sorted(ends) and any(c.plan(r).staleness[0] > 0 for r in range(6))


def test_clock_cohorts_go_to_the_device_like_the_samplers():
    """With a clock the loop's sampler is still `cohort_sampler`: the clock packs the
    cohort, which is then moved to the device in the prefetch thread (`to_device`)."""
    from fedjax_api.loop import cohort_sampler
    from fedjax_core.parallel import Plan

    cfg = config.resolve(NAME, rounds=1, devices_profile="heterogeneous", selection="deadline",
                         deadline=0.05, partial_work=True, batch_size=1, clients_per_round=4)
    exp = Experiment.from_config(cfg)
    c = clock(cfg, exp.task.train, exp.task.model.init(jax.random.key(0)))
    sample = cohort_sampler(exp.task.train, 4, "uniform", Plan(1), c.sample)
    host, placed = c.sample(1), sample(1)
    assert isinstance(placed.mask, jax.Array) and not isinstance(host.mask, jax.Array)
    same_bits((host.batches, host.mask, host.num_examples),
              (placed.batches, placed.mask, placed.num_examples))


@pytest.mark.parametrize("options, message", [
    (dict(selection="overcommit"), "--selection applies to simulated time"),
    (dict(devices_profile="homogeneous", selection="deadline"), "go together"),
    (dict(devices_profile="homogeneous", partial_work=True), "--partial-work needs"),
    (dict(devices_profile="homogeneous", sampling="poisson", selection="overcommit"),
     "cannot be combined with over-commit"),
    (dict(devices_profile="homogeneous", algorithm="fedbuff", selection="overcommit"),
     "runs asynchronously"),
    (dict(devices_profile="homogeneous", availability="diurnal", clip=1.0,
          noise_multiplier=1.0, dp_delta=1e-3), "needs --sampling poisson"),
    (dict(devices_profile="homogeneous", algorithm="fedbuff", sampling="poisson", clip=1.0,
          noise_multiplier=1.0, dp_delta=1e-3), "cannot be combined with asynchronous"),
])
def test_refused_combinations(options, message):
    with pytest.raises(ConfigError, match=message):
        config.resolve(NAME, **options)


def test_private_poisson_run_with_availability_is_allowed():
    cfg = config.resolve(NAME, rounds=2, devices_profile="homogeneous", availability="diurnal",
                         sampling="poisson", clip=1.0, noise_multiplier=1.0, dp_delta=1e-3)
    records = train_records(Experiment.from_config(cfg).run())
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["privacy/epsilon"] > 0 for r in records)


def test_profile_and_availability_from_csv_files(tmp_path):
    """A CSV trace names every client of the task; a name that is neither built in nor a
    file, or a CSV that leaves a client out, is one ConfigError."""
    from fedjax_api import simtime as api_simtime

    train = Experiment.from_config(config.resolve(NAME, rounds=1)).task.train
    ids = [c.decode() if isinstance(c, bytes) else str(c) for c in train.data.client_ids]
    devices, online = tmp_path / "devices.csv", tmp_path / "online.csv"
    devices.write_text("client_id,compute_s_per_example,download_mbps\n" + "".join(
        f"{c},{0.01 * (i + 1)},{10 + i}\n" for i, c in enumerate(ids)))
    online.write_text(f"client_id,start_s,end_s\n{ids[0]},0,3600\n")
    p = api_simtime.profiles(str(devices), train, seed=0)
    np.testing.assert_allclose(p.compute_s, [0.01 * (i + 1) for i in range(len(ids))])
    a = api_simtime.availability(str(online), train, seed=0)
    assert type(a).__name__ == "IntervalTrace"
    with pytest.raises(ConfigError, match="--devices-profile 'fast' is neither homogeneous "
                                          "nor heterogeneous nor a CSV file"):
        api_simtime.profiles("fast", train, seed=0)
    with pytest.raises(ConfigError, match="--availability 'nightly' is neither always nor "
                                          "diurnal nor a CSV file"):
        api_simtime.availability("nightly", train, seed=0)
    devices.write_text(f"client_id,compute_s_per_example,download_mbps\n{ids[0]},0.1,5\n")
    with pytest.raises(ConfigError, match="has no row for"):
        api_simtime.profiles(str(devices), train, seed=0)
