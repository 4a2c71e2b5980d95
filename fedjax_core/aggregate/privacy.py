"""Differentially private aggregators: DP-FedAvg (fixed and adaptive clipping), local DP, DP-FTRL.

Round t, cohort of m_real real clients (weight n_i > 0) with deltas Delta_i, each
flattened over the whole pytree; padding clients (n_i = 0) never count. m is the FIXED
denominator `expected_clients` (qN under Poisson sampling with rate q from N clients,
the cohort size under fixed-size sampling; None: the cohort's padded size).

    gaussian(C, z):            Delta = (sum_i clip_C(Delta_i) + N(0, (z C)^2 I)) / m
    adaptive_gaussian(C0, z):  the same with the clip C_t learned by private quantile
                               estimation, C_{t+1} = C_t exp(-eta (btilde - gamma)), and
                               the noise multiplier split between the deltas and the count
    local(C, z or eps):        Delta = sum_i n_i (clip_C(Delta_i) + noise_i) / sum_i n_i,
                               each client noising its own delta (local DP)
    tree_ftrl(C, z):           Delta_t = (Stilde_t - Stilde_{t-1}) / m, Stilde_t the prefix
                               sum of clipped sums plus binary-tree noise (DP-FTRL)

with `clip_C(x) = x min(1, C / ||x||_2)`. The central mechanisms (all but `local`) give
USER-LEVEL differential privacy: every real client has weight 1 whatever its number of
examples, so one client's whole data changes the clipped sum by at most C (L2). The
accounting of the rounds (sampling rate, number of rounds, delta) is left to
`fedjax_core.privacy`; the functions `adaptive_noise_multipliers`, `tree_ftrl_rho` and
`zcdp_to_dp` give it the numbers these aggregators use.

Everything random derives from the key handed to `apply` (FedAvg passes
`keys.aggregator_key(round_key)`); local DP gives client slot s the key
`fold_in(key, s)`. The noise is drawn in float32 over the flattened delta and the
result is cast back to the deltas' dtype. Noise in floating point is not the exact
mechanism of the proofs (Mironov 2012); this is a simulator.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fedjax_core import keys, tree
from fedjax_core.aggregate.base import Aggregator, AggregatorEntry, Stream, real_clients
from fedjax_core.typing import Array, PRNGKey, PyTree

DELTA_NOISE_KEY = keys.NOISE
"""`fold_in(key, DELTA_NOISE_KEY)` draws the adaptive aggregator's noise on the delta sum."""

COUNT_NOISE_KEY = keys.COUNT_NOISE
"""`fold_in(key, COUNT_NOISE_KEY)` draws the adaptive aggregator's noise on the clip count."""


# ----------------------------------------------------------------------------- helpers

def _scaled_sum(deltas, factor) -> PyTree:
    """`sum_i factor_i Delta_i` in float32, a masked sum: clients with factor 0 (padding)
    contribute exactly 0 even when their delta holds inf or nan."""
    def leaf(x):
        f = tree.per_client(factor, x)
        return jnp.sum(jnp.where(f != 0, x.astype(jnp.float32) * f, 0.0), axis=0)
    return jax.tree.map(leaf, deltas)


def _clip_factors(norms, real, clip_norm) -> Array:
    """`min(1, C / ||Delta_i||)` for real clients, 0 for padding."""
    return jnp.where(real, tree.clip_factor(norms, clip_norm), 0.0)


def _normal_like(key: PRNGKey, like: PyTree, std) -> PyTree:
    """i.i.d. `N(0, std^2)` float32 noise shaped like `like` (one draw over the flattened tree)."""
    flat, unravel = ravel_pytree(jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), like))
    return unravel(std * jax.random.normal(key, flat.shape, jnp.float32))


def _cast_like(out: PyTree, deltas: PyTree) -> PyTree:
    return jax.tree.map(lambda o, x: o.astype(x.dtype), out, deltas)


def _denominators(weights, expected_clients, noise_cohort_size) -> tuple[float, float]:
    """`(m, m_noise)`: the fixed denominator and the cohort size the noise is sized for."""
    m = float(expected_clients) if expected_clients is not None else float(jnp.shape(weights)[0])
    m_noise = float(noise_cohort_size) if noise_cohort_size is not None else m
    return m, m_noise


def _check_positive(name: str, value, allow_none: bool = False, allow_zero: bool = False):
    if value is None and allow_none:
        return
    ok = value is not None and (value >= 0 if allow_zero else value > 0) and math.isfinite(value)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a finite number {bound}{none}, got {value!r}")


def _need_key(name: str, key, noisy: bool):
    if key is None and noisy:
        raise ValueError(f"the {name} aggregator adds noise: pass a PRNG key to apply "
                         f"(or set noise_multiplier=0 for a noise-free run)")


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def _empty_state(params):
    del params
    return optax.EmptyState()


