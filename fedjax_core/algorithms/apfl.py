"""APFL: adaptive personalized federated learning (Deng et al. 2020, Algorithm 1).

Server state: the global model w; each client i that has trained keeps a local model v_i
(it starts at the global model of the round it first trains in) and a mixing weight
alpha_i in [0, 1] (it starts at `alpha`). Client i's personalized model is the mixture

    vbar_i = alpha_i v_i + (1 - alpha_i) w.

Round t, cohort S:

    for each client i in S, in parallel:
        w = w_t
        for k in 1 .. K:                                   # its non-empty steps, batch xi_k
            vbar = alpha_i v_i + (1 - alpha_i) w           # all three read the old iterates
            g_w     = grad f_i(w; xi_k)
            g_v     = grad_v f_i(vbar; xi_k)     = alpha_i grad f_i(vbar; xi_k)
            g_alpha = grad_alpha f_i(vbar; xi_k) = <v_i - w, grad f_i(vbar; xi_k)>
            w   = ClientOpt(w, g_w)                        # SGD: w -= eta g_w
            v_i = ClientOpt'(v_i, g_v)                     # SGD: v_i -= eta g_v
            alpha_i = clip(alpha_i - eta_alpha g_alpha, 0, 1)   # if adaptive_alpha
        Delta_i = w_t - w
    Delta = aggregator({Delta_i})                          # default: example-weighted mean
    w_{t+1} = w_t - eta_g Delta

With `client_optimizer = optax.sgd(eta)` the steps are the paper's; another optax
optimizer runs on w and on v_i with separate states (fresh each round). alpha_i takes
plain projected SGD steps of size `alpha_learning_rate` (the paper's eta, by default the
client learning rate).

FedJAX-compatible mode (`fedjax_compat=True`), as FedJAX 0.0.17's
`fedjax/algorithms/apfl.py` computes its step (checked against its recorded outputs in
`tests/fixtures/fedjax_reference/apfl.json`):

    vbar_i[l] = alpha_i[l] v_i[l] + (1 - alpha_i[l]) w[l]  # one alpha per parameter leaf l
    g       = grad f_i(vbar_i; xi_k)                      # the gradient AT the mixture
    g_v     = g                                           # unscaled: not alpha_i g
    g_alpha[l] = <v_i[l] - w[l], g[l]>                    # one inner product per leaf
    alpha_i = clip(ClientOpt''(alpha_i, g_alpha), 0, 1)   # the client optimizer, own state

With plain SGD and v_i = w at a new client's first step, g_v = g_w, so v_i stays equal
to w and alpha_i to its initial value for the whole of that client's first round.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_core import client_state, parallel, tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.aggregate.mean import mean
from fedjax_core.algorithms.base import AlgorithmEntry, FederatedAlgorithm
from fedjax_core.algorithms.ditto import PERSONAL_KEY
from fedjax_core.algorithms.fedavg import AGGREGATOR_KEY, round_metrics
from fedjax_core.client import ClientUpdate
from fedjax_core.personalization import evaluate_personal
from fedjax_core.models.base import Model, masked_mean_loss
from fedjax_core.typing import Params, State


class APFLState(NamedTuple):
    """Server state of APFL.

    Attributes:
      params: the global model w.
      personal: per client seen, a store row `{"v": params-shaped, "alpha": float32 scalar}`.
      aggregator_state: the aggregator's state.
    """

    params: Params
    personal: client_state.ClientStore
    aggregator_state: State


def mix(alpha, v: Params, w: Params) -> Params:
    """The personalized model `alpha v + (1 - alpha) w` (alpha a scalar)."""
    return jax.tree.map(lambda a, b: (alpha * a + (1 - alpha) * b).astype(a.dtype), v, w)


def mix_per_leaf(alphas: Params, v: Params, w: Params) -> Params:
    """FedJAX's layer-wise mixture `alpha[l] v[l] + (1 - alpha[l]) w[l]`, one scalar
    `alphas[l]` per leaf l of the params (FedJAX's `interpolate_params`)."""
    return jax.tree.map(lambda al, a, b: (al * a + (1 - al) * b).astype(a.dtype), alphas, v, w)


def leaf_alphas(alpha, params: Params) -> Params:
    """One float32 scalar `alpha` per leaf of `params` (FedJAX's
    `tree_map(lambda _: client_coefficient, params)`)."""
    return jax.tree.map(lambda _: jnp.asarray(alpha, jnp.float32), params)


def apfl_train(model: Model, optimizer: optax.GradientTransformation, alpha_learning_rate: float,
               adaptive_alpha: bool, fedjax_compat: bool = False):
    """Builds APFL's local loop for ONE client:
    `train(w, v, alpha, batches, mask, key) -> (w, v, alpha, loss_sum, personal_loss_sum, seen)`.

    A `lax.fori_loop` over the client's non-empty steps (see the module docstring for the
    step). `loss_sum` adds up the loss of w, `personal_loss_sum` that of the mixture, each
    times the examples of the step. The step-k key of w's pass is `fold_in(key, k)`, that
    of the mixture's `fold_in(fold_in(key, PERSONAL_KEY), k)`. With `fedjax_compat`,
    `alpha` is one scalar per leaf of the params and the step is FedJAX's (module
    docstring); `alpha_learning_rate` is then unused (`optimizer` steps alpha).
    """
    def loss_w(w, batch, m, k):
        return masked_mean_loss(model, w, batch, m, k, train=True)

    def loss_mixture(v_alpha, w, batch, m, k):
        v, alpha = v_alpha
        return masked_mean_loss(model, mix(alpha, v, w), batch, m, k, train=True)

    grad_w = jax.value_and_grad(loss_w)
    grad_v_alpha = jax.value_and_grad(loss_mixture)
    grad_at = grad_w  # FedJAX mode: the gradient of the loss at the mixture itself

    def fedjax_step(w, v, alphas, a_opt, batch, m, k):
        """FedJAX 0.0.17's v and alpha step: per-leaf alphas, g_v unscaled, alpha stepped
        by the client optimizer (its own state) then clipped to [0, 1]."""
        personal_loss, g = grad_at(mix_per_leaf(alphas, v, w), batch, m, k)
        g_alpha = jax.tree.map(lambda a, b, gl: jnp.vdot(a - b, gl), v, w, g)
        if adaptive_alpha:
            u_a, a_opt = optimizer.update(g_alpha, a_opt, alphas)
            alphas = jax.tree.map(lambda a: jnp.clip(a, 0.0, 1.0),
                                  optax.apply_updates(alphas, u_a))
        return personal_loss, g, alphas, a_opt

    def train(w, v, alpha, batches, mask, key):
        steps = jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.int32)
        personal_key = jax.random.fold_in(key, PERSONAL_KEY)

        def step(k, carry):
            w, v, alpha, w_opt, v_opt, a_opt, loss_sum, personal_sum, seen = carry
            batch = jax.tree.map(lambda x: x[k], batches)
            m = mask[k]
            loss, g_w = grad_w(w, batch, m, jax.random.fold_in(key, k))
            if fedjax_compat:
                personal_loss, g_v, alpha, a_opt = fedjax_step(
                    w, v, alpha, a_opt, batch, m, jax.random.fold_in(personal_key, k))
            else:
                personal_loss, (g_v, g_alpha) = grad_v_alpha(
                    (v, alpha), w, batch, m, jax.random.fold_in(personal_key, k))
                if adaptive_alpha:
                    alpha = jnp.clip(alpha - alpha_learning_rate * g_alpha, 0.0, 1.0)
            u_w, w_opt = optimizer.update(g_w, w_opt, w)
            u_v, v_opt = optimizer.update(g_v, v_opt, v)
            n = jnp.sum(m).astype(jnp.float32)
            return (optax.apply_updates(w, u_w), optax.apply_updates(v, u_v), alpha, w_opt, v_opt,
                    a_opt, loss_sum + loss * n, personal_sum + personal_loss * n, seen + n)

        zero = jnp.zeros((), jnp.float32)
        # alpha's own optimizer state is used only in the FedJAX mode (empty otherwise).
        a_opt = optimizer.init(alpha) if fedjax_compat else optax.EmptyState()
        init = (w, v, alpha, optimizer.init(w), optimizer.init(v), a_opt, zero, zero, zero)
        w, v, alpha, _, _, _, loss_sum, personal_sum, seen = jax.lax.fori_loop(
            0, steps, step, init)
        return w, v, alpha, loss_sum, personal_sum, seen

    return train


