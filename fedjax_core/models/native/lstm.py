"""The LSTM recurrence on native kernels: the whole sequence in one FFI call, BPTT in another.

`lstm_recurrence(x_proj, w_h, h0, c0)` equals `nn._lstm_recurrence` (haiku's gates
`i, g, f, o`, forget bias +1): for `t = 0..T-1`, `z_t = x_proj[t] + h_{t-1} @ w_h`,
`c_t = sigmoid(f + 1) c_{t-1} + sigmoid(i) tanh(g)`, `h_t = sigmoid(o) tanh(c_t)`. The
forward is one call into `src/lstm.cc` that runs all `T` steps (the `[B, H] x [H, 4H]`
products and the gates) and keeps the activated gates and cells for the backward; the
backward is one call that runs back-propagation through time, then `dW_h = sum_t h_{t-1}^T
dz_t` is one matmul here. Per-step XLA ops (a dot and a dozen elementwise ops, each a
dispatch) cost more than their arithmetic at the Shakespeare model's batch of 4; the native
loop has none. float32 only (other dtypes are computed in float32 and cast back).

It runs under `jit`, `lax.scan` / `fori_loop`, and `vmap` (the FFI calls use
`vmap_method="broadcast_all"`: a vmapped call gets the vmapped axes on every operand and
runs each index's sequence in turn, in one call). Reverse mode is its custom VJP;
second derivatives (reverse-over-reverse, `jax.hessian`) differentiate the two native calls
through pure-JAX JVP rules of the same computations, so they work too, at pure-JAX speed.
Forward mode on it directly (`jax.jvp`) raises JAX's custom-VJP error, as the pure-JAX
hand-written gradient does.

Use it through `nn.lstm_unroll(..., native=True)`, which the models pass from their
`nn.Kernels.native_lstm` (on when the library loads, see `native.available`).

Example:
  >>> from fedjax_core.models import native
  >>> from fedjax_core.models.native import lstm
  >>> if native.available():
  ...     hs, h, c = lstm.lstm_recurrence(xp, w_h, h0, c0)  # [T, B, H], [B, H], [B, H]
"""

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_core.models import native
from fedjax_core.typing import Array, Float


def lstm_recurrence(x_proj: Float[Array, "T B G"], w_h: Float[Array, "H G"],
                    h0: Float[Array, "B H"], c0: Float[Array, "B H"]
                    ) -> tuple[Float[Array, "T B H"], Float[Array, "B H"], Float[Array, "B H"]]:
    """The LSTM recurrence over time-major `x_proj` on the native kernels; `G = 4H`.

    `z_t = x_proj[t] + h_{t-1} @ w_h`, `[i, g, f, o] = split(z_t)`,
    `c_t = sigmoid(f + 1) c_{t-1} + sigmoid(i) tanh(g)`, `h_t = sigmoid(o) tanh(c_t)`.

    Args:
      x_proj: `Float[Array, "T B 4H"]`, the input projections plus bias, `T >= 1`.
      w_h: `Float[Array, "H 4H"]`, the recurrent weights.
      h0: `Float[Array, "B H"]`, the initial hidden state.
      c0: `Float[Array, "B H"]`, the initial cell.

    Returns:
      `(hs, h_T, c_T)`: `hs` `Float[Array, "T B H"]`, the final hidden state and cell.

    Raises:
      RuntimeError: the native kernels are unavailable (`native.reason()` says why).
      ValueError: shapes that do not agree, or `T == 0`.

    Example:
      >>> hs, h, c = lstm_recurrence(jnp.zeros((80, 4, 1024)), jnp.zeros((256, 1024)),
      ...                            jnp.zeros((4, 256)), jnp.zeros((4, 256)))
    """
    if not native.available():
        raise RuntimeError(f"native LSTM: the native kernels are {native.reason()}")
    t, b, g = x_proj.shape
    if t < 1 or g % 4 or w_h.shape != (g // 4, g) or h0.shape != (b, g // 4) or (
            c0.shape != h0.shape):
        raise ValueError(f"native LSTM takes x_proj [T>=1, B, 4H], w_h [H, 4H], h0 and c0 "
                         f"[B, H], got {x_proj.shape}, {w_h.shape}, {h0.shape}, {c0.shape}")
    dtype = jnp.result_type(x_proj, w_h, h0, c0)
    f32 = [jnp.asarray(a, jnp.float32) for a in (x_proj, w_h, h0, c0)]
    hs, h, c = _recurrence(*f32)
    return hs.astype(dtype), h.astype(dtype), c.astype(dtype)