# ----------------------------------------------------------------------------- DP-FedAvg

def gaussian(clip_norm: float = 1.0, noise_multiplier: float = 1.0,
             expected_clients: float | None = None,
             noise_cohort_size: float | None = None) -> Aggregator:
    """DP-FedAvg's server: clip every client's delta, sum, add Gaussian noise, divide by a fixed m.

    Update rule (user-level DP, every real client weighs 1):
      `Delta = (sum_{i real} clip_C(Delta_i) + N(0, (z C m / m_noise)^2 I)) / m`,
    with `clip_C(x) = x min(1, C / ||x||_2)` (the norm over the whole pytree), m =
    `expected_clients` and m_noise = `noise_cohort_size` (default m). With m_noise = m
    the noise on the sum is the Gaussian mechanism `N(0, (z C)^2)` of sensitivity C:
    adding or removing one client moves the clipped sum by at most C. Example counts
    only tell real clients (n_i > 0) from padding (n_i = 0), which is ignored entirely.

    The denominator is fixed, not the number of real clients: McMahan et al.'s
    fixed-denominator estimator, whose sensitivity does not depend on the sampled
    cohort. Use m = qN under Poisson sampling (rate q, population N) and the cohort size
    under fixed-size sampling; None takes the cohort's padded size (the number of slots),
    which is right for fixed-size cohorts without padding only.

    Simulating a small cohort with the noise of a large one: with m_noise > m the noise
    added to the sum shrinks to std `z C m / m_noise`, so the noise on the mean,
    `z C / m_noise`, is what a cohort of m_noise clients would get (the signal is
    still the average of m clients). The privacy is then that of the m_noise-cohort
    run: the accountant must use that cohort's sampling rate, q = m_noise / N (the
    actual m-client run by itself is far less private).

    Args:
      clip_norm: C > 0, the L2 bound of each client's delta.
      noise_multiplier: z >= 0, the noise std on the sum in units of C (0: no noise).
      expected_clients: m > 0, the fixed denominator; None: the cohort's padded size.
      noise_cohort_size: m_noise > 0, the cohort size the noise is calibrated for;
        None: m.

    Returns:
      A stateless `Aggregator`; `apply(deltas, weights, state, key, clients)` takes
      deltas with `[clients, ...]` leaves and `weights` `Float[Array, "clients"]`.
      Metrics: `privacy/clip_norm` (C), `privacy/clipped_fraction` (real clients with
      `||Delta_i|| > C` over m_real), `privacy/noise_std` (`z C / m_noise`, the std of
      the noise on the mean per coordinate), `privacy/num_clients` (m_real). It
      streams (`Aggregator.stream`): each client adds its clipped delta to a running
      sum, so a round never holds every client's delta.

    Example:
      >>> agg = gaussian(clip_norm=0.5, noise_multiplier=1.0, expected_clients=100)
      >>> delta, state, metrics = agg.apply(deltas, weights, agg.init(params), key, None)

    References:
      McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent
      Language Models" (ICLR), Algorithm 1 (DP-FedAvg, fixed-denominator estimator
      f~_f with uniform weights, Gaussian noise sigma = z S / (q W)).
    """
    _check_positive("clip_norm", clip_norm)
    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    _check_positive("expected_clients", expected_clients, allow_none=True)
    _check_positive("noise_cohort_size", noise_cohort_size, allow_none=True)

    def apply(deltas, weights, state, key=None, clients=None):
        del clients
        _need_key("gaussian", key, noise_multiplier > 0)
        m, m_noise = _denominators(weights, expected_clients, noise_cohort_size)
        real, m_real = real_clients(weights)
        norms = tree.client_norms(deltas)
        total = _scaled_sum(deltas, _clip_factors(norms, real, clip_norm))
        if noise_multiplier > 0:
            assert key is not None  # _need_key raised otherwise
            noise = _normal_like(key, total, noise_multiplier * clip_norm * m / m_noise)
            total = tree.add(total, noise)
        out = jax.tree.map(lambda s: s / m, total)
        return _cast_like(out, deltas), state, {
            "privacy/clip_norm": _f32(clip_norm),
            "privacy/clipped_fraction": _clipped_fraction(norms, real, m_real, clip_norm),
            "privacy/noise_std": _f32(noise_multiplier * clip_norm / m_noise),
            "privacy/num_clients": m_real.astype(jnp.float32),
        }

    def contribution(delta, weight):
        real = weight > 0
        norm = tree.l2_norm(delta)
        factor = jnp.where(real, tree.clip_factor(norm, clip_norm), 0.0)
        clipped = jax.tree.map(
            lambda x: jnp.where(factor != 0, x.astype(jnp.float32) * factor, 0.0), delta)
        return {"sum": clipped, "slots": jnp.float32(1.0), "real": real.astype(jnp.float32),
                "clipped": (real & (norm > clip_norm)).astype(jnp.float32)}

    def finalize(total, params, state, key=None):
        _need_key("gaussian", key, noise_multiplier > 0)
        m = float(expected_clients) if expected_clients is not None else total["slots"]
        m_noise = float(noise_cohort_size) if noise_cohort_size is not None else m
        summed = total["sum"]
        if noise_multiplier > 0:
            assert key is not None  # _need_key refused a missing one
            summed = tree.add(summed, _normal_like(key, summed,
                                                   noise_multiplier * clip_norm * m / m_noise))
        out = jax.tree.map(lambda s: s / m, summed)
        return _cast_like(out, params), state, {
            "privacy/clip_norm": _f32(clip_norm),
            "privacy/clipped_fraction": total["clipped"] / jnp.maximum(total["real"], 1.0),
            "privacy/noise_std": _f32(noise_multiplier * clip_norm / m_noise),
            "privacy/num_clients": total["real"],
        }

    return Aggregator(_empty_state, apply, Stream(contribution, finalize))


