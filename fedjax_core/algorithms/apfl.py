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
    w_{t+1} = w_t - eta_g Delta                            # or w_t + ServerOpt(Delta)

With `client_optimizer = optax.sgd(eta)` the steps are the paper's; another optax
optimizer runs on w and on v_i with separate states (fresh each round). alpha_i takes
plain projected SGD steps of size `alpha_learning_rate` (the paper's eta, by default the
client learning rate). The three iterates step together in one custom step
(`ClientContext.loop`); step k's key is `fold_in(client_key, k)` for the pass at w and
`fold_in(fold_in(client_key, keys.PERSONAL), k)` for the pass at the mixture. The
per-client store keeps `{"v": v_i, "alpha": alpha_i}`.

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

import jax
import jax.numpy as jnp
import optax

from fedjax_core import keys, tree
from fedjax_core.aggregate.base import Aggregator
from fedjax_core.algorithms.base import (
    AlgorithmEntry,
    FederatedAlgorithm,
    OptimizerOrRate,
    client_rate,
    is_rate,
    sgd_if_rate,
)
from fedjax_core.client import ClientContext, ClientReport, TrainStats
from fedjax_core.models.base import masked_mean_loss
from fedjax_core.personalization import evaluate_personal
from fedjax_core.skeleton import RoundResult, algorithm
from fedjax_core.typing import Params


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


