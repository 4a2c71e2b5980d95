"""Private runs through the facade: the sampling that runs is the sampling accounted."""

import jax
import numpy as np
import pytest

from fedjax_api import ConfigError, Experiment, config
from fedjax_core import privacy
from fedjax_core.aggregate import privacy as dp_agg
from tests.fedjax_api.tiny_task import NAME


@pytest.mark.parametrize("sampling", ["poisson", "uniform"])
def test_calibrated_run_spends_the_target_epsilon(sampling):
    cfg = config.resolve(NAME, rounds=4, clients_per_round=3, sampling=sampling, clip=0.5,
                         dp_epsilon=8.0, dp_delta=1e-3)
    exp = Experiment.from_config(cfg)
    dp = exp.privacy
    expected = (privacy.PoissonSampling(3 / 6) if sampling == "poisson"
                else privacy.FixedSizeSampling(6, 3))
    assert dp.sampling == expected
    assert exp.config["resolved"]["noise_multiplier"] == dp.noise_multiplier > 0
    assert privacy.epsilon(dp.noise_multiplier, expected, 4, 1e-3) == pytest.approx(8.0, rel=0.01)
    result = exp.run()
    train = [r for r in result.history if r["kind"] == "train"]
    eps = [r["privacy/epsilon"] for r in train]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(8.0, rel=0.01)
    for r, e in enumerate(eps, start=1):
        assert e == pytest.approx(privacy.epsilon(dp.noise_multiplier, expected, r, 1e-3))
    # DP-FedAvg's metrics: the noise on the mean is z C / m.
    assert train[0]["privacy/noise_std"] == pytest.approx(dp.noise_multiplier * 0.5 / 3, rel=1e-6)
    if sampling == "poisson":  # the Poisson draw of each round is the cohort that trained
        from fedjax_core.data.sampling import poisson
        sizes = [len(poisson(6, 0.5, seed=0, round_num=r)) for r in range(4)]
        assert [r["privacy/num_clients"] for r in train] == sizes
        assert len(set(sizes)) > 1


def test_private_round_equals_dp_aggregator_by_hand():
    """With a given noise multiplier the run is fedavg with DP-FedAvg's aggregator."""
    cfg = config.resolve(NAME, rounds=2, clients_per_round=3, clip=0.3, noise_multiplier=0.7,
                         dp_delta=1e-3)
    exp = Experiment.from_config(cfg)
    result = exp.run()
    import optax

    from fedjax_api import Server, tasks
    from fedjax_core.algorithms.fedavg import fedavg
    task = tasks.get(NAME)
    alg = fedavg(optax.sgd(cfg.client_lr), optax.sgd(cfg.server_lr),
                 aggregator=dp_agg.gaussian(0.3, 0.7, expected_clients=3))
    server = Server.create(alg, task.model, seed=0)
    for r in range(2):
        server = server.step(task.train.sample(3, r))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 result.server.params, server.params)


def test_noise_for_a_larger_cohort_is_stated_and_accounted():
    cfg = config.resolve(NAME, rounds=2, clients_per_round=3, clip=1.0, noise_multiplier=1.0,
                         dp_delta=1e-3, noise_cohort_size=30)
    exp = Experiment.from_config(cfg)
    assert exp.privacy.sampling == privacy.FixedSizeSampling(60, 30)
    assert "noise as for cohorts of 30 clients (population 60), simulating 3" in \
        exp.privacy.description
    result = exp.run()
    # Noise std on the mean is that of a cohort of 30: z C / 30.
    assert result.history[0]["privacy/noise_std"] == pytest.approx(1.0 / 30, rel=1e-6)


@pytest.mark.parametrize("options, message", [
    (dict(clip=1.0), "--clip only applies to a private run"),
    (dict(noise_multiplier=1.0, clip=1.0), "needs --dp-delta"),
    (dict(noise_multiplier=1.0, dp_delta=1e-3), "needs --clip"),
    (dict(noise_multiplier=1.0, dp_epsilon=2.0, dp_delta=1e-3, clip=1.0), "not both"),
    (dict(noise_multiplier=1.0, dp_delta=1e-3, clip=1.0, algorithm="scaffold"),
     "algorithm 'scaffold' sends the server more"),
    (dict(noise_multiplier=1.0, dp_delta=1e-3, clip=1.0, aggregator="krum"),
     "--aggregator krum cannot be combined with DP"),
    (dict(aggregator="dp_gaussian"), "instead of --aggregator dp_gaussian"),
    (dict(dp_epsilon=1.0, dp_delta=2.0, clip=1.0), "dp-delta must be between 0 and 1"),
    (dict(dp_epsilon=1.0, dp_delta=1e-3, clip=1.0, dp_accountant="pld"),
     "PLD"),
])
def test_bad_privacy_options(options, message):
    with pytest.raises(ConfigError, match=message):
        Experiment.from_config(config.resolve(NAME, rounds=2, clients_per_round=3, **options))


def test_a_calibrated_run_resumes_again_and_again(tmp_path):
    """A run calibrated from --dp-epsilon keeps its noise multiplier on resume, and a second
    resume finds the config the first one's checkpoints recorded."""
    from fedjax_api.resume import resume_config

    cfg = config.resolve(NAME, rounds=2, clients_per_round=3, clip=0.5, dp_epsilon=8.0,
                         dp_delta=1e-3, checkpoint_every=1, eval_every=0, out=str(tmp_path))
    first = Experiment.from_config(cfg)
    first.run()
    noise = first.privacy.noise_multiplier
    for rounds in (3, 4):
        again = resume_config(tmp_path, {"rounds": rounds}, allow_changes=("rounds",))
        assert again.dp_epsilon is None and again.noise_multiplier == noise
        result = Experiment.from_config(again, resuming=True).run(resume=True)
        assert result.server.round == rounds
