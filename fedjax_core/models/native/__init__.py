"""Native CPU kernels (oneDNN through XLA's FFI), optional, with the pure-JAX path as fallback.

fedjax-sim's layers are pure JAX. On CPUs, some of them have faster native forms: C++
handlers over oneDNN (Intel's deep-learning kernel library, the CPU backend of PyTorch and
TensorFlow) that XLA:CPU calls through its foreign-function interface (`jax.ffi`). They
live in one shared library, built from `src/` by `python -m fedjax_core.models.native.build`
(`make run` / `make test` build it when cmake, a C++ compiler and the `[native]` extra's
oneDNN are present).

| module | kernel | replaces |
| --- | --- | --- |
| `native.conv` | `conv2d` forward, input and weight gradients, f32 / bf16 (Winograd 3x3) | im2col, `lax.conv` |
| `native.lstm` | the LSTM recurrence over a sequence, forward and BPTT backward, f32 | `lax.scan` in `nn.lstm_unroll` |

This module finds and loads the library and registers its handlers with JAX, once, the
first time `available()` is asked. The layers never call it by themselves: a model's
`nn.Kernels` record says whether it uses native kernels (`Kernels.cpu()` does when
`available()`), chosen when the model is built.

Each kernel call runs on `FEDJAX_NATIVE_THREADS` threads (default `DEFAULT_THREADS`; 0
for every core), read once when the library loads: oneDNN's kernels through GNU OpenMP,
the Winograd and LSTM kernels written here on XLA's own intra-op thread pool (the calling
thread plus pool tasks), which inside a training step is what frees the second core.

float32 3x3 convolutions with stride 1 and channel counts that are multiples of 16 run on
Winograd F(2x2, 3x3) kernels written here (`src/winograd.cc`, AVX-512 CPUs), every other
convolution on oneDNN's direct ones. `FEDJAX_NATIVE_CONV=direct` (read when the library
loads) or `set_conv_algorithm("direct")` keeps every convolution on oneDNN's direct kernels.

The native path is off when:
- the library is not built (no compiler, no oneDNN: `pip install -e '.[native]'` then
  `python -m fedjax_core.models.native.build`), or oneDNN cannot be loaded;
- `FEDJAX_NATIVE=0` is set in the environment (read once, at the first `available()`);
- JAX's default backend is not CPU (the models then take the XLA path).

Example:
  >>> from fedjax_core.models import native
  >>> native.available(), native.reason()  # doctest: +SKIP
  (True, 'loaded .../libfedjax_native.so (bf16 kernels: yes; threads per call: all cores)')
"""

import ctypes
import os
import threading
import warnings
from pathlib import Path

import jax

PACKAGE_DIR = Path(__file__).resolve().parent
LIBRARY = PACKAGE_DIR / "lib" / "libfedjax_native.so"
"""Where `build` writes the library (git-ignored)."""

DEFAULT_THREADS = 0
"""Threads per kernel call unless `FEDJAX_NATIVE_THREADS` says otherwise: 0, every core
(oneDNN's default; XLA's pool size for the Winograd kernels; two halves for the LSTM). On
the quiet 2-core machine the EMNIST CNN round took 1.50 s with every core against 2.12 s
with one thread per call (oneDNN's direct kernels); when other processes share the cores,
OpenMP's barriers make every call wait for a descheduled thread (10-30x slower calls
measured), and `FEDJAX_NATIVE_THREADS=1` is the better setting. See docs/performance.md."""

_lock = threading.Lock()
_state: dict = {}

# The FFI targets of the library: name in JAX -> handler symbol.
_TARGETS = {
    "fedjax_conv2d_forward": "FedjaxConv2dForward",
    "fedjax_conv2d_backward_data": "FedjaxConv2dBackwardData",
    "fedjax_conv2d_backward_weights": "FedjaxConv2dBackwardWeights",
    "fedjax_lstm_forward": "FedjaxLstmForward",
    "fedjax_lstm_backward": "FedjaxLstmBackward",
}


def _threads() -> int:
    """Threads per kernel call: `FEDJAX_NATIVE_THREADS`, else `DEFAULT_THREADS` (0: all cores)."""
    raw = os.environ.get("FEDJAX_NATIVE_THREADS", "").strip()
    try:
        return max(int(raw), 0) if raw else DEFAULT_THREADS
    except ValueError:
        warnings.warn(f"FEDJAX_NATIVE_THREADS={raw!r} is not a whole number; the native "
                      f"kernels use {DEFAULT_THREADS or 'every core'} (set it to e.g. 1)",
                      stacklevel=2)
        return DEFAULT_THREADS