def _clipped_fraction(norms, real, m_real, clip_norm) -> Array:
    clipped = jnp.sum((real & (norms > clip_norm)).astype(jnp.float32))
    return clipped / jnp.maximum(m_real, 1).astype(jnp.float32)


# ----------------------------------------------------------------------------- adaptive

def adaptive_noise_multipliers(noise_multiplier: float, clip_count_stddev: float | None,
                               expected_clients: float | None = None) -> tuple[float, float]:
    """`(sigma_delta, sigma_b)`: the noise split of adaptive clipping at total multiplier z.

    Each client reports `b_i - 1/2` with `b_i = 1[||Delta_i|| <= C]`, so the count has
    sensitivity 1/2 and noise std sigma_b makes it a Gaussian mechanism of noise
    multiplier `2 sigma_b`; the delta sum has sensitivity C and noise `sigma_delta C`.
    Two Gaussian mechanisms compose like one of multiplier z when
    `z^-2 = sigma_delta^-2 + (2 sigma_b)^-2`, hence

        sigma_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2),

    which needs `2 sigma_b > z`. The accountant then runs on z alone (one Gaussian
    mechanism of multiplier z per round, with the round's sampling rate).

    Args:
      noise_multiplier: z >= 0, the total noise multiplier. 0: no privacy, no noise:
        returns `(0, sigma_b)` with sigma_b = `clip_count_stddev` or 0.
      clip_count_stddev: sigma_b >= 0, the std of the noise on the count of unclipped
        clients (in clients); None: the paper's `expected_clients / 20`.
      expected_clients: clients per round, for the default sigma_b (the cohort size
        the noise is calibrated for, `noise_cohort_size` when simulating a larger one).

    Returns:
      `(sigma_delta, sigma_b)` as Python floats.

    Example:
      >>> adaptive_noise_multipliers(1.0, 5.0)         # 100 clients: sigma_b = 100 / 20
      (1.005037815259212, 5.0)

    References:
      Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with
      Adaptive Clipping" (NeurIPS), Section 3 / Theorem 1 (the noise split) and
      Section 4 (sigma_b = m / 20).
    """
    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    _check_positive("clip_count_stddev", clip_count_stddev, allow_none=True, allow_zero=True)
    if noise_multiplier == 0:
        return 0.0, float(clip_count_stddev or 0.0)
    if clip_count_stddev is None:
        if expected_clients is None:
            raise ValueError("adaptive_noise_multipliers needs clip_count_stddev, or "
                             "expected_clients for the default expected_clients / 20")
        _check_positive("expected_clients", expected_clients)
        clip_count_stddev = expected_clients / 20.0
    sigma_b = float(clip_count_stddev)
    if 2.0 * sigma_b <= noise_multiplier:
        raise ValueError(
            f"clip_count_stddev={sigma_b:g} is too small for noise_multiplier="
            f"{noise_multiplier:g}: the clip count alone would use the whole privacy budget "
            f"(needs 2 * clip_count_stddev > noise_multiplier). Raise clip_count_stddev "
            f"(default expected_clients / 20, so more clients per round also works) or "
            f"lower noise_multiplier")
    sigma_delta = (noise_multiplier ** -2 - (2.0 * sigma_b) ** -2) ** -0.5
    return float(sigma_delta), sigma_b


class AdaptiveClipState(NamedTuple):
    """State of `adaptive_gaussian`: the clip norm of the next round, a float32 scalar."""

    clip_norm: Array


