"""Privacy accounting: dp-accounting's figures, closed forms by hand, calibration, ledger."""

import itertools
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize, stats

from fedjax_core.privacy import (
    FixedSizeSampling,
    PoissonSampling,
    PrivacyLedger,
    calibrate_noise,
    dp_event,
    effective_noise_multiplier,
    epsilon,
    neighboring_relation,
    value_noise_multiplier,
)

NR = dp_accounting.NeighboringRelation
G = dp_accounting.GaussianDpEvent

# dp-accounting's default RDP orders, written out: 1.1, 1.2, ..., 10.9, 11, ..., 63, 128, ..., 1024.
ORDERS = np.array([1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024],
                  dtype=np.float64)


def rdp_to_epsilon_by_hand(rdp: np.ndarray, delta: float) -> float:
    """The RDP -> (epsilon, delta) conversion, in numpy over the orders.

    eps(a) = rdp(a) + log1p(-1/a) - log(delta a) / (a - 1)   (Balle et al. 2020, Thm 21),
    or 0 where the KL bound delta >= sqrt(1 - exp(-rdp(a))) already holds; epsilon is the
    minimum over the orders, at least 0.
    """
    a = ORDERS
    eps = rdp + np.log1p(-1 / a) - np.log(delta * a) / (a - 1)
    eps = np.where(delta**2 + np.expm1(-rdp) > 0, 0.0, eps)
    return max(0.0, float(eps.min()))


