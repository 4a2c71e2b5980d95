"""Differential-privacy accounting over Google's `dp-accounting` (the "privacy" extra)."""

from fedjax_core.privacy.accounting import (
    ACCOUNTANTS,
    FixedSizeSampling,
    PoissonSampling,
    PrivacyLedger,
    calibrate_noise,
    dp_event,
    effective_noise_multiplier,
    epsilon,
    make_accountant,
    neighboring_relation,
    value_noise_multiplier,
)

__all__ = ["ACCOUNTANTS", "FixedSizeSampling", "PoissonSampling", "PrivacyLedger",
           "calibrate_noise", "dp_event", "effective_noise_multiplier", "epsilon",
           "make_accountant", "neighboring_relation", "value_noise_multiplier"]