def adaptive_gaussian(initial_clip_norm: float = 0.1, noise_multiplier: float = 1.0,
                      target_quantile: float = 0.5, clip_learning_rate: float = 0.2,
                      clip_count_stddev: float | None = None,
                      expected_clients: float | None = None,
                      noise_cohort_size: float | None = None) -> Aggregator:
    """DP-FedAvg with the clip norm adapted to a quantile of the clients' norms, privately.

    Update rule, round t with clip C_t (state), gamma = `target_quantile`, eta =
    `clip_learning_rate`, m = `expected_clients`, m_noise = `noise_cohort_size`:

        Delta   = (sum_{i real} clip_{C_t}(Delta_i) + N(0, (sigma_delta C_t m / m_noise)^2 I)) / m
        b_i     = 1[||Delta_i|| <= C_t]
        btilde  = clamp((sum_{i real} (b_i - 1/2) + N(0, (sigma_b m / m_noise)^2)) / m + 1/2, 0, 1)
        C_{t+1} = C_t exp(-eta (btilde - gamma))                     (geometric update)

    with `(sigma_delta, sigma_b) = adaptive_noise_multipliers(z, clip_count_stddev)`, so
    that one round is as private as one Gaussian mechanism of multiplier z: account with
    `noise_multiplier` alone. btilde estimates the fraction of clients whose delta was
    not clipped; when all m expected clients are present it is
    `(sum b_i + N(0, sigma_b^2)) / m`. The bits are centered (`b_i - 1/2`, as in the
    paper's analysis and TFF) so that adding or removing a client changes the count by
    1/2, the sensitivity the noise split assumes. The clamp to [0, 1] (TFF's) is
    post-processing. The deltas, the counts and the noise are as in `gaussian` (user-level
    DP, fixed denominator, `noise_cohort_size` scaling both noises by m / m_noise; the
    default sigma_b is then m_noise / 20).

    Args:
      initial_clip_norm: C_0 > 0.
      noise_multiplier: z >= 0, the total noise multiplier (0: no noise at all; then
        `clip_count_stddev` may be 0, which makes the clip update exact).
      target_quantile: gamma in [0, 1], the fraction of clients meant to be unclipped.
      clip_learning_rate: eta >= 0 (0 keeps C fixed).
      clip_count_stddev: sigma_b, the noise std on the unclipped count (in clients);
        None: m_noise / 20 when z > 0, 0 when z = 0. Must exceed z / 2.
      expected_clients: m > 0, the fixed denominator; None: the cohort's padded size.
      noise_cohort_size: m_noise > 0, the cohort size the noise is calibrated for;
        None: m.

    Returns:
      An `Aggregator` with state `AdaptiveClipState` (`init` holds C_0). Metrics:
      `privacy/clip_norm` (C_t, used this round), `privacy/clipped_fraction`,
      `privacy/noise_std` (`sigma_delta C_t / m_noise`, on the mean),
      `privacy/num_clients`, `privacy/unclipped_fraction_estimate` (btilde).
      A ValueError when sigma_b <= z / 2 (raised by the builder, or when the round is
      traced if sigma_b depends on the cohort's padded size).

    Example:
      >>> agg = adaptive_gaussian(noise_multiplier=1.0, expected_clients=100)  # sigma_b = 5
      >>> state = agg.init(params)
      >>> delta, state, metrics = agg.apply(deltas, weights, state, key, None)

    References:
      Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with
      Adaptive Clipping" (NeurIPS), Algorithm 1 / Section 3 (geometric update, noise
      split), Section 4 (gamma = 0.5, eta = 0.2, sigma_b = m / 20).
    """
    _check_positive("initial_clip_norm", initial_clip_norm)
    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    _check_positive("clip_learning_rate", clip_learning_rate, allow_zero=True)
    _check_positive("clip_count_stddev", clip_count_stddev, allow_none=True, allow_zero=True)
    _check_positive("expected_clients", expected_clients, allow_none=True)
    _check_positive("noise_cohort_size", noise_cohort_size, allow_none=True)
    if not 0.0 <= target_quantile <= 1.0:
        raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile}")

    def multipliers(m_noise):
        return adaptive_noise_multipliers(noise_multiplier, clip_count_stddev, m_noise)

    known = noise_cohort_size if noise_cohort_size is not None else expected_clients
    if clip_count_stddev is not None or known is not None:
        multipliers(known)  # fail at build time when the numbers are known

    def init(params):
        del params
        return AdaptiveClipState(_f32(initial_clip_norm))

    def apply(deltas, weights, state, key=None, clients=None):
        del clients
        _need_key("adaptive_gaussian", key, noise_multiplier > 0)
        m, m_noise = _denominators(weights, expected_clients, noise_cohort_size)
        sigma_delta, sigma_b = multipliers(m_noise)
        c = state.clip_norm
        real, m_real = real_clients(weights)
        norms = tree.client_norms(deltas)
        total = _scaled_sum(deltas, _clip_factors(norms, real, c))
        centered = jnp.sum(jnp.where(real, (norms <= c).astype(jnp.float32) - 0.5, 0.0))
        if sigma_delta > 0:
            assert key is not None  # _need_key raised otherwise
            noise = _normal_like(jax.random.fold_in(key, DELTA_NOISE_KEY), total,
                                 sigma_delta * c * m / m_noise)
            total = tree.add(total, noise)
        if sigma_b > 0:
            assert key is not None  # _need_key raised otherwise
            centered = centered + sigma_b * m / m_noise * jax.random.normal(
                jax.random.fold_in(key, COUNT_NOISE_KEY), (), jnp.float32)
        b_tilde = jnp.clip(centered / m + 0.5, 0.0, 1.0)
        new_c = c * jnp.exp(-clip_learning_rate * (b_tilde - target_quantile))
        out = jax.tree.map(lambda s: s / m, total)
        return _cast_like(out, deltas), AdaptiveClipState(new_c.astype(jnp.float32)), {
            "privacy/clip_norm": c.astype(jnp.float32),
            "privacy/clipped_fraction": _clipped_fraction(norms, real, m_real, c),
            "privacy/noise_std": (sigma_delta * c / m_noise).astype(jnp.float32),
            "privacy/num_clients": m_real.astype(jnp.float32),
            "privacy/unclipped_fraction_estimate": b_tilde.astype(jnp.float32),
        }

    return Aggregator(init, apply)


