"""Small neural-network layers in pure JAX.

Each layer is a pair of plain functions: `<layer>_init(key, ...) -> params` (a dict of
arrays) and `<layer>(params, x, ...) -> y`. Initialisers follow haiku's defaults, so
parameter counts and initial scales match FedJAX's haiku models.

Convolutions have three implementations (see `conv2d`): `lax.conv_general_dilated`;
im2col (patches gathered by slicing, then one matmul); and the native oneDNN kernels of
`fedjax_core.models.native` (an optional C++ extension). The last two exist because on
XLA:CPU the kernel-gradient of `lax.conv_general_dilated` is 25-50x slower inside
`lax.scan` / `fori_loop` / `while_loop` (jax-ml/jax#12868); the native one also skips the
patch matrix that im2col writes and reads.

The layers multiply and draw dropout masks through a `Kernels` record that the model
chooses when it is built (`emnist_cnn(kernels="auto" | "plain" | "cpu")`), never through
global state. `Kernels.plain()` is `jnp.dot` and `jax.random.bernoulli`, and supports
every autodiff mode; `Kernels.cpu()` takes the XLA:CPU kernels of
`fedjax_core.models.cpu_kernels` (a matmul whose weight gradient XLA:CPU runs fast, a
fused Threefry dropout mask: same values, no `jax.jvp` / `jax.jacfwd`); `"auto"` is
`cpu()` on a CPU backend. A layer called without `kernels` is plain. See performance.md
for the measurements.
"""

from typing import Callable, Literal, NamedTuple, Sequence, Union, cast

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_core.models import cpu_kernels, native
from fedjax_core.models.native import conv as native_conv
from fedjax_core.models.native import lstm as native_lstm
from fedjax_core.typing import Array, ArrayLike, Float, Int, PRNGKey

ConvImpl = Literal["auto", "lax", "im2col", "native"]

# haiku's VarianceScaling(..., "truncated_normal") divides the stddev by the stddev
# of a standard normal truncated to [-2, 2], so that the samples have the intended
# variance.
TRUNCATED_NORMAL_STDDEV = 0.87962566103423978


def _truncated_normal(key: PRNGKey, shape: Sequence[int], stddev: float,
                      dtype=jnp.float32) -> Array:
    """`stddev * z`, `z ~ N(0, 1)` truncated to [-2, 2] (haiku's TruncatedNormal)."""
    return stddev * jax.random.truncated_normal(key, -2.0, 2.0, tuple(shape), dtype)


# ------------------------------------------------------------------------- kernels