# ----------------------------------------------------------------- the two FFI calls


def _forward_native(x_proj, w_h, h0, c0):
    t, b, g = x_proj.shape[-3:]
    lead = x_proj.shape[:-3]
    state = jax.ShapeDtypeStruct(lead + (t, b, g // 4), jnp.float32)
    acts = jax.ShapeDtypeStruct(lead + (t, b, g), jnp.float32)
    return jax.ffi.ffi_call("fedjax_lstm_forward", (state, state, acts),
                            vmap_method="broadcast_all")(x_proj, w_h, h0, c0)


def _backward_native(d_hs, d_h, d_c, acts, cs, c0, w_h):
    dzs = jax.ShapeDtypeStruct(acts.shape, jnp.float32)
    state = jax.ShapeDtypeStruct(d_h.shape, jnp.float32)
    return jax.ffi.ffi_call("fedjax_lstm_backward", (dzs, state, state),
                            vmap_method="broadcast_all")(d_hs, d_h, d_c, acts, cs, c0, w_h)


# The same two computations in pure JAX: their JVPs are the native calls' JVP rules, so
# that second derivatives through the custom VJP below work (at pure-JAX speed).


def _forward_ref(x_proj, w_h, h0, c0):
    def step(carry, xp_t):
        h, c = carry
        zi, zg, zf, zo = jnp.split(xp_t + jnp.dot(h, w_h), 4, axis=-1)
        i, g, f, o = (jax.nn.sigmoid(zi), jnp.tanh(zg), jax.nn.sigmoid(zf + 1.0),
                      jax.nn.sigmoid(zo))
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), (h, c, jnp.concatenate([i, g, f, o], axis=-1))

    _, (hs, cs, acts) = lax.scan(step, (h0, c0), x_proj)
    return hs, cs, acts


def _backward_ref(d_hs, d_h, d_c, acts, cs, c0, w_h):
    c_prev = jnp.concatenate([c0[None], cs[:-1]], axis=0)

    def step(carry, inputs):
        dh, dc = carry
        dh_t, a, c, cp = inputs
        i, g, f, o = jnp.split(a, 4, axis=-1)
        dh = dh + dh_t
        tc = jnp.tanh(c)
        dc = dc + dh * o * (1.0 - tc * tc)
        dz = jnp.concatenate([dc * g * i * (1.0 - i), dc * i * (1.0 - g * g),
                              dc * cp * f * (1.0 - f), dh * tc * o * (1.0 - o)], axis=-1)
        return (jnp.dot(dz, w_h.T), dc * f), dz

    (dh0, dc0), dzs = lax.scan(step, (d_h, d_c), (d_hs, acts, cs, c_prev), reverse=True)
    return dzs, dh0, dc0


def _with_ref_jvp(impl, ref):
    fn = jax.custom_jvp(impl)
    fn.defjvp(lambda primals, tangents: (impl(*primals), jax.jvp(ref, primals, tangents)[1]))
    return fn


_forward = _with_ref_jvp(_forward_native, _forward_ref)
_backward = _with_ref_jvp(_backward_native, _backward_ref)


# ----------------------------------------------------------------- the custom VJP


@jax.custom_vjp
def _recurrence(x_proj, w_h, h0, c0):
    hs, cs, _ = _forward(x_proj, w_h, h0, c0)
    return hs, hs[-1], cs[-1]


def _recurrence_fwd(x_proj, w_h, h0, c0):
    hs, cs, acts = _forward(x_proj, w_h, h0, c0)
    return (hs, hs[-1], cs[-1]), (w_h, h0, c0, hs, cs, acts)


def _recurrence_bwd(residuals, cotangents):
    w_h, h0, c0, hs, cs, acts = residuals
    d_hs, d_h, d_c = cotangents
    dzs, dh0, dc0 = _backward(d_hs, d_h, d_c, acts, cs, c0, w_h)
    h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    hidden, gates = w_h.shape
    # dW_h = sum_t h_{t-1}^T dz_t: one [H, T*B] x [T*B, 4H] matmul.
    d_w_h = jnp.dot(h_prev.reshape(-1, hidden).T, dzs.reshape(-1, gates))
    return dzs, d_w_h, dh0, dc0


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


__all__ = ["lstm_recurrence"]
