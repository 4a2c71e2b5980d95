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

Each takes `server_optimizer` as its server rule's learning rate eta (a float); for any
other server optimizer use `fedavg(client_optimizer, server_optimizer)` itself.
"""

import optax

from fedjax_core.aggregate.base import Aggregator
from fedjax_core.algorithms.base import FederatedAlgorithm, OptimizerOrRate, server_rate
from fedjax_core.algorithms.fedavg import fedavg


def _rate(server_optimizer: OptimizerOrRate, name: str, rule: str):
    return server_rate(server_optimizer, name, f"it is {rule}'s learning rate; for another "
                       "server optimizer use fedavg(client_optimizer, server_optimizer)")


def fedadam(client_optimizer: OptimizerOrRate, server_optimizer: float, *,
            aggregator: Aggregator | None = None,
            b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3) -> FederatedAlgorithm:
    """FedAdam: `fedavg` with `optax.adam(server_optimizer, b1, b2, eps)` on the server.

    Args:
      client_optimizer: local optimizer (the paper uses SGD); a float is
        `optax.sgd(that float)`.
      server_optimizer: eta, Adam's learning rate (a float; a transformation raises
        `ValueError`).
      aggregator: defaults to the weighted mean.
      b1, b2: moment decays (paper: 0.9, 0.99).
      eps: adaptivity tau (paper's grid; 1e-3 is its common choice).

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part `optax.adam`'s state:
      the moments m, v and the step count); metrics as `fedavg`'s.

    Example:
      >>> alg = fedadam(optax.sgd(1.0), 1e-2)

    References:
      Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2.
    """
    eta = _rate(server_optimizer, "fedadam", "Adam")
    return fedavg(client_optimizer, optax.adam(eta, b1=b1, b2=b2, eps=eps),
                  aggregator=aggregator)


def fedyogi(client_optimizer: OptimizerOrRate, server_optimizer: float, *,
            aggregator: Aggregator | None = None,
            b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3) -> FederatedAlgorithm:
    """FedYogi: `fedavg` with `optax.yogi(server_optimizer, b1, b2, eps)` on the server.

    Update rule: as FedAdam's, but the second moment moves additively,
    `v_t = v_{t-1} - (1 - b2) Delta^2 sign(v_{t-1} - Delta^2)`, so it grows more slowly.

    Args:
      client_optimizer: local optimizer; a float is `optax.sgd(that float)`.
      server_optimizer: eta, Yogi's learning rate (a float; a transformation raises
        `ValueError`).
      aggregator: defaults to the weighted mean.
      b1, b2: moment decays (paper: 0.9, 0.99).
      eps: adaptivity tau.

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part `optax.yogi`'s state,
      whose moments start at 1e-6 as optax's do); metrics as `fedavg`'s.

    Example:
      >>> alg = fedyogi(optax.sgd(1.0), 1e-2)
      >>> state, metrics = jit_round(alg, model)(alg.init(params), cohort, round_key)

    References:
      Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2.
    """
    eta = _rate(server_optimizer, "fedyogi", "Yogi")
    return fedavg(client_optimizer, optax.yogi(eta, b1=b1, b2=b2, eps=eps),
                  aggregator=aggregator)


def fedadagrad(client_optimizer: OptimizerOrRate, server_optimizer: float, *,
               aggregator: Aggregator | None = None,
               eps: float = 1e-3, initial_accumulator_value: float = 0.0) -> FederatedAlgorithm:
    """FedAdagrad: `fedavg` with `optax.adagrad` on the server, `v_0 = initial_accumulator_value`.

    Args:
      client_optimizer: local optimizer; a float is `optax.sgd(that float)`.
      server_optimizer: eta, Adagrad's learning rate (a float; a transformation raises
        `ValueError`).
      aggregator: defaults to the weighted mean.
      eps: adaptivity tau, inside the square root.
      initial_accumulator_value: v_0.

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part `optax.adagrad`'s
      accumulator v); metrics as `fedavg`'s.

    Example:
      >>> alg = fedadagrad(optax.sgd(1.0), 1e-1)

    References:
      Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2.
    """
    eta = _rate(server_optimizer, "fedadagrad", "Adagrad")
    return fedavg(client_optimizer,
                  optax.adagrad(eta, eps=eps,
                                initial_accumulator_value=initial_accumulator_value),
                  aggregator=aggregator)


def fedavgm(client_optimizer: OptimizerOrRate, server_optimizer: float, *,
            aggregator: Aggregator | None = None, momentum: float = 0.9) -> FederatedAlgorithm:
    """FedAvgM: `fedavg` with heavy-ball momentum SGD on the server.

    `m_t = momentum * m_{t-1} + Delta`, `w_{t+1} = w_t - eta m_t`.

    Args:
      client_optimizer: local optimizer; a float is `optax.sgd(that float)`.
      server_optimizer: eta, the momentum SGD's learning rate (a float; a transformation
        raises `ValueError`).
      aggregator: defaults to the weighted mean.
      momentum: beta.

    Returns:
      A `FederatedAlgorithm` (state: `RoundState`, server part the momentum m);
      metrics as `fedavg`'s.

    Example:
      >>> alg = fedavgm(optax.sgd(1.0), 1.0, momentum=0.9)

    References:
      Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for
      Federated Visual Classification"; Reddi et al. 2021 (baseline).
    """
    eta = _rate(server_optimizer, "fedavgm", "momentum SGD")
    return fedavg(client_optimizer, optax.sgd(eta, momentum=momentum), aggregator=aggregator)