class Kernels(NamedTuple):
    """The implementations behind a model's layers, chosen once when the model is built.

    Four operations have a plain form and a faster form with a hand-written VJP. A model
    factory takes `kernels=` (`"auto"`, `"plain"`, `"cpu"` or a `Kernels`), resolves it
    with `resolve_kernels` when it is called, and passes the record to its layers; nothing
    is switched globally, and two models with different kernels live side by side.

    | choice | `matmul` | `bernoulli` | `lstm_custom_vjp` | `native_conv`, `native_lstm` | `jax.jvp` |
    | --- | --- | --- | --- | --- | --- |
    | `Kernels.plain()` | `jnp.dot` | `jax.random.bernoulli` | False | False | yes |
    | `Kernels.cpu()` | `cpu_kernels.matmul` | `cpu_kernels.bernoulli` | True | `native.available()` | no |
    | `"auto"`, CPU backend | as `cpu()` | | | | no |
    | `"auto"`, other backends | `jnp.dot` | `jax.random.bernoulli` | True | False | not through LSTMs |

    Every choice gives the same values up to float summation order, and the same dropout
    bits. Every choice supports reverse mode, `vmap`, and second derivatives through the
    gradient (reverse-over-reverse; forward-over-reverse, as in `jax.hessian` and
    `jax.jvp(jax.grad(loss), ...)` Hessian-vector products). Forward mode on the model
    itself (`jax.jvp(loss, ...)`, `jax.jacfwd(loss)`, `jax.linearize`) through a custom VJP
    raises JAX's `TypeError: can't apply forward-mode autodiff (jvp) to a custom_vjp
    function`: build the model with `kernels="plain"` for it.

    Attributes:
      matmul: `matmul(x [..., K], w [K, O]) -> [..., O]`, the product in `dense`,
        `lstm_cell` and im2col `conv2d`.
      bernoulli: `bernoulli(key, p, shape) -> Bool[shape]`, dropout's keep mask.
      lstm_custom_vjp: whether the models run `lstm_unroll` with its hand-written
        back-propagation through time (`custom_vjp=True`) instead of autodiff of the scan.
      native_conv: whether `conv2d(impl="auto")` runs the native oneDNN kernels
        (`fedjax_core.models.native.conv`) on a CPU backend; `Kernels.cpu()` sets it when
        they are built, load and `FEDJAX_NATIVE` is not `0`.
      native_lstm: whether the models run `lstm_unroll` on the native fused recurrence
        (`fedjax_core.models.native.lstm`: the whole sequence in one call, BPTT in
        another); set by `Kernels.cpu()` as `native_conv` is.

    Example:
      >>> model = emnist_cnn(kernels="plain")          # jax.jvp / jax.hessian work
      >>> model = emnist_cnn(kernels=Kernels.cpu())    # XLA:CPU kernels on any backend
      >>> y = dense(params, x, kernels=Kernels.cpu())  # one layer
    """

    matmul: Callable[[Array, Array], Array]
    bernoulli: Callable[[PRNGKey, float, tuple[int, ...]], Array]
    lstm_custom_vjp: bool
    native_conv: bool = False
    native_lstm: bool = False

    @staticmethod
    def plain(lstm_custom_vjp: bool = False) -> "Kernels":
        """`jnp.dot`, `jax.random.bernoulli` and (by default) autodiff of the LSTM scan.

        Supports every autodiff mode, `jax.jvp` included, unless `lstm_custom_vjp`.

        Args:
          lstm_custom_vjp: run `lstm_unroll` with its hand-written gradient.

        Returns:
          A `Kernels`.

        Example:
          >>> Kernels.plain().matmul is jnp.dot
          True
        """
        return Kernels(matmul=jnp.dot, bernoulli=jax.random.bernoulli,
                       lstm_custom_vjp=bool(lstm_custom_vjp))

    @staticmethod
    def cpu(lstm_custom_vjp: bool = True, native_conv: bool | None = None,
            native_lstm: bool | None = None) -> "Kernels":
        """The CPU kernels: `cpu_kernels.matmul` and `.bernoulli`, the LSTM's VJP, native conv.

        Same values as `plain()` (up to float summation order; the same dropout bits),
        faster training steps on XLA:CPU; no `jax.jvp` / `jax.jacfwd` on the model.

        Args:
          lstm_custom_vjp: run `lstm_unroll` with its hand-written gradient.
          native_conv: run `conv2d(impl="auto")` on the native oneDNN kernels; None (the
            default) for `native.available()`, which loads them on first use.
          native_lstm: run `lstm_unroll` on the native fused recurrence (with
            `lstm_custom_vjp`); None (the default) for `native.available()`.

        Returns:
          A `Kernels`.

        Example:
          >>> Kernels.cpu().matmul is cpu_kernels.matmul
          True
        """
        if native_conv is None:
            native_conv = native.available()
        if native_lstm is None:
            native_lstm = native.available()
        return Kernels(matmul=cpu_kernels.matmul, bernoulli=cpu_kernels.bernoulli,
                       lstm_custom_vjp=bool(lstm_custom_vjp), native_conv=bool(native_conv),
                       native_lstm=bool(native_lstm and lstm_custom_vjp))


KernelChoice = Union[Literal["auto", "plain", "cpu"], Kernels]
"""What a model factory's `kernels=` takes: a name, or a `Kernels` record."""


def resolve_kernels(kernels: KernelChoice = "auto", backend: str | None = None) -> Kernels:
    """The `Kernels` record for a model factory's `kernels=` argument.

    `"plain"` -> `Kernels.plain()`; `"cpu"` -> `Kernels.cpu()`; `"auto"` -> `Kernels.cpu()`
    when `backend` is `"cpu"`, else `Kernels.plain(lstm_custom_vjp=True)`; a `Kernels` is
    returned as it is. Model factories call it once, when the model is built.

    Args:
      kernels: `"auto"`, `"plain"`, `"cpu"` or a `Kernels`.
      backend: the platform `"auto"` is for; default `jax.default_backend()` (which starts
        JAX's backends, as any computation does).

    Returns:
      A `Kernels`.

    Raises:
      ValueError: `kernels` is none of these.

    Example:
      >>> resolve_kernels("auto", backend="cpu") == Kernels.cpu()
      True
    """
    if isinstance(kernels, Kernels):
        return kernels
    if kernels == "plain":
        return Kernels.plain()
    if kernels == "cpu":
        return Kernels.cpu()
    if kernels == "auto":
        if (backend or jax.default_backend()) == "cpu":
            return Kernels.cpu()
        return Kernels.plain(lstm_custom_vjp=True)
    raise ValueError(f"kernels must be 'auto', 'plain', 'cpu' or an nn.Kernels, got {kernels!r}")