def gaussian_epsilon_exact(mu: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with sensitivity / std = mu (Balle & Wang 2018):
    delta(eps) = Phi(mu / 2 - eps / mu) - e^eps Phi(-mu / 2 - eps / mu)."""
    def gap(eps):
        return (stats.norm.cdf(mu / 2 - eps / mu)
                - math.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu) - delta)
    return optimize.brentq(gap, 0.0, 100.0, xtol=1e-12)


# ----------------------------------------------------------------------------- sampling


def test_sampling_fields_and_validation():
    assert PoissonSampling(0.25) == (0.25,) and PoissonSampling(1).rate == 1.0
    s = FixedSizeSampling(population=400, cohort=10)
    assert (s.population, s.cohort, s.rate) == (400, 10, 0.025)
    assert FixedSizeSampling(5, 5).rate == 1.0
    for bad in (0, -0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="sampling rate must be a number in"):
            PoissonSampling(bad)
    with pytest.raises(ValueError, match="population must be a positive integer"):
        FixedSizeSampling(0, 1)
    with pytest.raises(ValueError, match="cohort must be a positive integer"):
        FixedSizeSampling(10, 2.5)
    with pytest.raises(ValueError, match=r"cohort must be at most the population \(10\), got 11"):
        FixedSizeSampling(10, 11)
    assert neighboring_relation(PoissonSampling(0.1)) is NR.ADD_OR_REMOVE_ONE
    assert neighboring_relation(FixedSizeSampling(10, 2)) is NR.REPLACE_ONE


# ----------------------------------------------------------------------------- events


def test_dp_event_structure():
    assert dp_event(1.5, PoissonSampling(0.01), 7) == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.01, G(1.5)), 7)
    # Replace-one: a sum of norm-C updates moves by up to 2C, so the event carries z / 2.
    assert dp_event(1.5, FixedSizeSampling(100, 4), 7) == dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(100, 4, G(0.75)), 7)
    assert dp_event([3.0, 4.0], PoissonSampling(0.5), 2).event.event == G(2.4)  # (1/9+1/16)^-1/2
    assert dp_event(1.0, PoissonSampling(0.1), 0) == dp_accounting.NoOpDpEvent()
    assert dp_event(0.0, PoissonSampling(0.1), 3) == dp_accounting.NonPrivateDpEvent()
    assert dp_event([2.0, 0.0], FixedSizeSampling(9, 3), 3) == dp_accounting.NonPrivateDpEvent()


def test_dp_accounting_replace_one_convention_unchanged():
    """Canary for google/differential-privacy#378: dp-accounting 0.6 applies alpha / (2 z^2)
    to `GaussianDpEvent(z)` under REPLACE_ONE, i.e. it reads z as std / sensitivity, which is
    why `dp_event` passes z / 2 for fixed-size sampling. If this fails, dp-accounting changed
    its convention and the halving in `dp_event` must go."""
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=NR.REPLACE_ONE)
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(10, 10, G(2.0)))
    np.testing.assert_allclose(acc.rdp, acc.orders / (2 * 2.0**2), rtol=1e-12)


def test_effective_and_value_noise_multipliers():
    assert effective_noise_multiplier(1.25) == 1.25
    assert effective_noise_multiplier([3.0, 4.0]) == pytest.approx(2.4, rel=1e-15)
    assert effective_noise_multiplier(np.array([3.0, 4.0])) == pytest.approx(2.4, rel=1e-15)
    assert effective_noise_multiplier([0.0, 4.0]) == 0.0
    for bad in (-1.0, [1.0, -0.5], [], [float("nan")], "1.0"):
        with pytest.raises(ValueError, match="noise"):
            effective_noise_multiplier(bad)
    # adaptive clipping (Andrew et al. 2021): z_delta and 2 sigma_b combine to the nominal z
    z, sigma_b = 1.1, 0.05 * 100
    z_delta = value_noise_multiplier(z, sigma_b)
    assert z_delta == pytest.approx((1.1**-2 - 10.0**-2) ** -0.5, rel=1e-14)
    assert effective_noise_multiplier([z_delta, 2 * sigma_b]) == pytest.approx(z, rel=1e-14)
    with pytest.raises(ValueError, match="clipped_count_stddev .* is too low"):
        value_noise_multiplier(1.0, 0.5)


# ----------------------------------------------------------------------------- epsilon


@pytest.mark.parametrize("z, sampling, rounds, delta, accountant", [
    (1.1, PoissonSampling(0.01), 1000, 1e-5, "rdp"),
    (0.8, PoissonSampling(0.05), 50, 1e-6, "rdp"),
    (1.1, PoissonSampling(0.01), 1000, 1e-5, "pld"),
    (2.0, PoissonSampling(0.2), 20, 1e-4, "pld"),
    (1.1, FixedSizeSampling(1000, 10), 1000, 1e-5, "rdp"),
    (3.0, FixedSizeSampling(500, 50), 30, 1e-6, "rdp"),
])
def test_epsilon_equals_dp_accounting_called_directly(z, sampling, rounds, delta, accountant):
    if isinstance(sampling, PoissonSampling):
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(sampling.rate, G(z)), rounds)
        relation = NR.ADD_OR_REMOVE_ONE
    else:
        event = dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
            sampling.population, sampling.cohort, G(z / 2)), rounds)
        relation = NR.REPLACE_ONE
    acc = (rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
           if accountant == "rdp" else dp_accounting.pld.PLDAccountant(relation))
    expected = acc.compose(event).get_epsilon(delta)
    assert 0 < expected < math.inf
    assert epsilon(z, sampling, rounds, delta, accountant) == expected


@pytest.mark.parametrize("z, rounds, delta", [(1.0, 1, 1e-5), (4.0, 100, 1e-6), (20.0, 1000, 1e-3),
                                              (50.0, 1, 0.5)])
def test_rdp_without_subsampling_matches_closed_form(z, rounds, delta):
    """q = 1: RDP of T Gaussian rounds is T alpha / (2 z^2) (Mironov 2017)."""
    rdp = rounds * ORDERS / (2 * z**2)
    expected = rdp_to_epsilon_by_hand(rdp, delta)
    assert epsilon(z, PoissonSampling(1.0), rounds, delta) == pytest.approx(expected, rel=1e-6,
                                                                            abs=1e-12)
    # fixed-size cohorts of everyone, replace-one: sensitivity 2C, RDP T alpha / (2 (z/2)^2)
    expected = rdp_to_epsilon_by_hand(rounds * ORDERS / (2 * (z / 2) ** 2), delta)
    assert epsilon(z, FixedSizeSampling(7, 7), rounds, delta) == pytest.approx(expected, rel=1e-6,
                                                                               abs=1e-12)
    np.testing.assert_array_equal(PrivacyLedger(z, PoissonSampling(1.0), delta).orders, ORDERS)


def test_hand_conversion_is_not_trivially_zero():
    assert rdp_to_epsilon_by_hand(100 * ORDERS / (2 * 4.0**2), 1e-6) > 1.0
    assert rdp_to_epsilon_by_hand(ORDERS / (2 * 1e4), 0.5) == 0.0  # the KL branch


def test_pld_without_subsampling_near_exact_gaussian():
    """PLD of T Gaussian rounds is within its discretization of the exact Gaussian epsilon
    (sensitivity / std = sqrt(T) / z), and never below it; RDP is looser."""
    z, rounds, delta = 3.0, 50, 1e-5
    exact = gaussian_epsilon_exact(math.sqrt(rounds) / z, delta)
    pld = epsilon(z, PoissonSampling(1.0), rounds, delta, "pld")
    assert exact <= pld <= exact * (1 + 1e-3)
    assert epsilon(z, PoissonSampling(1.0), rounds, delta, "rdp") > pld * 1.05


def test_special_cases_and_errors():
    s = PoissonSampling(0.01)
    assert epsilon(1.0, s, 0, 1e-5) == 0.0 and epsilon(1.0, s, 0, 1e-5, "pld") == 0.0
    for acc in ("rdp", "pld"):
        assert epsilon(0.0, s, 10, 1e-5, acc) == math.inf
    assert epsilon(0.0, FixedSizeSampling(100, 10), 10, 1e-5) == math.inf
    a, b = epsilon(1.0, s, 100, 1e-5), epsilon(1.0, s, 200, 1e-5)
    assert 0 < a < b and epsilon(1.2, s, 100, 1e-5) < a and epsilon(1.0, s, 100, 1e-3) < a
    with pytest.raises(ValueError, match="PLD accountant of dp-accounting does not support "
                                         "fixed-size cohorts.*use accountant='rdp'"):
        epsilon(1.0, FixedSizeSampling(100, 10), 10, 1e-5, "pld")
    with pytest.raises(ValueError, match="accountant must be one of 'rdp', 'pld', got 'prv'"):
        epsilon(1.0, s, 10, 1e-5, "prv")
    for bad in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError, match="delta must be a number in"):
            epsilon(1.0, s, 10, bad)
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="rounds must be a non-negative integer"):
            epsilon(1.0, s, bad, 1e-5)
    with pytest.raises(ValueError, match="sampling must be PoissonSampling"):
        epsilon(1.0, 0.01, 10, 1e-5)


def test_adaptive_clipping_composition_matches_dp_accounting():
    """Two Gaussian sums from one Poisson cohort, as dp-accounting composes them itself."""
    z_delta, sigma_b, q, rounds, delta = 1.3, 2.0, 0.02, 500, 1e-6
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.ComposedDpEvent([G(z_delta), G(2 * sigma_b)])), rounds))
    expected = acc.get_epsilon(delta)
    got = epsilon([z_delta, 2 * sigma_b], PoissonSampling(q), rounds, delta)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got > epsilon(z_delta, PoissonSampling(q), rounds, delta)  # the count costs privacy


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("target", [0.3, 1.0, 3.0, 10.0])
def test_calibrated_noise_gives_target_epsilon(target):
    s, rounds, delta = PoissonSampling(0.02), 500, 1e-5
    z = calibrate_noise(target, delta, s, rounds)
    eps = epsilon(z, s, rounds, delta)
    assert 0.99 * target <= eps <= target
    assert epsilon(z * (1 - 1e-3), s, rounds, delta) > target  # and z is (nearly) the smallest


@pytest.mark.parametrize("sampling, accountant, rounds, target", [
    (FixedSizeSampling(2000, 40), "rdp", 200, 2.0),
    (PoissonSampling(0.02), "pld", 100, 1.0),
])
def test_calibration_other_accountants(sampling, accountant, rounds, target):
    z = calibrate_noise(target, 1e-5, sampling, rounds, accountant)
    eps = epsilon(z, sampling, rounds, 1e-5, accountant)
    assert 0.99 * target <= eps <= target
    assert epsilon(z * (1 - 1e-3), sampling, rounds, 1e-5, accountant) > target


def test_calibration_ten_thousand_rounds_rdp():
    z = calibrate_noise(2.0, 1e-5, PoissonSampling(0.01), 10_000)
    assert 0.99 * 2.0 <= epsilon(z, PoissonSampling(0.01), 10_000, 1e-5) <= 2.0


def test_calibration_errors():
    s = PoissonSampling(0.01)
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="target_epsilon must be a positive number"):
            calibrate_noise(bad, 1e-5, s, 10)
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        calibrate_noise(1.0, 1e-5, s, 0)
    with pytest.raises(ValueError, match="does not support fixed-size cohorts"):
        calibrate_noise(1.0, 1e-5, FixedSizeSampling(10, 2), 10, "pld")
    with pytest.raises(ValueError, match="tolerance must be in"):
        calibrate_noise(1.0, 1e-5, s, 10, tolerance=0.5)


# ----------------------------------------------------------------------------- ledger


@pytest.mark.parametrize("sampling", [PoissonSampling(0.01), FixedSizeSampling(3400, 34)])
def test_ledger_non_decreasing_and_equals_epsilon(sampling):
    ledger = PrivacyLedger(1.2, sampling, delta=1e-5)
    per_round = [ledger.epsilon_after(t) for t in range(301)]
    assert per_round[0] == 0.0 and per_round[1] > 0
    assert all(b >= a for a, b in itertools.pairwise(per_round))
    assert per_round[300] > per_round[30] > per_round[3]
    for t in (1, 17, 300, 5000):
        assert ledger.epsilon_after(t) == pytest.approx(epsilon(1.2, sampling, t, 1e-5),
                                                        rel=1e-12)
    np.testing.assert_allclose(ledger.rdp_after(40), 40 * ledger.rdp_per_round)


def test_ledger_pld_and_adaptive_clipping():
    s = PoissonSampling(0.05)
    ledger = PrivacyLedger(1.0, s, delta=1e-5, accountant="pld")
    values = [ledger.epsilon_after(t) for t in (0, 1, 10, 100)]
    assert values[0] == 0.0 and values == sorted(values)
    assert values[2] == epsilon(1.0, s, 10, 1e-5, "pld")
    # adaptive clipping: [z_delta, 2 sigma_b] is worth the nominal z
    z_delta = value_noise_multiplier(1.0, 5.0)
    two = PrivacyLedger([z_delta, 2 * 5.0], s, delta=1e-5)
    one = PrivacyLedger(1.0, s, delta=1e-5)
    assert two.noise_multiplier == pytest.approx(1.0, rel=1e-14)
    assert two.epsilon_after(100) == pytest.approx(one.epsilon_after(100), rel=1e-9)
    assert PrivacyLedger(0.0, s, delta=1e-5).epsilon_after(5) == math.inf
    with pytest.raises(ValueError, match="does not support fixed-size cohorts"):
        PrivacyLedger(1.0, FixedSizeSampling(10, 2), 1e-5, "pld")
