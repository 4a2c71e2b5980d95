"""conv2d on oneDNN: JAX primitives over the native forward, input- and weight-gradient kernels.

`conv2d(x, w, strides, padding)` equals `lax.conv_general_dilated(x, w, strides, padding,
dimension_numbers=("NHWC", "HWIO", "NHWC"))` up to float summation order. Its three parts
are XLA FFI calls into `src/conv.cc`: the forward, and in the backward pass the input
gradient `dx = conv_transpose(dy, w)` and the weight gradient `dw = sum_b x_patches^T dy`.
float32 3x3 convolutions with stride 1 and both channel counts multiples of 16 run on
Winograd F(2x2, 3x3) kernels written here (`src/winograd.cc`; Lavin and Gray, CVPR 2016:
each 2x2 output tile is `A^T [(G g G^T) .* (B^T d B)] A`, 16 multiplications where the
direct convolution takes 36) on AVX-512 CPUs; every other convolution is one oneDNN
primitive (direct convolution, AVX-512 / AVX2 kernels chosen by oneDNN for the CPU it runs
on). `native.set_conv_algorithm("direct")` or `FEDJAX_NATIVE_CONV=direct` keeps all of them
on oneDNN. Unlike `lax.conv` on XLA:CPU, the weight gradient is as fast inside `lax.scan` /
`fori_loop` as outside (jax-ml/jax#12868 does not apply), and no patch matrix is
materialised as in im2col.

It runs under `jit`, `lax.scan`, `fori_loop` and `vmap`: a vmapped call with a shared
kernel folds the vmapped axes into the batch (one convolution); with per-example kernels
it runs one convolution per vmapped index. The three kernels are JAX primitives, each
bilinear with the others as its transposes, so every autodiff mode works: reverse, forward
(`jax.jvp`, `jax.jacfwd`) and higher orders (`jax.hessian`). float32 and bfloat16 operands
are accepted (bf16 runs oneDNN's AVX512_BF16 kernels where the CPU has them, see
`native.has_bf16`).

Use it through `nn.conv2d`, which picks it on CPU when the model's `nn.Kernels` say so.

Example:
  >>> from fedjax_core.models import native
  >>> from fedjax_core.models.native import conv
  >>> if native.available():
  ...     y = conv.conv2d(jnp.ones((2, 28, 28, 1)), jnp.ones((3, 3, 1, 32)))  # [2, 26, 26, 32]
"""

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from fedjax_core.models import native
from fedjax_core.typing import Array, ArrayLike, Float

Padding = str | Sequence[tuple[int, int]]
"""`"VALID"`, `"SAME"`, or `((top, bottom), (left, right))`."""