def _kernels(kernels: Kernels | None) -> Kernels:
    """A layer's `kernels` argument: `Kernels.plain()` when None."""
    if kernels is None:
        return _PLAIN
    if not isinstance(kernels, Kernels):
        raise TypeError(f"a layer's kernels= takes an nn.Kernels (or None for plain), got "
                        f"{kernels!r}; resolve names with nn.resolve_kernels")
    return kernels


_PLAIN = Kernels.plain()


# --------------------------------------------------------------------------- dense


def dense_init(key: PRNGKey, in_features: int, out_features: int,
               dtype=jnp.float32) -> dict[str, Array]:
    """Initialises a dense layer like haiku's `Linear`.

    `w ~ TruncatedNormal(stddev=1/sqrt(in_features))` truncated at 2 stddev, `b = 0`.

    Args:
      key: PRNG key.
      in_features: input width `I`.
      out_features: output width `O`.
      dtype: parameter dtype.

    Returns:
      `{'w': Float[Array, "I O"], 'b': Float[Array, "O"]}`.

    Example:
      >>> p = dense_init(jax.random.key(0), 3, 2)
      >>> p['w'].shape, p['b'].shape
      ((3, 2), (2,))
    """
    w = _truncated_normal(key, (in_features, out_features), 1.0 / in_features**0.5, dtype)
    return {"w": w, "b": jnp.zeros((out_features,), dtype)}


def dense(params: dict[str, Array], x: Float[ArrayLike, "... I"], *,
          kernels: Kernels | None = None) -> Float[Array, "... O"]:
    """A dense layer on the last axis.

    `y = x @ w + b`, the product by `kernels.matmul`.

    Args:
      params: from `dense_init`.
      x: `Float[Array, "... I"]`, any leading axes.
      kernels: the model's `Kernels`; None for `Kernels.plain()` (`jnp.dot`).

    Returns:
      `Float[Array, "... O"]`.

    Example:
      >>> dense({'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}, jnp.ones((5, 3))).shape
      (5, 2)
    """
    return _kernels(kernels).matmul(jnp.asarray(x), params["w"]) + params["b"]


# -------------------------------------------------------------------------- conv2d