CONV_ALGORITHMS = ("auto", "direct")
"""`set_conv_algorithm`'s choices: `auto` (Winograd where it applies, else direct) and
`direct` (oneDNN's direct convolutions only)."""


def _conv_algorithm() -> str:
    """The convolution algorithm of `FEDJAX_NATIVE_CONV`, else `auto`."""
    raw = os.environ.get("FEDJAX_NATIVE_CONV", "").strip().lower()
    if raw in ("", *CONV_ALGORITHMS):
        return raw or "auto"
    warnings.warn(f"FEDJAX_NATIVE_CONV={raw!r} is not one of {', '.join(CONV_ALGORITHMS)}; the "
                  f"native kernels use auto", stacklevel=2)
    return "auto"


def _load() -> dict:
    """Loads the library and registers its targets once; returns the state record."""
    with _lock:
        if _state:
            return _state
        if os.environ.get("FEDJAX_NATIVE", "1").strip() == "0":
            _state.update(ok=False, reason="off (FEDJAX_NATIVE=0)")
            return _state
        if not LIBRARY.is_file():
            _state.update(ok=False, reason=(
                "not built (pip install -e '.[native]', then python -m "
                "fedjax_core.models.native.build)"))
            return _state
        try:
            lib = ctypes.CDLL(str(LIBRARY))
        except OSError as error:
            _state.update(ok=False, reason=f"cannot be loaded ({error})")
            return _state
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
        threads = _threads()
        lib.fedjax_native_set_threads(threads)
        algorithm = _conv_algorithm()
        lib.fedjax_native_set_conv_algorithm(CONV_ALGORITHMS.index(algorithm))
        bf16 = bool(lib.fedjax_native_has_bf16())
        _state.update(ok=True, lib=lib, bf16=bf16, threads=threads, reason=(
            f"loaded {LIBRARY} (bf16 kernels: {'yes' if bf16 else 'emulated or none'}; "
            f"threads per call: {threads or 'all cores'}; 3x3 convolutions: {algorithm}, "
            f"Winograd kernels: {'yes' if lib.fedjax_native_has_winograd() else 'no (no AVX-512)'})"))
        return _state


def set_conv_algorithm(algorithm: str) -> None:
    """Chooses the native float32 3x3 convolutions' algorithm, from the next kernel call on.

    `auto` (the default): Winograd F(2x2, 3x3) (Lavin and Gray, CVPR 2016: each 2x2 output
    tile is `A^T [(G g G^T) .* (B^T d B)] A`, 16 multiplications instead of 36) for float32,
    3x3, stride 1, both channel counts multiples of 16, on AVX-512 CPUs; oneDNN's direct
    convolution otherwise. `direct`: oneDNN's direct convolution always. The two agree up to
    float summation order (about 1e-7 relative). Compiled functions pick the change up too:
    the choice is made inside each kernel call. (`reason()` names the algorithm chosen when
    the library loaded.)

    Args:
      algorithm: `"auto"` or `"direct"`.

    Raises:
      ValueError: another name.
      RuntimeError: the native kernels are unavailable.

    Example:
      >>> if available():
      ...     set_conv_algorithm("direct")  # compare against oneDNN's direct kernels
      ...     set_conv_algorithm("auto")
    """
    if algorithm not in CONV_ALGORITHMS:
        raise ValueError(f"conv algorithm must be one of {', '.join(CONV_ALGORITHMS)}, got "
                         f"{algorithm!r}")
    state = _load()
    if not state["ok"]:
        raise RuntimeError(f"native kernels are {state['reason']}")
    state["lib"].fedjax_native_set_conv_algorithm(CONV_ALGORITHMS.index(algorithm))


def available() -> bool:
    """Whether the native kernels are loaded and on (see the module docstring).

    Returns:
      True when the library is built, loads, and `FEDJAX_NATIVE` is not `0`.

    Example:
      >>> isinstance(available(), bool)
      True
    """
    return bool(_load()["ok"])


def has_bf16() -> bool:
    """Whether the CPU runs the native kernels' bfloat16 paths in hardware (AVX512_BF16, AMX).

    Returns:
      False when the native kernels are unavailable.

    Example:
      >>> has_bf16() in (True, False)
      True
    """
    state = _load()
    return bool(state["ok"] and state["bf16"])


def reason() -> str:
    """One line saying whether the native kernels are used, and why not when they are not.

    Example:
      >>> isinstance(reason(), str)
      True
    """
    return str(_load()["reason"])