# ----------------------------------------------------------------------------- local DP

def local(mechanism: str = "gaussian", clip_norm: float = 1.0, noise_multiplier: float = 1.0,
          epsilon: float | None = None) -> Aggregator:
    """Local DP: every client clips and noises its own delta before it leaves the device.

    Client i, with key `fold_in(key, slot_i)` and its delta flattened to x_i (d coordinates):

        "gaussian": y_i = x_i min(1, C / ||x_i||_2) + N(0, (z C)^2 I_d)
        "laplace":  y_i = x_i min(1, C / ||x_i||_1) + Laplace(b)^d,  b = 2 C / epsilon

    and the server takes the example-weighted mean `Delta = sum_i n_i y_i / sum_i n_i`
    (padding clients, n_i = 0, are ignored; no real client: zeros).

    Privacy per round and per client, against the server (local DP: any two inputs of
    the client are neighbours, so the sensitivity is the diameter of the clipped set,
    2C, not C): "laplace" is epsilon-LDP (L1 sensitivity 2C, scale 2C / epsilon);
    "gaussian" is the Gaussian mechanism of L2 sensitivity 2C and std z C, i.e. of
    noise multiplier z / 2 (e.g. (epsilon, delta) from the analytic Gaussian
    mechanism at z / 2). Rounds compose over the rounds a client takes part in.
    Weighting by example counts reveals the counts to the server; they are not
    protected.

    Args:
      mechanism: "gaussian" or "laplace".
      clip_norm: C > 0: the L2 bound ("gaussian") or the L1 bound ("laplace").
      noise_multiplier: z >= 0, the Gaussian std in units of C (ignored for "laplace").
      epsilon: the per-round LDP epsilon > 0 of "laplace" (required there; not
        accepted for "gaussian").

    Returns:
      A stateless `Aggregator`. Metrics: `privacy/clip_norm`, `privacy/clipped_fraction`
      (real clients whose norm exceeded C), `privacy/noise_std` (per client and
      coordinate: z C, or sqrt(2) b for Laplace), `privacy/num_clients`.

    Example:
      >>> agg = local("laplace", clip_norm=0.1, epsilon=2.0)

    References:
      Duchi, Jordan, Wainwright 2013, "Local Privacy and Statistical Minimax Rates"
      (FOCS), local privacy. Dwork, Roth 2014, "The Algorithmic Foundations of
      Differential Privacy", Theorem 3.6 (Laplace mechanism) and Appendix A (Gaussian).
      Truex et al. 2020, "LDP-Fed: Federated Learning with Local Differential Privacy"
      (EdgeSys), LDP in federated learning.
    """
    if mechanism not in ("gaussian", "laplace"):
        raise ValueError(f"mechanism must be 'gaussian' or 'laplace', got {mechanism!r}")
    _check_positive("clip_norm", clip_norm)
    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    if mechanism == "laplace":
        if epsilon is None:
            raise ValueError("local(mechanism='laplace') needs epsilon > 0, the per-round "
                             "LDP epsilon; pass e.g. epsilon=1.0")
        _check_positive("epsilon", epsilon)
        scale = 2.0 * clip_norm / epsilon
        noise_std = math.sqrt(2.0) * scale
    else:
        if epsilon is not None:
            raise ValueError("epsilon applies to mechanism='laplace' only; the Gaussian "
                             "mechanism takes noise_multiplier (pass epsilon=None)")
        scale = noise_multiplier * clip_norm
        noise_std = scale
    noisy = scale > 0

    def apply(deltas, weights, state, key=None, clients=None):
        del clients
        _need_key("local", key, noisy)
        real, m_real = real_clients(weights)
        n = jnp.shape(weights)[0]
        _, unravel = ravel_pytree(jax.tree.map(lambda x: jnp.zeros(x.shape[1:], jnp.float32),
                                               deltas))

        def one_client(delta, slot):
            x, _ = ravel_pytree(jax.tree.map(lambda v: v.astype(jnp.float32), delta))
            if mechanism == "gaussian":
                norm = jnp.sqrt(jnp.sum(jnp.square(x)))
            else:
                norm = jnp.sum(jnp.abs(x))
            y = x * tree.clip_factor(norm, clip_norm)
            if noisy:
                assert key is not None  # _need_key raised otherwise
                k = jax.random.fold_in(key, slot)
                if mechanism == "gaussian":
                    y = y + scale * jax.random.normal(k, x.shape, jnp.float32)
                else:
                    y = y + scale * jax.random.laplace(k, x.shape, jnp.float32)
            return y, norm

        noised, norms = jax.vmap(one_client)(deltas, jnp.arange(n, dtype=jnp.int32))
        w = jnp.where(real, jnp.asarray(weights, jnp.float32), 0.0)
        total_w = jnp.sum(w)
        mean_flat = jnp.sum(jnp.where(real[:, None], noised * w[:, None], 0.0), axis=0)
        mean_flat = mean_flat / jnp.where(total_w > 0, total_w, 1.0)
        return _cast_like(unravel(mean_flat), deltas), state, {
            "privacy/clip_norm": _f32(clip_norm),
            "privacy/clipped_fraction": _clipped_fraction(norms, real, m_real, clip_norm),
            "privacy/noise_std": _f32(noise_std),
            "privacy/num_clients": m_real.astype(jnp.float32),
        }

    return Aggregator(_empty_state, apply)


