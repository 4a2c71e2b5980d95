"""Where one SGD step of the Shakespeare LSTM spends its time, piece by piece.

Times, inside a jitted `fori_loop` of `--steps` iterations (as a round runs them):
the whole client step (`client.train_steps` with `optax.sgd`), the loss alone, and the
pieces of the step on the model's shapes (batch 4, sequences of 80, embed 8, 2 x LSTM
256, dense 90): two layer unrolls (`nn.lstm_unroll`: input projection and recurrence)
forward, and their backward pass alone (from saved residuals), the input projections with
their gradients, the dense + softmax cross-entropy with its gradient,
and the SGD update. Pieces are interleaved round by round; medians and the spread
(min-max over rounds) are printed per step. `--kernels` picks the model's `nn.Kernels`:
`cpu` (the XLA:CPU kernels, pure JAX recurrence), `native` (plus the native LSTM when
the library is built), `plain`.

Example:
  $ python -m benchmarks.lstm_step_profile --rounds 7 --steps 20
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_core import client
from fedjax_core.models import metrics as metrics_lib
from fedjax_core.models import nn
from fedjax_core.models.shakespeare_lstm import shakespeare_lstm

B, T, E, H, V = 4, 80, 8, 256, 90


def _kernels(name: str) -> nn.Kernels:
    if name == "plain":
        return nn.Kernels.plain(lstm_custom_vjp=True)
    cpu = nn.Kernels.cpu()
    if name == "cpu":
        return cpu._replace(**({"native_lstm": False} if "native_lstm" in cpu._fields else {}))
    if name == "native":
        if not getattr(cpu, "native_lstm", False):
            raise SystemExit("the native LSTM is not available (native.reason())")
        return cpu
    raise SystemExit(f"unknown --kernels {name!r}")


def _loop(fn, n):
    """`jit(lambda xs: fori_loop over i of acc += fn(xs[i]))`: one call per iteration."""
    def run(xs, *rest):
        def body(i, acc):
            out = fn(jax.tree.map(lambda a: a[i], xs), *rest)
            return jax.tree.map(lambda a, o: a + o, acc, out)
        first = jax.eval_shape(fn, jax.tree.map(lambda a: a[0], xs), *rest)
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
        return jax.lax.fori_loop(0, n, body, zero)
    return jax.jit(run)


def _last(tree):
    """A small summary of a pytree (one row of each leaf), so loops keep their work."""
    return jax.tree.map(lambda a: a.reshape(-1, a.shape[-1])[-1] if a.ndim else a, tree)


def pieces(kernels: nn.Kernels, n: int, seed: int = 0):
    """name -> (jitted fn, args): each runs its piece `n` times in one fori_loop."""
    rng = np.random.default_rng(seed)
    model = shakespeare_lstm(kernels=kernels)
    params = model.init(jax.random.key(seed))
    x = jnp.asarray(rng.integers(1, V, (n, B, T)), jnp.int32)
    y = jnp.asarray(rng.integers(1, V, (n, B, T)), jnp.int32)
    mask = jnp.ones((n, B), bool)
    batches = {"x": x, "y": y}
    sgd = optax.sgd(0.1)
    out = {}

    def train(p, b, m):
        w, stats = client.train_steps(model, sgd, p, b, m, None)
        return _last(w), stats.loss_sum
    out["step (train_steps)"] = (jax.jit(train), (params, batches, mask))

    def loss_only(b, p):
        return jnp.mean(model.loss(b, model.apply(p, b)))
    out["loss forward only"] = (_loop(loss_only, n), (batches, params))

    def grad_only(b, p):
        return _last(jax.grad(lambda q: jnp.mean(model.loss(b, model.apply(q, b))))(p))
    out["loss value+grad"] = (_loop(grad_only, n), (batches, params))

    # One LSTM layer's unroll (the input projection, then the recurrence) with the model's
    # choice of recurrence, through the public nn.lstm_unroll; twice for the two layers.
    layer = params["lstm_1"]
    xs = jnp.asarray(rng.normal(size=(n, B, T, H)) * 0.5, jnp.float32)
    native = bool(getattr(kernels, "native_lstm", False))

    def unroll(x_i, p):
        return nn.lstm_unroll(p, x_i, custom_vjp=kernels.lstm_custom_vjp, native=native)[0]

    def fwd2(x_i, p):  # two layers
        return _last(unroll(x_i, p)) + _last(unroll(x_i * 0.5, p))
    out["layer unroll fwd x2"] = (_loop(fwd2, n), (xs, layer))

    d_hs = jnp.asarray(rng.normal(size=(n, B, T, H)), jnp.float32)
    vjp_fn = jax.vjp(unroll, xs[0], layer)[1]

    def bwd2(d, f):  # the backward pass alone, from saved residuals
        return _last(f(d)) + _last(f(d * 0.5))
    out["layer unroll bwd x2"] = (_loop(bwd2, n), (d_hs, vjp_fn))

    emb = jnp.asarray(rng.normal(size=(n, B, T, E)), jnp.float32)
    hin = jnp.asarray(rng.normal(size=(n, B, T, H)), jnp.float32)
    w0, w1 = params["lstm_0"]["w"][:E], params["lstm_1"]["w"][:H]
    bias = params["lstm_0"]["b"]
    dz = jnp.asarray(rng.normal(size=(n, T, B, 4 * H)), jnp.float32)

    def proj(a, w0_, w1_):
        e, h, d = a
        f = lambda e_, h_, p0, p1: (  # noqa: E731
            jnp.sum(jnp.dot(jnp.swapaxes(e_, 0, 1), p0) * d)
            + jnp.sum(jnp.dot(jnp.swapaxes(h_, 0, 1), p1) * d))
        return _last(jax.grad(f, argnums=(1, 2, 3))(e, h, w0_, w1_))
    del bias
    out["input projections fwd+bwd"] = (_loop(proj, n), ((emb, hin, dz), w0, w1))

    def head(a, p):
        h, yy = a
        def f(q, hh):
            logits = nn.dense(q, jnp.tanh(hh), kernels=kernels)
            return jnp.mean(metrics_lib.sequence_token_cross_entropy(logits, yy))
        return _last(jax.grad(f, argnums=(0, 1))(p, h))
    out["dense+softmax fwd+bwd"] = (_loop(head, n), ((hin, y), params["dense"]))

    def opt(g, p):
        updates, _ = sgd.update(g, sgd.init(p), p)
        return _last(optax.apply_updates(p, updates))
    grads = jax.tree.map(lambda a: jnp.stack([a * 0.01] * 2), params)
    n_opt = 2
    out["sgd update"] = (_loop(opt, n_opt), (grads, params))
    return out, {"sgd update": n_opt}


def main(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=["cpu"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    table = {}
    for k in args.kernels:
        fns, counts = pieces(_kernels(k), args.steps)
        for name, (fn, a) in fns.items():
            jax.block_until_ready(fn(*a))  # compile
            table[(k, name)] = (fn, a, counts.get(name, args.steps), [])
    for _ in range(args.rounds):
        for (k, name), (fn, a, count, times) in table.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append((time.perf_counter() - start) / count * 1e3)
    print(f"{'kernels':8s} {'piece':28s} {'median ms/step':>15s} {'min':>8s} {'max':>8s}")
    for (k, name), (_, _, _, times) in table.items():
        print(f"{k:8s} {name:28s} {statistics.median(times):15.3f} {min(times):8.3f} "
              f"{max(times):8.3f}")


if __name__ == "__main__":
    main()