def apfl(client_optimizer: optax.GradientTransformation, server_learning_rate: float = 1.0,
         client_learning_rate: float | None = None, alpha: float = 0.25,
         adaptive_alpha: bool = True, alpha_learning_rate: float | None = None,
         aggregator: Aggregator | None = None, fedjax_compat: bool = False) -> FederatedAlgorithm:
    """APFL: each client learns a local model and how much of it to mix with the global one.

    Update rule (round t, cohort S; see the module docstring for the local step):
      from `w_t`, each client runs K steps on `w` (`grad f_i(w)`), on `v_i`
      (`alpha_i grad f_i(vbar_i)`) and, if adaptive, on `alpha_i`
      (`<v_i - w, grad f_i(vbar_i)>`, projected onto [0, 1]), `vbar_i = alpha_i v_i +
      (1 - alpha_i) w`; `w_{t+1} = w_t - eta_g aggregator({w_t - w_i})`.

    Args:
      client_optimizer: the optimizer of w and of v_i (separate states, fresh each round);
        the paper uses SGD(eta).
      server_learning_rate: eta_g; 1.0 is the paper's plain averaging of the local w.
      client_learning_rate: eta, the client optimizer's learning rate: the default
        `alpha_learning_rate`, as in the paper (one eta for w, v and alpha).
      alpha: the initial alpha_i of every client, in [0, 1] (0.25 is one of the paper's
        settings; FedJAX leaves it to the caller).
      adaptive_alpha: learn alpha_i by projected SGD (the paper's adaptive APFL); False
        keeps alpha_i = `alpha`.
      alpha_learning_rate: the step size of alpha_i; None: `client_learning_rate`. Must
        be None with `fedjax_compat` (there the client optimizer steps alpha_i).
      aggregator: combines the global deltas; defaults to the example-weighted `mean()`.
      fedjax_compat: compute the local step as FedJAX 0.0.17's APFL does instead of as
        the paper writes it: one alpha_i per parameter leaf, the gradient of v_i not
        scaled by alpha_i, and alpha_i stepped by `client_optimizer` (own state, fresh
        each round) then clipped to [0, 1] (see the module docstring). Store rows then
        hold `alpha` as one scalar per leaf.

    Returns:
      A `FederatedAlgorithm` whose state is an `APFLState`, with `evaluate` (each client
      with its mixture; see `fedjax_core.personalization.evaluate_personal`). Round
      metrics: `train/loss` (of w), `train/num_examples`, `train/delta_norm`,
      `train/personal_loss` (of the mixture), `apfl/mean_alpha` (the cohort's alpha_i
      after the round, example-weighted; with `fedjax_compat`, each client's mean over
      its leaves), plus the aggregator's.

    Example:
      >>> alg = apfl(optax.sgd(0.05), 1.0, client_learning_rate=0.05, alpha=0.25)
      >>> state, index = alg.init(params), client_state.StateIndex()
      >>> state, slots = client_state.prepare(index, state, cohort.client_index)
      >>> state, metrics = alg.apply(state, cohort._replace(slots=slots), key, model=model)

    References:
      Deng, Kamani, Mahdavi 2020, "Adaptive Personalized Federated Learning"
      (arXiv:2003.13461), Algorithm 1 and the adaptive alpha update.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"apfl: alpha must be in [0, 1], got {alpha}")
    if fedjax_compat and alpha_learning_rate is not None:
        raise ValueError("apfl: fedjax_compat steps alpha with client_optimizer, as FedJAX "
                         "does; leave alpha_learning_rate unset")
    if alpha_learning_rate is None and not fedjax_compat:
        alpha_learning_rate = client_learning_rate
    if adaptive_alpha and alpha_learning_rate is None and not fedjax_compat:
        raise ValueError("apfl: adaptive_alpha needs a step size: give client_learning_rate "
                         "or alpha_learning_rate")
    if adaptive_alpha and not fedjax_compat and not alpha_learning_rate >= 0:
        raise ValueError(f"apfl: alpha_learning_rate must be non-negative, "
                         f"got {alpha_learning_rate}")
    aggregator = aggregator or mean()
    alpha0 = float(alpha)
    eta_alpha = float(alpha_learning_rate or 0.0)

    def initial_alpha(params, value):
        # FedJAX mode: one alpha per parameter leaf; otherwise one scalar per client.
        if fedjax_compat:
            return leaf_alphas(value, params)
        return jnp.asarray(value, jnp.float32)

    def init(params):
        row = {"v": params, "alpha": initial_alpha(params, 0.0)}
        return APFLState(params, client_state.empty_store(row), aggregator.init(params))

    def apply(state, cohort, key, *, model, plan=parallel.Plan()):
        slots = client_state.require_slots(cohort, "apfl")
        train = apfl_train(model, client_optimizer, eta_alpha, adaptive_alpha, fedjax_compat)
        w = state.params
        fresh = {"v": w, "alpha": initial_alpha(w, alpha0)}
        old = client_state.gather(state.personal, slots, fresh)

        def one_client(inputs):
            batches, mask, n, position, row = inputs
            w_i, v_i, alpha_i, loss_sum, personal_sum, seen = train(
                w, row["v"], row["alpha"], batches, mask, jax.random.fold_in(key, position))
            u = ClientUpdate(tree.sub(w, w_i), jnp.asarray(n, jnp.float32), loss_sum, seen)
            return u, {"v": v_i, "alpha": alpha_i}, personal_sum

        positions = jnp.arange(cohort.mask.shape[0], dtype=jnp.int32)
        updates, new, personal_loss = parallel.map_clients(
            one_client, (cohort.batches, cohort.mask, cohort.num_examples, positions, old), plan)
        delta, aggregator_state, agg_metrics = aggregator.apply(
            updates.delta, updates.weight, state.aggregator_state,
            jax.random.fold_in(key, AGGREGATOR_KEY), slots)
        params = jax.tree.map(lambda p, d: p - server_learning_rate * d, w, delta)
        # A client without examples keeps its row; a new one gets its fresh (w_t, alpha).
        keep = (jnp.asarray(cohort.num_examples) > 0) | slots.is_new
        personal = client_state.scatter(state.personal, slots, new, keep=keep)
        seen = jnp.sum(updates.examples_seen)
        weight = updates.weight
        # Each client's alpha: its scalar, or (FedJAX mode) the mean of its per-leaf alphas.
        client_alpha = (jnp.mean(jnp.stack(jax.tree.leaves(new["alpha"])), axis=0)
                        if fedjax_compat else new["alpha"])
        metrics = {**round_metrics(updates, delta),
                   "train/personal_loss": jnp.sum(personal_loss) / jnp.maximum(seen, 1.0),
                   "apfl/mean_alpha": jnp.sum(weight * client_alpha)
                   / jnp.maximum(jnp.sum(weight), 1.0),
                   **agg_metrics}
        return APFLState(params, personal, aggregator_state), metrics

    def evaluate(model, state, data, batch_size=256, clients=None):
        return evaluate_personal(model, _select_mixture, state.personal.rows, state.params,
                                 data, batch_size, None if clients is None else clients.rows)

    return FederatedAlgorithm(init, apply, evaluate)


def _select_mixture(personal, global_params: Params, row) -> Params:
    """APFL's model of store row `row`: `alpha_row v_row + (1 - alpha_row) w`; `w` when
    `row < 0`. A row whose alpha is one scalar per leaf (`fedjax_compat`) mixes leaf by
    leaf."""
    r = jnp.maximum(row, 0)
    v = jax.tree.map(lambda t: t[r], personal["v"])
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(personal["alpha"])):  # one per client
        a = jnp.where(row >= 0, personal["alpha"][r], 0.0)
        return mix(a, v, global_params)
    a = jax.tree.map(lambda t: jnp.where(row >= 0, t[r], 0.0), personal["alpha"])
    return mix_per_leaf(a, v, global_params)


ENTRY = AlgorithmEntry(
    "apfl", "APFL: per-client mixture alpha v_i + (1 - alpha) w, alpha learned",
    apfl, "Deng, Kamani, Mahdavi 2020, Adaptive Personalized Federated Learning",
    needs=("client_learning_rate",))