# ----------------------------------------------------------------------------- DP-FTRL

class TreeFTRLState(NamedTuple):
    """State of `tree_ftrl`.

    Attributes:
      round: rounds done so far (int32 scalar); this round is t = round + 1.
      key_data: `jax.random.key_data` of the tree's key, the `apply` key of round 1
        (placeholder before it); every node's noise derives from it.
    """

    round: Array
    key_data: Array


def tree_node_noise(tree_key: PRNGKey, level, index, like: PyTree, std) -> PyTree:
    """The noise of the tree node `(level, index)`, covering rounds
    `[index 2^level + 1, (index + 1) 2^level]`: i.i.d. `N(0, std^2)` shaped like `like`,
    from `fold_in(fold_in(tree_key, level), index)` (the same node always gives the same
    noise)."""
    node_key = jax.random.fold_in(jax.random.fold_in(tree_key, level), index)
    return _normal_like(node_key, like, std)


def tree_noise(tree_key: PRNGKey, t, like: PyTree, std) -> PyTree:
    """The tree noise of the prefix `[1..t]`: the sum of the noises of its binary-tree
    decomposition, one node per set bit l of t, `(level l, index (t >> l) - 1)`.

    E.g. t = 5 = 101b: nodes (2, 0) = rounds [1..4] and (0, 4) = round 5. t = 0: zeros.
    `t` may be traced (a `while_loop` over the `bit_length(t)` levels).
    """
    t = jnp.asarray(t, jnp.int32)
    zero = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), like)
    levels = 32 - jax.lax.clz(t)

    def body(level, acc):
        bit = (t >> level) & 1
        noise = tree_node_noise(tree_key, level, (t >> level) - 1, like, std)
        return jax.tree.map(lambda a, z: a + bit.astype(jnp.float32) * z, acc, noise)

    return jax.lax.fori_loop(0, levels, body, zero)


def _tree_noise_increment(tree_key, t, like, std) -> PyTree:
    """`tree_noise(t) - tree_noise(t - 1)` for t >= 1, from k + 1 nodes (k = trailing zeros
    of t, 1 on average): t - 1 ends in k one-bits whose nodes leave the decomposition, and
    the node `(k, (t >> k) - 1)` enters it; the higher nodes are shared."""
    k = jax.lax.population_count((t & -t) - 1)
    entering = tree_node_noise(tree_key, k, (t >> k) - 1, like, std)

    def body(level, acc):
        leaving = tree_node_noise(tree_key, level, ((t - 1) >> level) - 1, like, std)
        return tree.sub(acc, leaving)

    return jax.lax.fori_loop(0, k, body, entering)


