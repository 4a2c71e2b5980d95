"""`fedjax privacy epsilon | noise`: privacy accounting of DP training with dp-accounting.

Sampling is Poisson with `--sampling-rate Q`, or fixed-size cohorts with
`--population N --cohort M`. The accounting itself lives in `fedjax_core.privacy`, imported
only when a command runs (dp-accounting is the optional "privacy" extra and slow to import).
"""

import math
from typing import Annotated, Optional

import typer

from cli.common import console, user_errors
from fedjax_api.errors import ConfigError, unknown

ACCOUNTANTS = ("rdp", "pld")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Privacy accounting (RDP or PLD, Google's dp-accounting): "
                       "epsilon of a DP run, or the noise for a target epsilon.")

SamplingRate = Annotated[Optional[float], typer.Option(
    help="Poisson sampling: the probability Q in (0, 1] that a client joins a round.")]
Population = Annotated[Optional[int], typer.Option(
    help="Fixed-size cohorts (with --cohort): the number of clients N sampled from.")]
Cohort = Annotated[Optional[int], typer.Option(
    help="Fixed-size cohorts (with --population): the clients M per round, drawn "
         "uniformly without replacement.")]
Rounds = Annotated[Optional[int], typer.Option(help="Training rounds T.")]
Delta = Annotated[Optional[float], typer.Option(
    help="delta in (0, 1), e.g. below 1 / number of clients.")]
Accountant = Annotated[str, typer.Option(
    help="rdp (Renyi DP; both samplings) or pld (privacy loss distributions; tighter, "
         "slower, Poisson sampling only).")]


def _accounting():
    try:
        from fedjax_core.privacy import accounting
    except ImportError as e:
        raise ConfigError(str(e)) from None
    return accounting


def _require(value, option: str):
    if value is None:
        raise ConfigError(f"{option} is required")
    return value


def _sampling(acc, sampling_rate, population, cohort, accountant):
    """PoissonSampling or FixedSizeSampling from the options, or a ConfigError."""
    if sampling_rate is not None and (population is not None or cohort is not None):
        raise ConfigError("give either --sampling-rate (Poisson sampling) or --population and "
                          "--cohort (fixed-size cohorts), not both")
    if sampling_rate is not None:
        if not 0 < sampling_rate <= 1:
            raise ConfigError(f"--sampling-rate must be in (0, 1], got {sampling_rate}")
        return acc.PoissonSampling(sampling_rate)
    if population is None and cohort is None:
        raise ConfigError("give --sampling-rate Q (Poisson sampling) or --population N "
                          "--cohort M (fixed-size cohorts)")
    if population is None or cohort is None:
        raise ConfigError("--population and --cohort go together: give both "
                          "(or --sampling-rate instead)")
    if population < 1:
        raise ConfigError(f"--population must be at least 1, got {population}")
    if not 1 <= cohort <= population:
        raise ConfigError(f"--cohort must be between 1 and --population ({population}), "
                          f"got {cohort}")
    if accountant == "pld":
        raise ConfigError("--accountant pld does not support fixed-size cohorts (sampling "
                          "without replacement) in dp-accounting; use --accountant rdp, or "
                          "--sampling-rate for Poisson sampling")
    return acc.FixedSizeSampling(population, cohort)


def _common(rounds, delta, accountant) -> tuple[int, float, str]:
    rounds = _require(rounds, "--rounds")
    if rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {rounds}")
    delta = _require(delta, "--delta")
    if not 0 < delta < 1:
        raise ConfigError(f"--delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise unknown("accountant", accountant, ACCOUNTANTS)
    return rounds, delta, accountant


def _round_up(x: float, digits: int = 6) -> float:
    """x rounded up to `digits` significant digits: more noise is never less private."""
    if not 0 < x < math.inf:
        return x
    scale = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return float(f"{math.ceil(x / scale - 1e-9) * scale:.{digits}g}")


def _describe(sampling, rounds: int, accountant: str) -> str:
    if hasattr(sampling, "population"):
        how = f"cohorts of {sampling.cohort} of {sampling.population} (replace-one)"
    else:
        how = f"Poisson sampling q={sampling.rate:g} (add/remove-one)"
    return f"{how}, {rounds} rounds, {accountant} accountant"


@app.command()
@user_errors
def epsilon(
    noise_multiplier: Annotated[Optional[float], typer.Option(
        help="Noise std over the clip norm (0: no noise).")] = None,
    sampling_rate: SamplingRate = None,
    rounds: Rounds = None,
    delta: Delta = None,
    accountant: Accountant = "rdp",
    population: Population = None,
    cohort: Cohort = None,
) -> None:
    """Epsilon spent by T rounds of a sampled Gaussian mechanism, at delta."""
    z = _require(noise_multiplier, "--noise-multiplier")
    if not 0 <= z < math.inf:
        raise ConfigError(f"--noise-multiplier must be a finite non-negative number, got {z}")
    rounds, delta, accountant = _common(rounds, delta, accountant)
    acc = _accounting()
    sampling = _sampling(acc, sampling_rate, population, cohort, accountant)
    try:
        eps = acc.epsilon(z, sampling, rounds, delta, accountant)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    note = " (no noise: not private)" if z == 0 else ""
    console.print(f"epsilon = {eps:.6g} at delta = {delta:g}{note}", highlight=False)
    console.print(f"noise multiplier {z:g}, {_describe(sampling, rounds, accountant)}",
                  highlight=False)


@app.command()
@user_errors
def noise(
    epsilon: Annotated[Optional[float], typer.Option(help="Target epsilon > 0.")] = None,
    delta: Delta = None,
    sampling_rate: SamplingRate = None,
    rounds: Rounds = None,
    accountant: Accountant = "rdp",
    population: Population = None,
    cohort: Cohort = None,
) -> None:
    """The smallest noise multiplier whose epsilon is at most the target.

    The multiplier is printed rounded up to 6 digits; the epsilon shown is that of the
    printed value.
    """
    target = _require(epsilon, "--epsilon")
    if not 0 < target < math.inf:
        raise ConfigError(f"--epsilon must be a positive number, got {target}")
    rounds, delta, accountant = _common(rounds, delta, accountant)
    acc = _accounting()
    sampling = _sampling(acc, sampling_rate, population, cohort, accountant)
    try:
        z = _round_up(acc.calibrate_noise(target, delta, sampling, rounds, accountant))
        eps = acc.epsilon(z, sampling, rounds, delta, accountant)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    console.print(f"noise multiplier = {z:.6g}", highlight=False)
    console.print(f"epsilon = {eps:.6g} at delta = {delta:g} (target {target:g})",
                  highlight=False)
    console.print(_describe(sampling, rounds, accountant), highlight=False)