def conv2d_init(key: PRNGKey, in_channels: int, out_channels: int,
                kernel_size: int | tuple[int, int] = 3,
                dtype=jnp.float32) -> dict[str, Array]:
    """Initialises a 2-D convolution like haiku's `Conv2D` (HWIO kernel).

    `w ~ VarianceScaling(1, fan_in, truncated_normal)`, i.e. truncated normal with
    variance `1 / (kh * kw * in_channels)`; `b = 0`.

    Args:
      key: PRNG key.
      in_channels: input channels `C`.
      out_channels: output channels `O`.
      kernel_size: `k` or `(kh, kw)`.
      dtype: parameter dtype.

    Returns:
      `{'w': Float[Array, "kh kw C O"], 'b': Float[Array, "O"]}`.

    Example:
      >>> conv2d_init(jax.random.key(0), 1, 32)['w'].shape
      (3, 3, 1, 32)
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    fan_in = kh * kw * in_channels
    stddev = (1.0 / fan_in) ** 0.5 / TRUNCATED_NORMAL_STDDEV
    w = _truncated_normal(key, (kh, kw, in_channels, out_channels), stddev, dtype)
    return {"w": w, "b": jnp.zeros((out_channels,), dtype)}


def _resolve_conv_impl(impl: ConvImpl, train: bool, kernels: "Kernels", dtype) -> str:
    """The convolution `conv2d(impl=...)` runs: `"lax"`, `"im2col"` or `"native"`."""
    if impl not in ("auto", "lax", "im2col", "native"):
        raise ValueError(f"conv impl must be 'auto', 'lax', 'im2col' or 'native', got {impl!r}")
    if impl != "auto":
        return impl
    if jax.default_backend() != "cpu":
        return "lax"
    # The native kernels: float32 training (evaluation's large batches run lax.conv's
    # forward faster: 1.84 against 2.15 s for 10,000 EMNIST examples), and bfloat16 where
    # the CPU has bf16 instructions (training and evaluation: 0.93 s for the same examples).
    if kernels.native_conv and ((dtype == jnp.float32 and train)
                                or (dtype == jnp.bfloat16 and native.has_bf16())):
        return "native"
    return "im2col" if train else "lax"


def im2col_patches(x: Float[ArrayLike, "B H W C"], kh: int, kw: int,
                   strides: tuple[int, int] = (1, 1)) -> Float[Array, "B Ho Wo K"]:
    """VALID image patches, gathered by slicing; `K = kh * kw * C` in (i, j, c) order.

    `patches[b, y, x, (i * kw + j) * C + c] = x[b, y * sy + i, x * sx + j, c]`.

    Args:
      x: `Float[Array, "B H W C"]` (NHWC).
      kh: kernel height.
      kw: kernel width.
      strides: `(sy, sx)`.

    Returns:
      `Float[Array, "B Ho Wo kh*kw*C"]`, `Ho = (H - kh) // sy + 1`, same for `Wo`.

    Example:
      >>> im2col_patches(jnp.ones((2, 5, 5, 3)), 3, 3).shape
      (2, 3, 3, 27)
    """
    x = jnp.asarray(x)
    b, h, w, c = x.shape
    sy, sx = strides
    ho, wo = (h - kh) // sy + 1, (w - kw) // sx + 1
    cols = [
        lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * sy + 1, j + (wo - 1) * sx + 1, c),
                  (1, sy, sx, 1))
        for i in range(kh) for j in range(kw)
    ]
    return jnp.stack(cols, axis=3).reshape(b, ho, wo, kh * kw * c)


def conv2d(params: dict[str, Array], x: Float[ArrayLike, "B H W C"], *,
           impl: ConvImpl = "auto", train: bool = False,
           strides: tuple[int, int] = (1, 1),
           padding: str | Sequence[tuple[int, int]] = "VALID",
           kernels: Kernels | None = None) -> Float[Array, "B Ho Wo O"]:
    """A 2-D convolution, NHWC input, HWIO kernel, `'VALID'` padding unless told otherwise.

    `y[b, y, x, o] = b[o] + sum_{i, j, c} xp[b, y*sy + i, x*sx + j, c] * w[i, j, c, o]`,
    `xp` = `x` zero-padded by `padding`.

    Three implementations compute it, equal up to float summation order:

    | impl | how | chosen by `"auto"` |
    | --- | --- | --- |
    | `"native"` | oneDNN's direct convolution (`native.conv`) | CPU, `kernels.native_conv`: (1) |
    | `"im2col"` | patches gathered by slicing, one `kernels.matmul` | otherwise on CPU when `train` |
    | `"lax"` | `lax.conv_general_dilated` | otherwise |

    (1) f32 when `train` (f32 evaluation keeps `lax.conv`, whose forward is faster at
    evaluation's batch sizes); bf16 always, on a CPU with bf16 instructions
    (`native.has_bf16()`); other dtypes never.

    Args:
      params: from `conv2d_init`.
      x: `Float[Array, "B H W C"]`.
      impl: `"auto"` (see the table), `"native"`, `"im2col"` or `"lax"`.
      train: whether this is a training pass (only used by `impl="auto"`).
      strides: `(sy, sx)`.
      padding: `"VALID"`, `"SAME"` (as `lax.conv_general_dilated`: `Ho = ceil(H / sy)`, the
        odd pixel after) or `((top, bottom), (left, right))`.
      kernels: the model's `Kernels` (the im2col form multiplies with its `matmul`;
        `native_conv` enables the native form); None for `Kernels.plain()`.

    Returns:
      `Float[Array, "B Ho Wo O"]`, `Ho = (H + top + bottom - kh) // sy + 1`.

    Raises:
      ValueError: an unknown `impl` or `padding`.
      RuntimeError: `impl="native"` when the native kernels are unavailable.

    Example:
      >>> p = conv2d_init(jax.random.key(0), 1, 32)
      >>> conv2d(p, jnp.ones((2, 28, 28, 1)), impl="im2col").shape
      (2, 26, 26, 32)
      >>> conv2d(p, jnp.ones((2, 28, 28, 1)), padding="SAME").shape
      (2, 28, 28, 32)
    """
    w, bias = params["w"], params["b"]
    kh, kw, cin, cout = w.shape
    x = jnp.asarray(x)
    kernels = _kernels(kernels)
    pads = native_conv.explicit_padding(padding, x.shape[1:3], (kh, kw), strides)
    chosen = _resolve_conv_impl(impl, train, kernels, x.dtype)
    if chosen == "native":
        y = native_conv.conv2d(x, w, strides, pads)
    elif chosen == "lax":
        y = lax.conv_general_dilated(x, w, window_strides=strides, padding=pads,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
        if pads != ((0, 0), (0, 0)):
            x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
        patches = im2col_patches(x, kh, kw, strides)
        y = kernels.matmul(patches, w.reshape(kh * kw * cin, cout))
    return y + bias


# ------------------------------------------------------------------------ max_pool


def max_pool(x: Float[ArrayLike, "B H W C"], window: int = 2, stride: int = 2, *,
             impl: Literal["auto", "reduce_window", "reshape"] = "auto"
             ) -> Float[Array, "B Ho Wo C"]:
    """Max pooling over `window x window` patches, 'VALID' padding, NHWC.

    `y[b, y, x, c] = max_{i, j < window} x[b, y*stride + i, x*stride + j, c]`.

    Args:
      x: `Float[Array, "B H W C"]`.
      window: window height and width.
      stride: stride in both spatial axes.
      impl: `"reduce_window"` (`lax.reduce_window`); `"reshape"` (only for
        `window == stride`: drop the VALID remainder, reshape to
        `[B, Ho, window, Wo, window, C]`, max over the window axes); `"auto"`: reshape
        when `window == stride`, else reduce_window. Same values; the reshape form
        makes an EMNIST CNN training step inside `fori_loop` on XLA:CPU about 15%
        faster. Their gradients differ only at ties inside a window (reduce_window
        sends it to one element, reshape splits it among the tied ones:
        `dx = (dy / count) * [x == y]`, `count` the window's number of maxima, which is
        `jnp.max`'s own rule). The reshape form counts the maxima by adding the
        `window**2` strided slices instead of a reduction over the window axes; the
        values are the same bits, and on XLA:CPU its backward pass fuses into one loop
        (an EMNIST CNN step with the native convolutions: 11.9 against 10.4 ms).

    Returns:
      `Float[Array, "B Ho Wo C"]`, `Ho = (H - window) // stride + 1`.

    Example:
      >>> max_pool(jnp.ones((2, 24, 24, 64))).shape
      (2, 12, 12, 64)
    """
    x = jnp.asarray(x)
    if impl == "auto":
        impl = "reshape" if window == stride else "reduce_window"
    if impl == "reshape":
        if window != stride:
            raise ValueError("max_pool impl='reshape' needs window == stride")
        b, h, w, c = x.shape
        ho, wo = h // window, w // window
        x = x[:, :ho * window, :wo * window]
        return _window_max(x.reshape(b, ho, window, wo, window, c))
    if impl != "reduce_window":
        raise ValueError(f"max_pool impl must be 'auto', 'reduce_window' or 'reshape', "
                         f"got {impl!r}")
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1),
                             (1, stride, stride, 1), "VALID")


@jax.custom_jvp
def _window_max(x: Array) -> Array:
    """`max` over axes 2 and 4 of `[B, Ho, k, Wo, k, C]` windows (see `max_pool`)."""
    return jnp.max(x, axis=(2, 4))


@_window_max.defjvp
def _window_max_jvp(primals, tangents):
    # jnp.max's own JVP, `sum(t * [x == y]) / count`, with `count` summed over the k * k
    # strided slices (exact small integers, so the same bits as its reduction). Reverse
    # mode transposes this into `(dy / count) * [x == y]`, which XLA:CPU fuses into one
    # loop; the reduction over the window axes ran separately, at a few GB/s.
    (x,), (t,) = primals, tangents
    y = _window_max(x)
    hit = (x == y[:, :, None, :, None, :]).astype(t.dtype)
    k_h, k_w = x.shape[2], x.shape[4]
    count = hit[:, :, 0, :, 0]
    for i in range(k_h):
        for j in range(k_w):
            if i or j:
                count = count + hit[:, :, i, :, j]
    return y, jnp.sum(t * hit, axis=(2, 4)) / count


# ----------------------------------------------------------------------- embedding


def embedding_init(key: PRNGKey, vocab_size: int, embed_size: int,
                   dtype=jnp.float32) -> dict[str, Array]:
    """Initialises an embedding table like haiku's `Embed`.

    `embeddings ~ TruncatedNormal(stddev=1)` truncated at 2.

    Args:
      key: PRNG key.
      vocab_size: number of rows `V`.
      embed_size: width `E`.
      dtype: parameter dtype.

    Returns:
      `{'embeddings': Float[Array, "V E"]}`.

    Example:
      >>> embedding_init(jax.random.key(0), 90, 8)['embeddings'].shape
      (90, 8)
    """
    return {"embeddings": _truncated_normal(key, (vocab_size, embed_size), 1.0, dtype)}


def embedding(params: dict[str, Array], ids: Int[ArrayLike, "..."]) -> Float[Array, "... E"]:
    """Looks up rows of the embedding table.

    `y[...] = embeddings[ids[...]]`.

    Args:
      params: from `embedding_init`.
      ids: `Int[Array, "..."]`, values in `[0, V)`.

    Returns:
      `Float[Array, "... E"]`.

    Example:
      >>> embedding({'embeddings': jnp.eye(3)}, jnp.array([[2, 0]])).shape
      (1, 2, 3)
    """
    return jnp.take(params["embeddings"], jnp.asarray(ids), axis=0)


# -------------------------------------------------------------------------- dropout


def dropout(x: Float[ArrayLike, "..."], rate: float, key: PRNGKey | None,
            train: bool, *, kernels: Kernels | None = None) -> Float[Array, "..."]:
    """Inverted dropout.

    `y = x * m / (1 - rate)`, `m ~ Bernoulli(1 - rate)` elementwise; `y = x` when
    `not train` or `rate == 0`. The mask is `kernels.bernoulli(key, 1 - rate, x.shape)`:
    `jax.random.bernoulli`'s bits with every `Kernels` choice.

    Args:
      x: any array.
      rate: probability of zeroing an element, a Python float in `[0, 1]`.
      key: PRNG key; needed only when `train` and `rate > 0`.
      train: whether to drop.
      kernels: the model's `Kernels`; None for `Kernels.plain()` (`jax.random.bernoulli`).

    Returns:
      An array like `x`.

    Example:
      >>> dropout(jnp.ones(4), 0.5, jax.random.key(0), train=False)
      Array([1., 1., 1., 1.], dtype=float32)
    """
    x = jnp.asarray(x)
    if not train or rate == 0.0:
        return x
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"dropout rate must be in [0, 1], got {rate}")
    if key is None:
        raise ValueError("dropout with train=True and rate > 0 needs a key")
    if rate == 1.0:
        return jnp.zeros_like(x)
    keep = _kernels(kernels).bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


# ----------------------------------------------------------------------------- LSTM


class LSTMState(NamedTuple):
    """The recurrent state of an LSTM layer: `hidden` and `cell`, each `[B, H]`."""

    hidden: Array
    cell: Array


def lstm_init(key: PRNGKey, input_size: int, hidden_size: int,
              dtype=jnp.float32) -> dict[str, Array]:
    """Initialises one LSTM layer like haiku's `LSTM` (one `Linear` on `[x, h]`).

    `w ~ TruncatedNormal(stddev=1/sqrt(I + H))`, `b = 0`.

    Args:
      key: PRNG key.
      input_size: input width `I`.
      hidden_size: hidden width `H`.
      dtype: parameter dtype.

    Returns:
      `{'w': Float[Array, "I+H 4H"], 'b': Float[Array, "4H"]}`; the gate columns are
      ordered `i, g, f, o`.

    Example:
      >>> lstm_init(jax.random.key(0), 8, 256)['w'].shape
      (264, 1024)
    """
    return dense_init(key, input_size + hidden_size, 4 * hidden_size, dtype)


def lstm_initial_state(batch_size: int, hidden_size: int, dtype=jnp.float32) -> LSTMState:
    """Zero state: `LSTMState(hidden=0[B, H], cell=0[B, H])`.

    Args:
      batch_size: `B`.
      hidden_size: `H`.
      dtype: dtype of the state.

    Returns:
      An `LSTMState`.

    Example:
      >>> lstm_initial_state(4, 256).cell.shape
      (4, 256)
    """
    z = jnp.zeros((batch_size, hidden_size), dtype)
    return LSTMState(hidden=z, cell=z)


def _lstm_gates(gates: Array, cell: Array) -> tuple[Array, LSTMState]:
    i, g, f, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f + 1.0) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return h, LSTMState(hidden=h, cell=c)


def lstm_cell(params: dict[str, Array], x: Float[ArrayLike, "B I"], state: LSTMState, *,
              kernels: Kernels | None = None) -> tuple[Float[Array, "B H"], LSTMState]:
    """One step of an LSTM layer, in haiku's convention.

    `[i, g, f, o] = [x, h] @ w + b`;
    `c' = sigmoid(f + 1) * c + sigmoid(i) * tanh(g)`; `h' = sigmoid(o) * tanh(c')`.

    Args:
      params: from `lstm_init`.
      x: `Float[Array, "B I"]`.
      state: `LSTMState` with `hidden`, `cell` of shape `[B, H]`.
      kernels: the model's `Kernels` (its `matmul`); None for `Kernels.plain()`.

    Returns:
      `(h', LSTMState(h', c'))`, `h'` of shape `[B, H]`.

    Example:
      >>> p = lstm_init(jax.random.key(0), 3, 5)
      >>> h, s = lstm_cell(p, jnp.ones((2, 3)), lstm_initial_state(2, 5))
      >>> h.shape
      (2, 5)
    """
    xh = jnp.concatenate([jnp.asarray(x), state.hidden], axis=-1)
    return _lstm_gates(dense(params, xh, kernels=kernels), state.cell)


def _lstm_scan(x_proj: Array, w_h: Array, h0: Array, c0: Array,
               keep_residuals: bool = False):
    """The recurrence over time-major `x_proj` `[T, B, 4H]`; one `lax.scan`."""

    def step(carry, xp_t):
        h, c = carry
        z = xp_t + jnp.dot(h, w_h)
        h, (_, c) = _lstm_gates(z, c)
        return (h, c), ((h, c, z) if keep_residuals else h)

    return lax.scan(step, (h0, c0), x_proj)


@jax.custom_vjp
def _lstm_recurrence(x_proj: Array, w_h: Array, h0: Array, c0: Array):
    """`(hs [T, B, H], h_T, c_T)`; its VJP computes the weight gradient in one matmul."""
    (h, c), hs = _lstm_scan(x_proj, w_h, h0, c0)
    return hs, h, c


def _lstm_recurrence_fwd(x_proj, w_h, h0, c0):
    (h, c), (hs, cs, zs) = _lstm_scan(x_proj, w_h, h0, c0, keep_residuals=True)
    return (hs, h, c), (w_h, h0, c0, hs, cs, zs)


def _lstm_recurrence_bwd(residuals, cotangents):
    # Back-propagation through time. Autodiff of the scan would add the per-step
    # outer product h_{t-1}^T dz_t into a [H, 4H] carry at every step; here the
    # reverse scan carries only (dh, dc), and dW_h = sum_t h_{t-1}^T dz_t is one matmul.
    w_h, h0, c0, hs, cs, zs = residuals
    d_hs, d_h_last, d_c_last = cotangents
    c_prev = jnp.concatenate([c0[None], cs[:-1]], axis=0)
    h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    w_h_t = w_h.T

    def step(carry, inputs):
        dh, dc = carry
        dh_t, z, c, cp = inputs
        zi, zg, zf, zo = jnp.split(z, 4, axis=-1)
        i, g, f, o = (jax.nn.sigmoid(zi), jnp.tanh(zg), jax.nn.sigmoid(zf + 1.0),
                      jax.nn.sigmoid(zo))
        dh = dh + dh_t
        tc = jnp.tanh(c)
        dc = dc + dh * o * (1.0 - tc * tc)
        dz = jnp.concatenate([dc * g * i * (1.0 - i),      # d i-gate
                              dc * i * (1.0 - g * g),      # d g-gate
                              dc * cp * f * (1.0 - f),     # d f-gate
                              dh * tc * o * (1.0 - o)],    # d o-gate
                             axis=-1)
        return (jnp.dot(dz, w_h_t), dc * f), dz

    (dh0, dc0), dzs = lax.scan(step, (d_h_last, d_c_last), (d_hs, zs, cs, c_prev),
                               reverse=True)
    d_w_h = jnp.einsum("tbh,tbg->hg", h_prev, dzs)
    return dzs, d_w_h, dh0, dc0


_lstm_recurrence.defvjp(_lstm_recurrence_fwd, _lstm_recurrence_bwd)


def lstm_unroll(params: dict[str, Array], xs: Float[ArrayLike, "B T I"],
                initial_state: LSTMState | None = None, *, custom_vjp: bool = True,
                native: bool = False) -> tuple[Float[Array, "B T H"], LSTMState]:
    """Runs `lstm_cell` over time with one `lax.scan`, batch-major.

    The input projection of all steps, `xs @ w[:I] + b`, is one matmul outside the
    scan; each step then adds only `h @ w[I:]`. Same values as looping `lstm_cell`.

    With `custom_vjp=True` (the default) the gradient is a hand-written
    back-propagation through time: a reverse scan that carries only `(dh, dc)`, then
    `dW = [X, H_prev]^T dZ` as matmuls over all steps at once. On XLA:CPU this makes a
    training step of the Shakespeare LSTM about 2x faster than autodiff of the scan.
    It supports reverse mode, vmap, reverse-over-reverse and forward-over-reverse
    (`jax.hessian`), but not forward mode on it directly (`jax.jvp`, `jax.jacfwd`):
    pass `custom_vjp=False` for those. The task models pass their
    `Kernels.lstm_custom_vjp` here. With `native=True` (the models' `Kernels.native_lstm`)
    and `custom_vjp`, the recurrence is `native.lstm.lstm_recurrence` on a CPU backend
    (all steps in one native call, BPTT in another; same values up to float rounding).

    Args:
      params: from `lstm_init`.
      xs: `Float[Array, "B T I"]`.
      initial_state: an `LSTMState` with `[B, H]` arrays; zeros when None.
      custom_vjp: use the hand-written gradient (see above) instead of autodiff.
      native: run the recurrence on the native kernels (see above); ignored without
        `custom_vjp`, for an empty sequence, and off a CPU backend.

    Returns:
      `(hs, final_state)`: `hs` is `Float[Array, "B T H"]`, the hidden output of every
      step; `final_state` the `LSTMState` after the last step.

    Example:
      >>> p = lstm_init(jax.random.key(0), 8, 16)
      >>> hs, _ = lstm_unroll(p, jnp.ones((4, 80, 8)))
      >>> hs.shape
      (4, 80, 16)
    """
    xs = jnp.asarray(xs)
    w, b = params["w"], params["b"]
    in_size = xs.shape[-1]
    hidden = w.shape[-1] // 4
    if initial_state is None:
        initial_state = lstm_initial_state(xs.shape[0], hidden, jnp.result_type(xs, w))
    w_x, w_h = w[:in_size], w[in_size:]
    # [T, B, 4H]: time-major so that the scan slices contiguous steps.
    x_proj = jnp.dot(jnp.swapaxes(xs, 0, 1), w_x) + b
    h0, c0 = initial_state.hidden, initial_state.cell
    if native and custom_vjp and x_proj.shape[0] > 0 and jax.default_backend() == "cpu":
        hs, h, c = native_lstm.lstm_recurrence(x_proj, w_h, h0, c0)
    elif custom_vjp:
        hs, h, c = _lstm_recurrence(x_proj, w_h, h0, c0)
    else:
        (h, c), hs = _lstm_scan(x_proj, w_h, h0, c0)
    return jnp.swapaxes(cast(Array, hs), 0, 1), LSTMState(hidden=h, cell=c)


__all__ = [
    "ConvImpl",
    "KernelChoice",
    "Kernels",
    "LSTMState",
    "conv2d",
    "conv2d_init",
    "dense",
    "dense_init",
    "dropout",
    "embedding",
    "embedding_init",
    "im2col_patches",
    "lstm_cell",
    "lstm_init",
    "lstm_initial_state",
    "lstm_unroll",
    "max_pool",
    "resolve_kernels",
]
