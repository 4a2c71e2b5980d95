"""`fedjax privacy epsilon | noise`: figures from fedjax_core.privacy, one-line user errors."""

import re

import pytest
from typer.testing import CliRunner

from cli import privacy
from fedjax_core.privacy import FixedSizeSampling, PoissonSampling, epsilon

runner = CliRunner()


def flat(res) -> str:
    """The output with line wrapping undone (rich wraps at the terminal width)."""
    return " ".join(res.output.split())


def number_after(label: str, text: str) -> float:
    return float(re.search(rf"{label} = (\S+)", text).group(1))


POISSON = ["--sampling-rate", "0.01", "--rounds", "1000", "--delta", "1e-5"]
FIXED = ["--population", "1000", "--cohort", "10", "--rounds", "200", "--delta", "1e-5"]


@pytest.mark.parametrize("args, sampling, rounds, accountant", [
    (POISSON, PoissonSampling(0.01), 1000, "rdp"),
    (POISSON + ["--accountant", "pld"], PoissonSampling(0.01), 1000, "pld"),
    (FIXED, FixedSizeSampling(1000, 10), 200, "rdp"),
])
def test_epsilon_prints_the_accountants_figure(args, sampling, rounds, accountant):
    res = runner.invoke(privacy.app, ["epsilon", "--noise-multiplier", "1.1", *args])
    assert res.exit_code == 0, res.output
    expected = epsilon(1.1, sampling, rounds, 1e-5, accountant)
    assert number_after("epsilon", flat(res)) == pytest.approx(expected, rel=1e-5)
    assert f"{rounds} rounds, {accountant} accountant" in flat(res)
    assert ("replace-one" in flat(res)) == isinstance(sampling, FixedSizeSampling)


def test_epsilon_without_noise_is_infinite():
    res = runner.invoke(privacy.app, ["epsilon", "--noise-multiplier", "0", *POISSON])
    assert res.exit_code == 0, res.output
    assert "epsilon = inf at delta = 1e-05 (no noise: not private)" in flat(res)


@pytest.mark.parametrize("args, sampling, rounds", [
    (["--sampling-rate", "0.01", "--rounds", "10000"], PoissonSampling(0.01), 10_000),
    (["--population", "1000", "--cohort", "10", "--rounds", "100"],
     FixedSizeSampling(1000, 10), 100),
])
def test_noise_prints_calibrated_multiplier_and_its_epsilon(args, sampling, rounds):
    res = runner.invoke(privacy.app, ["noise", "--epsilon", "2", "--delta", "1e-5", *args])
    assert res.exit_code == 0, res.output
    z = number_after("noise multiplier", flat(res))
    shown = number_after("epsilon", flat(res))
    eps = epsilon(z, sampling, rounds, 1e-5)  # the printed z, as a user would reuse it
    assert shown == pytest.approx(eps, rel=1e-5)
    assert 0.99 * 2 <= eps <= 2
    assert "(target 2)" in flat(res)


@pytest.mark.parametrize("args, message", [
    (["epsilon", "--noise-multiplier", "-1", *POISSON],
     "--noise-multiplier must be a finite non-negative number, got -1.0"),
    (["epsilon", "--noise-multiplier", "1", "--sampling-rate", "1.5", "--rounds", "10",
      "--delta", "1e-5"], "--sampling-rate must be in (0, 1], got 1.5"),
    (["epsilon", "--noise-multiplier", "1", "--sampling-rate", "-0.1", "--rounds", "10",
      "--delta", "1e-5"], "--sampling-rate must be in (0, 1], got -0.1"),
    (["epsilon", "--noise-multiplier", "1", *POISSON, "--population", "100", "--cohort", "5"],
     "give either --sampling-rate (Poisson sampling) or --population and --cohort"),
    (["epsilon", "--noise-multiplier", "1", "--population", "100", "--rounds", "10",
      "--delta", "1e-5"], "--population and --cohort go together"),
    (["epsilon", "--noise-multiplier", "1", "--rounds", "10", "--delta", "1e-5"],
     "give --sampling-rate Q (Poisson sampling) or --population N --cohort M"),
    (["epsilon", "--noise-multiplier", "1", "--population", "10", "--cohort", "20",
      "--rounds", "10", "--delta", "1e-5"],
     "--cohort must be between 1 and --population (10), got 20"),
    (["epsilon", "--noise-multiplier", "1", "--population", "-10", "--cohort", "2",
      "--rounds", "10", "--delta", "1e-5"], "--population must be at least 1, got -10"),
    (["epsilon", "--noise-multiplier", "1", *FIXED, "--accountant", "pld"],
     "--accountant pld does not support fixed-size cohorts"),
    (["epsilon", "--noise-multiplier", "1", *POISSON, "--accountant", "pdl"],
     "unknown accountant 'pdl'; did you mean 'pld'? choose one of: pld, rdp"),
    (["epsilon", *POISSON], "--noise-multiplier is required"),
    (["epsilon", "--noise-multiplier", "1", "--sampling-rate", "0.1", "--delta", "1e-5"],
     "--rounds is required"),
    (["epsilon", "--noise-multiplier", "1", "--sampling-rate", "0.1", "--rounds", "10"],
     "--delta is required"),
    (["epsilon", "--noise-multiplier", "1", "--sampling-rate", "0.1", "--rounds", "-3",
      "--delta", "1e-5"], "--rounds must be at least 1, got -3"),
    (["epsilon", "--noise-multiplier", "1", "--sampling-rate", "0.1", "--rounds", "3",
      "--delta", "1"], "--delta must be in (0, 1), got 1.0"),
    (["noise", *POISSON], "--epsilon is required"),
    (["noise", "--epsilon", "-2", *POISSON], "--epsilon must be a positive number, got -2.0"),
    (["noise", "--epsilon", "2", "--sampling-rate", "0.01", "--rounds", "10"],
     "--delta is required"),
])
def test_user_mistakes_print_one_line_and_exit_2(args, message):
    res = runner.invoke(privacy.app, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert message in lines[0]
    assert "Traceback" not in res.output
