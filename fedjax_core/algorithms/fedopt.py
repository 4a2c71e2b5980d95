"""FedOpt: FedAvg with an adaptive or momentum server optimizer (Reddi et al. 2021).

All four are `fedavg` with the matching optax server optimizer, applied to the
aggregated pseudo-gradient `Delta = mean_i (w_t - w_i)`:

    FedAdam:    m_t = b1 m_{t-1} + (1 - b1) Delta;  v_t = b2 v_{t-1} + (1 - b2) Delta^2
                w_{t+1} = w_t - eta m^_t / (sqrt(v^_t) + tau)     (bias-corrected m^, v^)
    FedYogi:    m_t as Adam;  v_t = v_{t-1} - (1 - b2) Delta^2 sign(v_{t-1} - Delta^2)
                w_{t+1} = w_t - eta m^_t / (sqrt(v^_t) + tau),  m_0 = v_0 = 1e-6 (optax)
    FedAdagrad: v_t = v_{t-1} + Delta^2;  w_{t+1} = w_t - eta Delta / sqrt(v_t + tau)
    FedAvgM:    m_t = beta m_{t-1} + Delta;  w_{t+1} = w_t - eta m_t

They use optax's implementations, as FedJAX does. Two differences from the paper's
Algorithm 2 follow: Adam and Yogi apply Adam's bias correction, and Adagrad (which has
no first moment) puts `tau` inside the square root.
"""

import optax

from fedjax_core.aggregate.base import Aggregator
from fedjax_core.algorithms.base import FederatedAlgorithm
from fedjax_core.algorithms.fedavg import fedavg


def fedadam(client_optimizer: optax.GradientTransformation, server_learning_rate: float,
            b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3,
            aggregator: Aggregator | None = None) -> FederatedAlgorithm:
    """FedAdam: `fedavg` with `optax.adam(server_learning_rate, b1, b2, eps)` on the server.

    Args:
      client_optimizer: local optimizer (the paper uses SGD).
      server_learning_rate: eta.
      b1, b2: moment decays (paper: 0.9, 0.99).
      eps: adaptivity tau (paper's grid; 1e-3 is its common choice).
      aggregator: defaults to the weighted mean.

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part `optax.adam`'s state:
      the moments m, v and the step count); metrics as `fedavg`'s.

    Example:
      >>> alg = fedadam(optax.sgd(1.0), server_learning_rate=1e-2)

    References:
      Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2.
    """
    return fedavg(client_optimizer, optax.adam(server_learning_rate, b1=b1, b2=b2, eps=eps),
                  aggregator)


def fedyogi(client_optimizer: optax.GradientTransformation, server_learning_rate: float,
            b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3,
            aggregator: Aggregator | None = None) -> FederatedAlgorithm:
    """FedYogi: `fedavg` with `optax.yogi(server_learning_rate, b1, b2, eps)` on the server.

    Update rule: as FedAdam's, but the second moment moves additively,
    `v_t = v_{t-1} - (1 - b2) Delta^2 sign(v_{t-1} - Delta^2)`, so it grows more slowly.

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part `optax.yogi`'s state,
      whose moments start at 1e-6 as optax's do); metrics as `fedavg`'s.

    Example:
      >>> alg = fedyogi(optax.sgd(1.0), server_learning_rate=1e-2)
      >>> state, metrics = jit_round(alg, model)(alg.init(params), cohort, round_key)

    References:
      Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2.
    """
    return fedavg(client_optimizer, optax.yogi(server_learning_rate, b1=b1, b2=b2, eps=eps),
                  aggregator)


def fedadagrad(client_optimizer: optax.GradientTransformation, server_learning_rate: float,
               eps: float = 1e-3, initial_accumulator_value: float = 0.0,
               aggregator: Aggregator | None = None) -> FederatedAlgorithm:
    """FedAdagrad: `fedavg` with `optax.adagrad` on the server, `v_0 = initial_accumulator_value`.

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part `optax.adagrad`'s
      accumulator v); metrics as `fedavg`'s.

    Example:
      >>> alg = fedadagrad(optax.sgd(1.0), server_learning_rate=1e-1)

    References:
      Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2.
    """
    return fedavg(client_optimizer,
                  optax.adagrad(server_learning_rate, eps=eps,
                                initial_accumulator_value=initial_accumulator_value),
                  aggregator)


def fedavgm(client_optimizer: optax.GradientTransformation, server_learning_rate: float,
            momentum: float = 0.9, aggregator: Aggregator | None = None) -> FederatedAlgorithm:
    """FedAvgM: `fedavg` with heavy-ball momentum SGD on the server.

    `m_t = momentum * m_{t-1} + Delta`, `w_{t+1} = w_t - eta m_t`.

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part the momentum m);
      metrics as `fedavg`'s.

    Example:
      >>> alg = fedavgm(optax.sgd(1.0), server_learning_rate=1.0, momentum=0.9)

    References:
      Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for
      Federated Visual Classification"; Reddi et al. 2021 (baseline).
    """
    return fedavg(client_optimizer, optax.sgd(server_learning_rate, momentum=momentum),
                  aggregator)