def tree_ftrl(clip_norm: float = 1.0, noise_multiplier: float = 1.0,
              expected_clients: float | None = None) -> Aggregator:
    """DP-FTRL's noise by tree aggregation, returned as one aggregate per round.

    Round t (1-based): `g_t = sum_{i real} clip_C(Delta_i)` (user-level, weight 1 per
    client) and the noised prefix sum `Stilde_t = sum_{s <= t} g_s + Z_t`, Z_t the sum of
    the noises of the binary-tree nodes that decompose [1..t] (see `tree_noise`), each
    node `N(0, (z C)^2 I)`, drawn from the round-1 key and the node's id so that a node
    used by several prefixes has the same noise in each. The aggregator returns

        Delta_t = (Stilde_t - Stilde_{t-1}) / m = (g_t + Z_t - Z_{t-1}) / m,

    so a server `optax.sgd(eta)` (no momentum) on it gives exactly DP-FTRL:
    `theta_t = theta_0 - eta Stilde_t / m`. Other server optimizers stay private (they
    post-process the released prefix sums) but are no longer DP-FTRL. Computing
    `Z_t - Z_{t-1}` costs 1 + (trailing zeros of t) node draws, 2 on average.

    Privacy: one client's data changes g_s by at most C in the rounds s it takes part
    in. If each client takes part in at most one of T rounds, its contribution lies in
    at most `ceil(log2(T + 1))` nodes used by the prefixes 1..T, each a Gaussian
    mechanism of sensitivity C and std z C: the whole run is rho-zCDP with
    `rho = ceil(log2(T + 1)) / (2 z^2)` (`tree_ftrl_rho`; epsilon by `zcdp_to_dp`). No
    sampling or shuffling is assumed; the accountant for DP-FTRL is this tree
    accountant, not the sampled-Gaussian one. Clients taking part in several rounds
    need the paper's multi-participation analysis (or `tree_ftrl_rho`'s
    `participations`, a looser bound).

    Args:
      clip_norm: C > 0.
      noise_multiplier: z >= 0, the noise std of every tree node in units of C.
      expected_clients: m > 0, the fixed denominator; None: the cohort's padded size.

    Returns:
      An `Aggregator` with state `TreeFTRLState`. Metrics: `privacy/clip_norm`,
      `privacy/clipped_fraction`, `privacy/num_clients`, `privacy/round` (t),
      `privacy/noise_std` (`z C sqrt(popcount(t)) / m`, the std per coordinate of the
      noise in `Stilde_t / m`, i.e. in `(theta_0 - theta_t) / eta`).

    Example:
      >>> agg = tree_ftrl(clip_norm=1.0, noise_multiplier=4.0, expected_clients=100)
      >>> alg = fedavg(optax.sgd(0.1), optax.sgd(1.0), aggregator=agg)

    References:
      Kairouz, McMahan, Song, Thakkar, Thakurta, Xu 2021, "Practical and Private (Deep)
      Learning without Sampling or Shuffling" (ICML), Algorithm 1 (DP-FTRL), the tree
      aggregation of Section 2 and its privacy theorem. Dwork, Naor, Pitassi, Rothblum
      2010 and Chan, Shi, Song 2011 (the binary-tree mechanism).
    """
    _check_positive("clip_norm", clip_norm)
    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    _check_positive("expected_clients", expected_clients, allow_none=True)
    std = noise_multiplier * clip_norm

    def init(params):
        del params
        return TreeFTRLState(jnp.zeros((), jnp.int32),
                             jax.random.key_data(jax.random.key(0)))

    def apply(deltas, weights, state, key=None, clients=None):
        del clients
        _need_key("tree_ftrl", key, noise_multiplier > 0)
        m, _ = _denominators(weights, expected_clients, None)
        t = state.round + 1
        real, m_real = real_clients(weights)
        norms = tree.client_norms(deltas)
        total = _scaled_sum(deltas, _clip_factors(norms, real, clip_norm))
        key_data = state.key_data
        if key is not None:
            key_data = jnp.where(state.round == 0, jax.random.key_data(key), key_data)
        if noise_multiplier > 0:
            assert key is not None  # _need_key raised otherwise
            tree_key = jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(key))
            total = tree.add(total, _tree_noise_increment(tree_key, t, total, std))
        out = jax.tree.map(lambda s: s / m, total)
        popcount = jax.lax.population_count(t).astype(jnp.float32)
        return _cast_like(out, deltas), TreeFTRLState(t, key_data), {
            "privacy/clip_norm": _f32(clip_norm),
            "privacy/clipped_fraction": _clipped_fraction(norms, real, m_real, clip_norm),
            "privacy/noise_std": std * jnp.sqrt(popcount) / m,
            "privacy/num_clients": m_real.astype(jnp.float32),
            "privacy/round": t.astype(jnp.float32),
        }

    return Aggregator(init, apply)