def apfl(client_optimizer: OptimizerOrRate, server_optimizer: OptimizerOrRate = 1.0, *,
         aggregator: Aggregator | None = None, client_learning_rate: float | None = None,
         alpha: float = 0.25, adaptive_alpha: bool = True,
         alpha_learning_rate: float | None = None,
         fedjax_compat: bool = False) -> FederatedAlgorithm:
    """APFL: each client learns a local model and how much of it to mix with the global one.

    Update rule (round t, cohort S; see the module docstring for the local step):
      from `w_t`, each client runs K steps on `w` (`grad f_i(w)`), on `v_i`
      (`alpha_i grad f_i(vbar_i)`) and, if adaptive, on `alpha_i`
      (`<v_i - w, grad f_i(vbar_i)>`, projected onto [0, 1]), `vbar_i = alpha_i v_i +
      (1 - alpha_i) w`; `w_{t+1} = w_t - eta_g aggregator({w_t - w_i})` (or
      `w_t + ServerOpt(aggregator({w_t - w_i}))`).

    Args:
      client_optimizer: the optimizer of w and of v_i (separate states, fresh each round);
        the paper uses SGD(eta), which a float eta gives (`optax.sgd(eta)`).
      server_optimizer: eta_g, a float (server SGD; 1.0 is the paper's plain averaging of
        the local w), or an optax optimizer applied to the aggregated delta.
      aggregator: combines the global deltas; defaults to the example-weighted `mean()`.
      client_learning_rate: eta, the client optimizer's learning rate: the default
        `alpha_learning_rate`, as in the paper (one eta for w, v and alpha). Taken from a
        float `client_optimizer`; with a transformation, give it (or
        `alpha_learning_rate`) when `adaptive_alpha`.
      alpha: the initial alpha_i of every client, in [0, 1] (0.25 is one of the paper's
        settings; FedJAX leaves it to the caller).
      adaptive_alpha: learn alpha_i by projected SGD (the paper's adaptive APFL); False
        keeps alpha_i = `alpha`.
      alpha_learning_rate: the step size of alpha_i; None: `client_learning_rate`. Must
        be None with `fedjax_compat` (there the client optimizer steps alpha_i).
      fedjax_compat: compute the local step as FedJAX 0.0.17's APFL does instead of as
        the paper writes it: one alpha_i per parameter leaf, the gradient of v_i not
        scaled by alpha_i, and alpha_i stepped by `client_optimizer` (own state, fresh
        each round) then clipped to [0, 1] (see the module docstring). Store rows then
        hold `alpha` as one scalar per leaf.

    Returns:
      A `FederatedAlgorithm` with `evaluate` (each client with its mixture; see
      `fedjax_core.personalization.evaluate_personal`). Its state is a `RoundState`:
      `params` the global model w, server part the server optimizer's state (no arrays
      for a float), and a per-client
      store whose rows are `{"v": v_i (params-shaped), "alpha": alpha_i}` (a float32
      scalar; with `fedjax_compat`, one per leaf of the params); a new client's row is
      `{"v": w_t, "alpha": alpha}`. Round metrics: `train/loss` (of w),
      `train/num_examples`, `train/delta_norm`, `train/personal_loss` (of the mixture),
      `apfl/mean_alpha` (the cohort's alpha_i after the round, example-weighted; with
      `fedjax_compat`, each client's mean over its leaves), plus the aggregator's.
      Per-client outputs (`jit_round(..., per_client=True)`): `alpha`, each client's
      alpha_i after the round (with `fedjax_compat`, its mean over the leaves).

    Example:
      >>> alg = apfl(0.05, 1.0, alpha=0.25)   # clients: optax.sgd(0.05)
      >>> state = alg.init(params)
      >>> state, metrics = jit_round(alg, model)(state, cohort, round_key)
      >>> alg.evaluate(model, state, test_data, 256, EvalClients(rows))

    References:
      Deng, Kamani, Mahdavi 2020, "Adaptive Personalized Federated Learning"
      (arXiv:2003.13461), Algorithm 1 and the adaptive alpha update.
    """
    if is_rate(client_optimizer) or client_learning_rate is not None:
        client_learning_rate = float(client_rate(client_optimizer, client_learning_rate, "apfl"))
    client_optimizer, server_optimizer = sgd_if_rate(client_optimizer), sgd_if_rate(server_optimizer)
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
    if (adaptive_alpha and not fedjax_compat and alpha_learning_rate is not None
            and not alpha_learning_rate >= 0):
        raise ValueError(f"apfl: alpha_learning_rate must be non-negative, "
                         f"got {alpha_learning_rate}")
    alpha0 = float(alpha)
    eta_alpha = float(alpha_learning_rate or 0.0)
    opt = client_optimizer

    def client_init(w):  # a new client: v_i = w_t, alpha_i = alpha (per leaf: FedJAX mode)
        return {"v": w, "alpha": leaf_alphas(alpha0, w) if fedjax_compat
                else jnp.asarray(alpha0, jnp.float32)}

    def client(ctx: ClientContext) -> ClientReport:
        model = ctx.model
        grad_w = jax.value_and_grad(
            lambda w, b, m, k: masked_mean_loss(model, w, b, m, k, train=True))
        grad_v_alpha = jax.value_and_grad(
            lambda va, w, b, m, k: masked_mean_loss(model, mix(va[1], va[0], w), b, m, k,
                                                    train=True))

        def step(carry, batch, m, step_keys):
            # w, v and alpha all step from the old iterates (module docstring).
            w, v, a, w_opt, v_opt, a_opt, loss_sum, personal_sum, seen, steps = carry
            key_w, key_mixture = step_keys
            loss, g_w = grad_w(w, batch, m, key_w)
            if fedjax_compat:  # per-leaf alphas, g_v unscaled, alpha stepped by the optimizer
                personal_loss, g_v = grad_w(mix_per_leaf(a, v, w), batch, m, key_mixture)
                if adaptive_alpha:
                    g_a = jax.tree.map(lambda x, y, g: jnp.vdot(x - y, g), v, w, g_v)
                    u_a, a_opt = opt.update(g_a, a_opt, a)
                    a = jax.tree.map(lambda x: jnp.clip(x, 0.0, 1.0), optax.apply_updates(a, u_a))
            else:
                personal_loss, (g_v, g_a) = grad_v_alpha((v, a), w, batch, m, key_mixture)
                if adaptive_alpha:
                    a = jnp.clip(a - eta_alpha * g_a, 0.0, 1.0)
            u_w, w_opt = opt.update(g_w, w_opt, w)
            u_v, v_opt = opt.update(g_v, v_opt, v)
            n = jnp.sum(m).astype(jnp.float32)
            return (optax.apply_updates(w, u_w), optax.apply_updates(v, u_v), a, w_opt, v_opt,
                    a_opt, loss_sum + loss * n, personal_sum + personal_loss * n, seen + n,
                    steps + 1.0)

        w0, v0, a0 = ctx.params, ctx.state["v"], ctx.state["alpha"]
        zero = jnp.zeros((), jnp.float32)
        # alpha's own optimizer state is used only in the FedJAX mode (fresh each round).
        a_opt = opt.init(a0) if fedjax_compat else optax.EmptyState()
        w, v, a, _, _, _, loss_sum, personal_sum, seen, steps = ctx.loop(
            step, (w0, v0, a0, opt.init(w0), opt.init(v0), a_opt, zero, zero, zero, zero),
            key=(ctx.key, keys.stream(ctx.key, keys.PERSONAL)))
        # Each client's alpha: its scalar, or (FedJAX mode) the mean of its per-leaf alphas.
        mean_alpha = jnp.mean(jnp.stack(jax.tree.leaves(a))) if fedjax_compat else a
        n = ctx.num_examples
        return ClientReport(tree.sub(w0, w), TrainStats(loss_sum, seen, steps),
                            state={"v": v, "alpha": a},
                            sums={"personal_loss": personal_sum, "seen": seen,
                                  "alpha": n * mean_alpha, "weight": n},
                            per_client={"alpha": mean_alpha})

    def server(w, opt_state, r: RoundResult):
        updates, opt_state = server_optimizer.update(r.delta, opt_state, w)
        s = r.sums
        return optax.apply_updates(w, updates), opt_state, {
            "train/personal_loss": s["personal_loss"] / jnp.maximum(s["seen"], 1.0),
            "apfl/mean_alpha": s["alpha"] / jnp.maximum(s["weight"], 1.0)}

    def evaluate(model, state, data, batch_size=256, clients=None):
        return evaluate_personal(model, _select_mixture, state.store.rows, state.params,
                                 data, batch_size, None if clients is None else clients.rows)

    return algorithm(client, server, init=server_optimizer.init, client_init=client_init,
                     aggregator=aggregator, evaluate=evaluate)


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
