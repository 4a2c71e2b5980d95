"""Differentially private runs: DP-FedAvg's aggregator and the accountant of the sampling used.

A private run (`--noise-multiplier` or `--dp-epsilon`, with `--clip` and `--dp-delta`)
aggregates with DP-FedAvg (McMahan et al. 2018): each client's update clipped to L2 norm C,
summed, Gaussian noise of std z C added, divided by the expected cohort size m. The
accountant is chosen from the sampling that actually runs:

    --sampling poisson   each client with probability q = m / N  ->  Poisson-sampled Gaussian
    --sampling uniform   m of N without replacement               ->  sampled without replacement

With `--noise-cohort-size M` the simulation trains m clients per round but adds the noise a
cohort of M would need (noise std z C m / M on the sum, z C / M on the mean): the privacy
claimed is that of a deployment with cohorts of M at the same sampling rate, i.e. a
population of N M / m clients, which is what the accountant is given (and what the run's
header says).
"""

from typing import NamedTuple

from fedjax_api.config import ExperimentConfig
from fedjax_api.errors import ConfigError
from fedjax_core.aggregate.base import Aggregator


class PrivacySetup(NamedTuple):
    """What a private run uses.

    Attributes:
      aggregator: the DP aggregator (`fedjax_core.aggregate.privacy.gaussian` or
        `adaptive_gaussian`).
      ledger: `fedjax_core.privacy.PrivacyLedger`, epsilon after each round.
      noise_multiplier: z, given or calibrated.
      sampling: the accountant's `PoissonSampling` or `FixedSizeSampling`.
      poisson_rate: q for Poisson sampling, None for fixed-size cohorts.
      description: one line for logs.
    """

    aggregator: Aggregator
    ledger: object
    noise_multiplier: float
    sampling: object
    poisson_rate: float | None
    description: str


def _accounting():
    try:
        from fedjax_core import privacy
    except ImportError as e:  # dp-accounting missing
        raise ConfigError(f"private runs need the privacy extra ({e.name} is missing): "
                          "pip install 'fedjax-sim[privacy]'") from None
    return privacy


def setup(cfg: ExperimentConfig, num_clients: int) -> PrivacySetup:
    """The aggregator, accountant and noise of a private `cfg` over `num_clients` clients.

    Calibrates the noise multiplier for `cfg.dp_epsilon` when it is given (the smallest z
    whose epsilon after `cfg.rounds` rounds is at most the target).

    Example:
      >>> dp = setup(config.resolve("synthetic", dp_epsilon=2, dp_delta=1e-6, clip=1.0), 100)
      >>> dp.noise_multiplier, dp.ledger.epsilon_after(10)
    """
    from fedjax_core.aggregate import privacy as dp_agg

    delta, clip, epsilon = cfg.dp_delta, cfg.clip, cfg.dp_epsilon
    if delta is None or clip is None or (epsilon is None and cfg.noise_multiplier is None):
        raise ConfigError("a private run needs --dp-delta, --clip and --noise-multiplier or "
                          "--dp-epsilon")
    privacy = _accounting()
    m = cfg.clients_per_round
    cohort = cfg.noise_cohort_size or m
    population = num_clients * cohort / m
    if cfg.sampling == "poisson":
        rate = m / num_clients
        sampling = privacy.PoissonSampling(rate)
        how = f"Poisson sampling q = {rate:.4g}"
    else:
        rate = None
        sampling = privacy.FixedSizeSampling(round(population), cohort)
        how = f"{cohort} of {round(population)} clients without replacement"
    try:
        if cfg.noise_multiplier is not None:
            z = cfg.noise_multiplier
            how_z = f"noise multiplier {z:.4g}"
        else:
            assert epsilon is not None  # checked above
            z = privacy.calibrate_noise(epsilon, delta, sampling, cfg.rounds, cfg.dp_accountant)
            how_z = (f"noise multiplier {z:.4g} calibrated for epsilon {epsilon:g} "
                     f"after {cfg.rounds} rounds")
        ledger = privacy.PrivacyLedger(z, sampling, delta, cfg.dp_accountant)
        noise_cohort = cfg.noise_cohort_size if cfg.noise_cohort_size != m else None
        if cfg.adaptive_clip:
            aggregator = dp_agg.adaptive_gaussian(
                initial_clip_norm=clip, noise_multiplier=z, expected_clients=m,
                noise_cohort_size=noise_cohort)
        else:
            aggregator = dp_agg.gaussian(clip_norm=clip, noise_multiplier=z,
                                         expected_clients=m, noise_cohort_size=noise_cohort)
    except ValueError as e:
        raise ConfigError(f"cannot set up the private run: {e}") from None
    clip = f"adaptive clip from {cfg.clip:g}" if cfg.adaptive_clip else f"clip {cfg.clip:g}"
    noise_for = ""
    if noise_cohort:
        noise_for = (f"; noise as for cohorts of {cohort} clients (population "
                     f"{round(population)}), simulating {m} per round")
    description = (f"DP-FedAvg: {clip}, {how_z}, {how}, delta {cfg.dp_delta:g}, "
                   f"{cfg.dp_accountant} accountant{noise_for}")
    return PrivacySetup(aggregator, ledger, float(z), sampling, rate, description)