def tree_ftrl_rho(noise_multiplier: float, rounds: int, participations: int = 1) -> float:
    """The rho of rho-zCDP of `rounds` rounds of `tree_ftrl`.

    `rho = k^2 ceil(log2(T + 1)) / (2 z^2)` with k = `participations`. For k = 1 (each
    client in at most one round) this is the paper's bound: a contribution lies in at
    most `ceil(log2(T + 1))` used nodes, each node a Gaussian mechanism with
    rho = 1 / (2 z^2). For k > 1 it is the triangle-inequality bound (the L2
    sensitivity of the node vector is at most k sqrt(ceil(log2(T + 1))) C), valid for
    any participation pattern and looser than the paper's analyses of multiple epochs.

    Args:
      noise_multiplier: z > 0 (0 gives inf).
      rounds: T >= 0.
      participations: k >= 1, the most rounds one client takes part in.

    Returns:
      rho (a float; 0 for T = 0).

    Example:
      >>> tree_ftrl_rho(2.0, 7)                   # ceil(log2 8) = 3 levels: 3 / 8
      0.375

    References:
      Kairouz et al. 2021, "Practical and Private (Deep) Learning without Sampling or
      Shuffling" (ICML), the privacy theorem of DP-FTRL (Section 3 / Appendix).
      Bun, Steinke 2016, "Concentrated Differential Privacy" (TCC), composition.
    """
    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    if int(rounds) != rounds or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds}")
    if int(participations) != participations or participations < 1:
        raise ValueError(f"participations must be an integer >= 1, got {participations}")
    height = int(rounds).bit_length()  # = ceil(log2(T + 1))
    if height == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    return participations ** 2 * height / (2.0 * noise_multiplier ** 2)


def zcdp_to_dp(rho: float, delta: float) -> float:
    """epsilon of the (epsilon, delta)-DP implied by rho-zCDP: `rho + 2 sqrt(rho log(1/delta))`.

    Args:
      rho: >= 0.
      delta: in (0, 1).

    Returns:
      epsilon (inf for rho = inf).

    Example:
      >>> round(zcdp_to_dp(0.375, 1e-5), 3)
      4.531

    References:
      Bun, Steinke 2016, "Concentrated Differential Privacy: Simplifications,
      Extensions, and Lower Bounds" (TCC), Proposition 1.3.
    """
    if not rho >= 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if math.isinf(rho):
        return math.inf
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


# ----------------------------------------------------------------------------- registry

ENTRIES = [
    AggregatorEntry(
        "dp_gaussian", "DP-FedAvg: clip each delta to L2 norm C, sum, add N(0, (zC)^2), "
        "divide by a fixed expected cohort size",
        lambda clip_norm=1.0, noise_multiplier=1.0, expected_clients=None,
        noise_cohort_size=None: gaussian(clip_norm, noise_multiplier, expected_clients,
                                         noise_cohort_size),
        "McMahan et al. 2018, Learning Differentially Private Recurrent Language Models "
        "(ICLR)"),
    AggregatorEntry(
        "dp_adaptive", "DP-FedAvg with the clip norm tracking a quantile of the update "
        "norms, estimated privately",
        lambda initial_clip_norm=0.1, noise_multiplier=1.0, target_quantile=0.5,
        clip_learning_rate=0.2, clip_count_stddev=None, expected_clients=None,
        noise_cohort_size=None: adaptive_gaussian(
            initial_clip_norm, noise_multiplier, target_quantile, clip_learning_rate,
            clip_count_stddev, expected_clients, noise_cohort_size),
        "Andrew et al. 2021, Differentially Private Learning with Adaptive Clipping "
        "(NeurIPS)"),
    AggregatorEntry(
        "local_dp", "local DP: each client clips and noises its own delta (Gaussian or "
        "Laplace), then the weighted mean",
        lambda mechanism="gaussian", clip_norm=1.0, noise_multiplier=1.0, epsilon=None:
            local(mechanism, clip_norm, noise_multiplier, epsilon),
        "Duchi et al. 2013, Local Privacy and Statistical Minimax Rates (FOCS)"),
    AggregatorEntry(
        "dp_ftrl", "DP-FTRL: clipped sums with binary-tree noise on their prefix sums, "
        "no sampling needed",
        lambda clip_norm=1.0, noise_multiplier=1.0, expected_clients=None:
            tree_ftrl(clip_norm, noise_multiplier, expected_clients),
        "Kairouz et al. 2021, Practical and Private (Deep) Learning without Sampling or "
        "Shuffling (ICML)"),
]