def explicit_padding(padding: Padding, in_hw: Sequence[int], kernel_hw: Sequence[int],
                     strides: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """`((top, bottom), (left, right))` for `padding`, as `lax.conv_general_dilated` pads.

    `"VALID"` is no padding; `"SAME"` pads `max((ceil(n / s) - 1) * s + k - n, 0)` per axis,
    the odd pixel after (bottom / right); explicit pairs are returned as they are.

    Args:
      padding: `"VALID"`, `"SAME"` or two `(before, after)` pairs.
      in_hw: the input's `(H, W)`.
      kernel_hw: the kernel's `(kh, kw)`.
      strides: `(sy, sx)`.

    Returns:
      `((top, bottom), (left, right))`.

    Raises:
      ValueError: `padding` is none of these.

    Example:
      >>> explicit_padding("SAME", (28, 28), (3, 3), (2, 2))
      ((0, 1), (0, 1))
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return (0, 0), (0, 0)
        if mode == "SAME":
            pads = []
            for n, k, s in zip(in_hw, kernel_hw, strides):
                total = max((-(-n // s) - 1) * s + k - n, 0)
                pads.append((total // 2, total - total // 2))
            return pads[0], pads[1]
        raise ValueError(f"conv2d padding must be 'VALID', 'SAME' or two (before, after) "
                         f"pairs, got {padding!r}")
    pairs = tuple((int(a), int(b)) for a, b in padding)
    if len(pairs) != 2 or any(a < 0 or b < 0 for a, b in pairs):
        raise ValueError(f"conv2d padding must be two non-negative (before, after) pairs, "
                         f"got {padding!r}")
    return pairs[0], pairs[1]


def conv2d(x: Float[ArrayLike, "B H W C"], w: Float[ArrayLike, "kh kw C O"],
           strides: Sequence[int] = (1, 1), padding: Padding = "VALID") -> Float[Array, "B Ho Wo O"]:
    """A 2-D convolution on the native kernels; NHWC input, HWIO kernel, no bias.

    `y[b, i, j, o] = sum_{p, q, c} xp[b, i*sy + p, j*sx + q, c] * w[p, q, c, o]`, `xp` = `x`
    zero-padded by `padding`.

    Args:
      x: `Float[Array, "B H W C"]`, float32 or bfloat16.
      w: `Float[Array, "kh kw C O"]`, the same dtype as `x`.
      strides: `(sy, sx)`.
      padding: `"VALID"`, `"SAME"` or `((top, bottom), (left, right))`.

    Returns:
      `Float[Array, "B Ho Wo O"]` of `x`'s dtype, `Ho = (H + top + bottom - kh) // sy + 1`.

    Raises:
      ValueError: bad padding, mismatched channels or dtypes, or an output size below 1.
      RuntimeError: the native kernels are unavailable (`native.reason()` says why).

    Example:
      >>> conv2d(jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4)), padding="SAME").shape
      (2, 8, 8, 4)
    """
    if not native.available():
        raise RuntimeError(f"native conv2d: the native kernels are {native.reason()}")
    x, w = jnp.asarray(x), jnp.asarray(w)
    if x.ndim != 4 or w.ndim != 4 or x.shape[3] != w.shape[2]:
        raise ValueError(f"conv2d takes x [B, H, W, C] and w [kh, kw, C, O], got {x.shape} "
                         f"and {w.shape}")
    if x.dtype != w.dtype or x.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"native conv2d takes float32 or bfloat16 x and w of one dtype, got "
                         f"{x.dtype} and {w.dtype}")
    sy, sx = (int(s) for s in strides)
    pads = explicit_padding(padding, x.shape[1:3], w.shape[:2], (sy, sx))
    out_hw = [(n + a + b - k) // s + 1
              for n, (a, b), k, s in zip(x.shape[1:3], pads, w.shape[:2], (sy, sx))]
    if min(out_hw) < 1:
        raise ValueError(f"conv2d output would be empty: input {x.shape[1:3]}, kernel "
                         f"{w.shape[:2]}, padding {pads}, strides {(sy, sx)}")
    return _conv((sy, sx), pads, x, w)


# Three JAX primitives, one per FFI handler. Each is bilinear in its two operands, and the
# transpose of each with respect to one operand is another of the three:
#   y  = fwd(x, w)        x^T: bwd_data(ct, w)    w^T: bwd_weights(x, ct)
#   dx = bwd_data(dy, w)  dy^T: fwd(ct, w)        w^T: bwd_weights(ct, dy)
#   dw = bwd_weights(x, dy)  x^T: bwd_data(dy, ct)  dy^T: fwd(x, ct)
# so reverse mode, forward mode (the JVP of a bilinear map) and every higher order compose
# (jax.hessian included). Operands may carry leading vmapped axes (size 1 where unbatched),
# which the handlers loop over or fold into the batch.


def _lead(*avals) -> tuple[int, ...]:
    """The broadcast leading (vmapped) shape of operands of rank 4 + L."""
    lead = [1] * (avals[0].ndim - 4)
    for aval in avals:
        for i, d in enumerate(aval.shape[:-4]):
            lead[i] = max(lead[i], d)
    return tuple(lead)


def _out_hw(in_hw, kernel_hw, strides, pads):
    return tuple((n + a + b - k) // s + 1
                 for n, (a, b), k, s in zip(in_hw, pads, kernel_hw, strides))


def _fwd_abstract(x, w, *, strides, pads, **_):
    ho, wo = _out_hw(x.shape[-3:-1], w.shape[-4:-2], strides, pads)
    return ShapedArray(_lead(x, w) + (x.shape[-4], ho, wo, w.shape[-1]), x.dtype)


def _data_abstract(dy, w, *, in_hw, **_):
    return ShapedArray(_lead(dy, w) + (dy.shape[-4], *in_hw, w.shape[-2]), dy.dtype)


def _weights_abstract(x, dy, *, kernel_hw, **_):
    return ShapedArray(_lead(x, dy) + (*kernel_hw, x.shape[-1], dy.shape[-1]), x.dtype)


def _primitive(name: str, target: str, abstract) -> Primitive:
    prim = Primitive(name)
    prim.def_impl(lambda *args, **params: jax.jit(partial(prim.bind, **params))(*args))
    prim.def_abstract_eval(abstract)
    call = jax.ffi.ffi_lowering(target)

    def lower(ctx, a, b, *, strides, pads, **_):
        (pt, pb), (pl, pr) = pads
        return call(ctx, a, b, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
                    pad_top=np.int64(pt), pad_bottom=np.int64(pb), pad_left=np.int64(pl),
                    pad_right=np.int64(pr))

    mlir.register_lowering(prim, lower, platform="cpu")
    batching.primitive_batchers[prim] = partial(_batch, prim)
    return prim


def _batch(prim, args, dims, **params):
    """vmap: the batched axis to the front, a size-1 axis on unbatched operands."""
    moved = [jnp.expand_dims(a, 0) if d is None else jnp.moveaxis(a, d, 0)
             for a, d in zip(args, dims)]
    return prim.bind(*moved, **params), 0


def _unbroadcast(value, aval):
    """`value` summed over the leading axes where `aval` (the operand) has size 1."""
    axes = tuple(i for i, (v, t) in enumerate(zip(value.shape[:-4], aval.shape[:-4]))
                 if t == 1 and v != 1)
    return jnp.sum(value, axis=axes, keepdims=True) if axes else value


_fwd_p = _primitive("fedjax_conv2d_forward", "fedjax_conv2d_forward", _fwd_abstract)
_data_p = _primitive("fedjax_conv2d_backward_data", "fedjax_conv2d_backward_data",
                     _data_abstract)
_weights_p = _primitive("fedjax_conv2d_backward_weights", "fedjax_conv2d_backward_weights",
                        _weights_abstract)


def _conv_params(strides, pads, **_):
    return {"strides": strides, "pads": pads}


def _fwd_x_t(ct, x, w, **params):
    xa = x.aval
    return _unbroadcast(_data_p.bind(ct, w, in_hw=xa.shape[-3:-1], **_conv_params(**params)), xa)


def _fwd_w_t(ct, x, w, **params):
    wa = w.aval
    return _unbroadcast(
        _weights_p.bind(x, ct, kernel_hw=wa.shape[-4:-2], **_conv_params(**params)), wa)


def _data_dy_t(ct, dy, w, **params):
    return _unbroadcast(_fwd_p.bind(ct, w, **_conv_params(**params)), dy.aval)


def _data_w_t(ct, dy, w, **params):
    wa = w.aval
    return _unbroadcast(
        _weights_p.bind(ct, dy, kernel_hw=wa.shape[-4:-2], **_conv_params(**params)), wa)


def _weights_x_t(ct, x, dy, **params):
    xa = x.aval
    return _unbroadcast(_data_p.bind(dy, ct, in_hw=xa.shape[-3:-1], **_conv_params(**params)),
                        xa)


def _weights_dy_t(ct, x, dy, **params):
    return _unbroadcast(_fwd_p.bind(x, ct, **_conv_params(**params)), dy.aval)


ad.defbilinear(_fwd_p, _fwd_x_t, _fwd_w_t)
ad.defbilinear(_data_p, _data_dy_t, _data_w_t)
ad.defbilinear(_weights_p, _weights_x_t, _weights_dy_t)


def _conv(strides, pads, x, w):
    return _fwd_p.bind(x, w, strides=strides, pads=pads)
