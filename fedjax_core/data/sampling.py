"""Client samplers: which clients take part in a round, deterministic from (seed, round)."""

import numpy as np

# Streams of host-side randomness, kept apart so that adding one never shifts another.
SAMPLE_STREAM = 0
SHUFFLE_STREAM = 1
TRANSFORM_STREAM = 2
FINETUNE_STREAM = 3


def host_rng(seed: int, round_num: int, *stream: int) -> np.random.Generator:
    """A numpy generator fixed by `(seed, round_num, *stream)`.

    Every host-side random choice (which clients, in which order their examples come)
    is drawn from one of these, so a run is reproducible from its seed and any round
    can be recomputed on its own (which is what makes resume exact).
    """
    if seed < 0 or round_num < 0:
        raise ValueError(f"seed and round must be non-negative, got seed={seed}, round={round_num}")
    return np.random.default_rng([seed, round_num, *stream])


def uniform_without_replacement(num_clients: int, cohort_size: int, seed: int,
                                round_num: int) -> np.ndarray:
    """Draws `cohort_size` distinct client positions uniformly from `range(num_clients)`.

    Each subset of size `cohort_size` is equally likely; the draw depends only on
    `(seed, round_num)`.

    Args:
      num_clients: population size N.
      cohort_size: clients per round K, 1 <= K <= N.
      seed: experiment seed.
      round_num: round index, 0-based.

    Returns:
      `Int[ndarray, "cohort_size"]`, positions in draw order (slot order).

    Example:
      >>> uniform_without_replacement(100, 3, seed=0, round_num=7)  # same every call
    """
    if not 1 <= cohort_size <= num_clients:
        raise ValueError(
            f"cannot sample {cohort_size} clients per round from {num_clients} clients; "
            f"choose between 1 and {num_clients}")
    rng = host_rng(seed, round_num, SAMPLE_STREAM)
    return rng.choice(num_clients, size=cohort_size, replace=False).astype(np.int64)


def poisson(num_clients: int, rate: float, seed: int, round_num: int) -> np.ndarray:
    """Poisson sampling: each client takes part independently with probability `rate`.

    The cohort size is random, `Binomial(num_clients, rate)`, possibly 0. This is the
    sampling that the subsampled-Gaussian privacy accountants assume (Abadi et al. 2016;
    Mironov, Talwar, Zhang 2019); the draw depends only on `(seed, round_num)`.

    Args:
      num_clients: population size N.
      rate: q, 0 < q <= 1.
      seed: experiment seed.
      round_num: round index, 0-based.

    Returns:
      `Int[ndarray, "k"]`, the sampled positions in increasing order.

    Example:
      >>> poisson(1000, 0.01, seed=0, round_num=3)   # about 10 clients, same every call
    """
    if not 0 < rate <= 1:
        raise ValueError(f"the Poisson sampling rate must be in (0, 1], got {rate}")
    rng = host_rng(seed, round_num, SAMPLE_STREAM)
    return np.flatnonzero(rng.random(num_clients) < rate).astype(np.int64)
