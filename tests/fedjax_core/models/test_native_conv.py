"""Tests for the native conv2d kernels (fedjax_core.models.native) against lax.conv_general_dilated."""

import os
import subprocess
import sys
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedjax_core.models import native, nn
from fedjax_core.models.native import build, conv

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels {native.reason()}")


def _lax(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def _close(got, want, tol=1e-5):
    """Equal to `tol` relative to the largest magnitude (float summation order differs)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = max(float(np.abs(want).max()), 1.0)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


def test_the_library_is_built_wherever_it_can_be():
    # `make test` builds the kernels when cmake, a compiler and oneDNN are present; then
    # they must load (a broken build or load would silently fall back otherwise).
    if build.missing_tools() is not None or os.environ.get("FEDJAX_NATIVE") == "0":
        pytest.skip(f"cannot build here: {build.missing_tools() or 'FEDJAX_NATIVE=0'}")
    assert native.available(), native.reason()


CASES = [  # (x shape, kernel h, w, out channels, strides, padding)
    ((2, 9, 7, 3), (3, 3), 5, (1, 1), "VALID"),
    ((2, 9, 7, 3), (3, 3), 5, (2, 1), "SAME"),
    ((1, 8, 8, 4), (2, 2), 3, (2, 2), "SAME"),
    ((3, 6, 5, 1), (3, 2), 4, (1, 2), "VALID"),
    ((2, 7, 7, 2), (5, 5), 2, (3, 3), ((2, 1), (0, 2))),
    ((2, 28, 28, 1), (3, 3), 8, (1, 1), "VALID"),  # the EMNIST CNN's first layer, narrower
]


@needs_native
@pytest.mark.parametrize("shape,kernel,out,strides,padding", CASES)
def test_forward_and_gradients_match_lax(shape, kernel, out, strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*kernel, shape[-1], out)), jnp.float32)
    f = jax.jit(lambda x, w: conv.conv2d(x, w, strides, padding))
    _close(f(x, w), _lax(x, w, strides, padding))
    assert "fedjax_conv2d_forward" in f.lower(x, w).as_text()

    def loss(impl):
        return lambda x, w: jnp.sum(jnp.sin(impl(x, w, strides, padding)))

    got = jax.jit(jax.grad(loss(conv.conv2d), (0, 1)))(x, w)
    want = jax.grad(loss(_lax), (0, 1))(x, w)
    for g, r in zip(got, want):
        _close(g, r)


@needs_native
def test_vmap_shared_and_per_example_kernels_and_their_gradients():
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.normal(size=(3, 2, 7, 6, 2)), jnp.float32)
    ws = jnp.asarray(rng.normal(size=(3, 3, 3, 2, 4)), jnp.float32)
    args = ((2, 1), "SAME")
    # Shared kernel: folded into the batch; per-example kernels: one conv per index.
    _close(jax.vmap(lambda x: conv.conv2d(x, ws[0], *args))(xs),
           jax.vmap(lambda x: _lax(x, ws[0], *args))(xs))
    _close(jax.vmap(lambda x, w: conv.conv2d(x, w, *args))(xs, ws),
           jax.vmap(lambda x, w: _lax(x, w, *args))(xs, ws))
    # Unbatched input, batched kernels; and nested vmap.
    _close(jax.vmap(lambda w: conv.conv2d(xs[0], w, *args))(ws),
           jax.vmap(lambda w: _lax(xs[0], w, *args))(ws))
    _close(jax.vmap(jax.vmap(lambda x, w: conv.conv2d(x[None], w, *args), (0, None)),
                    (None, 0))(xs[:, 0], ws),
           jax.vmap(jax.vmap(lambda x, w: _lax(x[None], w, *args), (0, None)),
                    (None, 0))(xs[:, 0], ws))

    def loss(impl):
        return lambda x, w: jnp.sum(jnp.tanh(impl(x, w, *args)) ** 2)

    # Per-client gradients (vmap of grad) and the gradient of a vmapped loss (grad of vmap,
    # which sums the shared kernel's cotangent over the vmapped axis).
    for g, r in zip(jax.vmap(jax.grad(loss(conv.conv2d), (0, 1)))(xs, ws),
                    jax.vmap(jax.grad(loss(_lax), (0, 1)))(xs, ws)):
        _close(g, r)
    _close(jax.grad(lambda w: jnp.sum(jax.vmap(lambda x: loss(conv.conv2d)(x, w))(xs)))(ws[0]),
           jax.grad(lambda w: jnp.sum(jax.vmap(lambda x: loss(_lax)(x, w))(xs)))(ws[0]))


@needs_native
def test_every_autodiff_mode_and_loops():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 5, 5, 2)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 2, 2, 3)), jnp.float32)
    args = ((2, 2), "SAME")

    def loss(impl):
        return lambda x, w: jnp.sum(jnp.tanh(impl(x, w, *args)))

    nat, ref = loss(conv.conv2d), loss(_lax)
    # Forward mode (each kernel is bilinear; its JVP is two more kernels).
    _close(jax.jvp(nat, (x, w), (0.3 * x, 0.1 * w))[1], jax.jvp(ref, (x, w), (0.3 * x, 0.1 * w))[1])
    # jax.hessian (forward over reverse) and reverse over reverse.
    _close(jax.hessian(nat, 1)(x, w), jax.hessian(ref, 1)(x, w))
    _close(jax.grad(lambda w: jnp.sum(jax.grad(nat, 0)(x, w) ** 2))(w),
           jax.grad(lambda w: jnp.sum(jax.grad(ref, 0)(x, w) ** 2))(w))

    # SGD inside fori_loop and scan, as a round runs it.
    def sgd(f):
        return jax.jit(lambda x, w: lax.fori_loop(
            0, 3, lambda i, w: w - 0.01 * jax.grad(f, 1)(x, w), w))

    _close(sgd(nat)(x, w), sgd(ref)(x, w))

    def scanned(f):
        return jax.jit(lambda xs, w: lax.scan(
            lambda w, x: (w - 0.01 * jax.grad(f, 1)(x, w), None), w, xs)[0])

    _close(scanned(nat)(jnp.stack([x, -x]), w), scanned(ref)(jnp.stack([x, -x]), w))


@pytest.fixture
def conv_algorithm():
    """Sets `native.set_conv_algorithm` for one test, back to `auto` afterwards."""
    yield native.set_conv_algorithm
    native.set_conv_algorithm("auto")


WINOGRAD_CASES = [  # 3x3, stride 1, channels multiples of 16: (x shape, out channels, padding)
    ((2, 9, 7, 16), 32, "VALID"),  # odd output sizes: partial 2x2 tiles at the edges
    ((3, 8, 11, 32), 16, "SAME"),
    ((1, 6, 6, 16), 48, ((2, 0), (1, 2))),  # asymmetric pads, 48 = a 3-vector column block
    ((5, 20, 17, 16), 80, ((0, 1), (1, 0))),  # more tile blocks than threads; 80 = 64 + 16
    ((2, 3, 3, 32), 16, "VALID"),  # a single output pixel
]


@needs_native
@pytest.mark.parametrize("algorithm", ["auto", "direct"])
@pytest.mark.parametrize("shape,out,padding", WINOGRAD_CASES)
def test_3x3_convolutions_match_lax_with_either_algorithm(conv_algorithm, algorithm, shape,
                                                          out, padding):
    conv_algorithm(algorithm)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, shape[-1], out)) / 12, jnp.float32)
    args = ((1, 1), padding)
    y, back = jax.vjp(lambda x, w: conv.conv2d(x, w, *args), x, w)
    want_y, want_back = jax.vjp(lambda x, w: _lax(x, w, *args), x, w)
    _close(y, want_y)
    ct = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    for g, r in zip(back(ct), want_back(ct)):
        _close(g, r)


@needs_native
def test_winograd_runs_where_it_applies_and_direct_elsewhere(conv_algorithm):
    if "Winograd kernels: yes" not in native.reason():
        pytest.skip("no AVX-512 here: every convolution is oneDNN's direct one")
    rng = np.random.default_rng(8)

    def outputs(x, w, algorithm):
        conv_algorithm(algorithm)
        y, back = jax.vjp(lambda x, w: conv.conv2d(x, w), x, w)
        return [np.asarray(a) for a in (y, *back(jnp.cos(y)))]

    # 16 -> 32 channels, 3x3, stride 1: the two algorithms sum in different orders, so some
    # bits differ in each of the forward, input gradient and weight gradient.
    x = jnp.asarray(rng.normal(size=(2, 10, 10, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 16, 32)) / 12, jnp.float32)
    for a, b in zip(outputs(x, w, "auto"), outputs(x, w, "direct")):
        assert not np.array_equal(a, b)
        _close(a, b)
    # 1 input channel (the EMNIST CNN's first layer): direct under either setting.
    x1, w1 = x[..., :1], w[:, :, :1, :]
    for a, b in zip(outputs(x1, w1, "auto"), outputs(x1, w1, "direct")):
        np.testing.assert_array_equal(a, b)


@needs_native
def test_winograd_results_repeat_and_depend_on_the_thread_count_only_in_the_weight_sum(
        conv_algorithm):
    # The tiles are split into one range per thread (the caller's and XLA's pool threads):
    # forward and input gradient are the same bits for any split; the weight gradient adds
    # the ranges' partial sums, so one thread sums in another order (close, not equal).
    conv_algorithm("auto")
    rng = np.random.default_rng(13)
    # 8 x 36 tiles of 2x2 outputs: 8 blocks of 36, enough for two parts of at least 4.
    x = jnp.asarray(rng.normal(size=(8, 14, 13, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 16, 32)) / 12, jnp.float32)
    @jax.jit
    def f(x, w):
        y, back = jax.vjp(lambda x, w: conv.conv2d(x, w), x, w)
        return (y, *back(jnp.cos(y)))

    state = native._load()
    try:
        runs = []
        for threads in (2, 2, 1):
            state["lib"].fedjax_native_set_threads(threads)
            runs.append([np.asarray(a) for a in f(x, w)])
    finally:
        state["lib"].fedjax_native_set_threads(state["threads"])
    (two, again, one) = runs
    for a, b in zip(two, again):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(two[0], one[0])
    np.testing.assert_array_equal(two[1], one[1])
    _close(two[2], one[2], tol=1e-6)
    if (os.cpu_count() or 1) >= 2:  # XLA's pool has a second thread: two parts ran
        assert not np.array_equal(two[2], one[2])


@needs_native
def test_winograd_under_vmap_and_in_a_training_loop(conv_algorithm):
    conv_algorithm("auto")
    rng = np.random.default_rng(9)
    xs = jnp.asarray(rng.normal(size=(3, 2, 8, 7, 16)), jnp.float32)
    ws = jnp.asarray(rng.normal(size=(3, 3, 3, 16, 16)) / 12, jnp.float32)

    def loss(impl):
        return lambda x, w: jnp.sum(jnp.tanh(impl(x, w, (1, 1), "SAME")) ** 2)

    # Shared kernel (folded into the batch) and per-example kernels, with gradients.
    _close(jax.vmap(lambda x: conv.conv2d(x, ws[0], (1, 1), "SAME"))(xs),
           jax.vmap(lambda x: _lax(x, ws[0], (1, 1), "SAME"))(xs))
    for g, r in zip(jax.vmap(jax.grad(loss(conv.conv2d), (0, 1)))(xs, ws),
                    jax.vmap(jax.grad(loss(_lax), (0, 1)))(xs, ws)):
        _close(g, r)

    def scanned(f):
        return jax.jit(lambda xs, w: lax.scan(
            lambda w, x: (w - 0.05 * jax.grad(f, 1)(x, w), None), w, xs)[0])

    _close(scanned(loss(conv.conv2d))(xs, ws[0]), scanned(loss(_lax))(xs, ws[0]))


def test_conv_algorithm_comes_from_the_environment_or_the_setter(monkeypatch):
    monkeypatch.delenv("FEDJAX_NATIVE_CONV", raising=False)
    assert native._conv_algorithm() == "auto"
    for raw, want in (("direct", "direct"), (" Direct ", "direct"), ("auto", "auto")):
        monkeypatch.setenv("FEDJAX_NATIVE_CONV", raw)
        assert native._conv_algorithm() == want
    monkeypatch.setenv("FEDJAX_NATIVE_CONV", "winograd-only")
    with pytest.warns(UserWarning, match="FEDJAX_NATIVE_CONV='winograd-only' is not one of auto, direct"):
        assert native._conv_algorithm() == "auto"
    with pytest.raises(ValueError, match="conv algorithm must be one of auto, direct, got 'fast'"):
        native.set_conv_algorithm("fast")


@needs_native
def test_bfloat16_inputs_follow_the_f32_result():
    if not native.has_bf16():
        pytest.skip("this CPU has no bf16 instructions (oneDNN would emulate or refuse)")
    rng = np.random.default_rng(3)
    # 32 -> 64 channels as the EMNIST CNN's second layer: the bf16 input gradient runs in
    # oneDNN's blocked layout (reorders in and out of NHWC).
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 3, 32, 64)), jnp.bfloat16)
    y = conv.conv2d(x, w, (1, 1), "SAME")
    assert y.dtype == jnp.bfloat16
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    # bf16 products, f32 accumulation, one bf16 rounding of the output: ~2^-8 relative.
    _close(y, _lax(x32, w32, (1, 1), "SAME"), tol=1e-2)
    ct = jnp.asarray(rng.normal(size=y.shape), jnp.bfloat16)
    dx, dw = jax.vjp(lambda x, w: conv.conv2d(x, w, (1, 1), "SAME"), x, w)[1](ct)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    want_dx, want_dw = jax.vjp(lambda x, w: _lax(x, w, (1, 1), "SAME"), x32, w32)[1](
        ct.astype(jnp.float32))
    _close(dx, want_dx, tol=1e-2)
    _close(dw, want_dw, tol=1e-2)


@needs_native
def test_nn_conv2d_picks_native_from_the_models_kernels():
    rng = np.random.default_rng(4)
    params = nn.conv2d_init(jax.random.key(0), 3, 4)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    on, off = nn.Kernels.cpu(native_conv=True), nn.Kernels.cpu(native_conv=False)

    def hlo(kernels, train, impl: nn.ConvImpl = "auto"):
        return jax.jit(lambda x: nn.conv2d(params, x, train=train, impl=impl,
                                           kernels=kernels)).lower(x).as_text()

    assert "fedjax_conv2d_forward" in hlo(on, True)
    # f32 evaluation keeps lax.conv (faster forward at large batches); bf16 takes native.
    assert "fedjax_conv2d_forward" not in hlo(on, False)
    if native.has_bf16():
        bf16 = jax.jit(lambda x: nn.conv2d(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params),
                                           x.astype(jnp.bfloat16), kernels=on)).lower(x).as_text()
        assert "fedjax_conv2d_forward" in bf16
    assert "fedjax_conv2d_forward" not in hlo(off, True)
    assert "fedjax_conv2d_forward" in hlo(off, True, impl="native")
    assert "fedjax_conv2d_forward" not in hlo(None, True)
    for padding in ("VALID", "SAME", ((1, 0), (2, 1))):
        impls: tuple[nn.ConvImpl, ...] = ("native", "im2col", "lax")
        ys = [nn.conv2d(params, x, impl=impl, padding=padding, strides=(2, 1), kernels=on)
              for impl in impls]
        _close(ys[0], ys[2])
        _close(ys[1], ys[2])
    # float16 has no native kernel: "auto" takes the XLA path.
    assert "fedjax_conv2d_forward" not in jax.jit(lambda x: nn.conv2d(
        jax.tree.map(lambda a: a.astype(jnp.float16), params), x.astype(jnp.float16),
        train=True, kernels=on)).lower(x).as_text()


def test_bad_arguments_are_one_clear_error():
    with pytest.raises(ValueError, match="padding must be 'VALID', 'SAME'"):
        conv.explicit_padding("FULL", (4, 4), (3, 3), (1, 1))
    with pytest.raises(ValueError, match="non-negative"):
        conv.explicit_padding(((1, -1), (0, 0)), (4, 4), (3, 3), (1, 1))
    assert conv.explicit_padding("SAME", (28, 28), (3, 3), (2, 2)) == ((0, 1), (0, 1))
    assert conv.explicit_padding("same", (5, 6), (3, 3), (1, 1)) == ((1, 1), (1, 1))
    with pytest.raises(ValueError, match="conv impl must be"):
        nn.conv2d(nn.conv2d_init(jax.random.key(0), 1, 2), jnp.ones((1, 4, 4, 1)),
                  impl=cast(Any, "fast"))
    if native.available():
        with pytest.raises(ValueError, match="one dtype"):
            conv.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 2), jnp.bfloat16))
        with pytest.raises(ValueError, match="output would be empty"):
            conv.conv2d(jnp.ones((1, 2, 2, 1)), jnp.ones((3, 3, 1, 2)))


def test_fedjax_native_0_turns_the_kernels_off_and_the_cnn_takes_im2col():
    code = ("from fedjax_core.models import native, nn; import jax, jax.numpy as jnp;"
            "k = nn.Kernels.cpu(); p = nn.conv2d_init(jax.random.key(0), 1, 2);"
            "t = jax.jit(lambda x: nn.conv2d(p, x, train=True, kernels=k)).lower("
            "jnp.ones((1, 5, 5, 1))).as_text();"
            "print(native.available(), k.native_conv, 'fedjax_conv2d' in t, native.reason())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FEDJAX_NATIVE": "0", "JAX_PLATFORMS": "cpu"})
    assert out.stdout.split()[:3] == ["False", "False", "False"]
    assert "FEDJAX_NATIVE=0" in out.stdout


def test_threads_per_call_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("FEDJAX_NATIVE_THREADS", raising=False)
    assert native._threads() == native.DEFAULT_THREADS
    for raw, want in (("2", 2), ("0", 0), ("-3", 0)):
        monkeypatch.setenv("FEDJAX_NATIVE_THREADS", raw)
        assert native._threads() == want
    monkeypatch.setenv("FEDJAX_NATIVE_THREADS", "many")
    with pytest.warns(UserWarning, match="FEDJAX_NATIVE_THREADS='many' is not a whole number"):
        assert native._threads() == native.DEFAULT_THREADS


def test_build_without_tools_prints_one_line_and_never_fails(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(build, "LIBRARY", tmp_path / "lib" / "libfedjax_native.so")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    assert build.main([]) == 0
    out = capsys.readouterr().out.strip()
    assert out == ("fedjax-sim: native CPU kernels not built (no cmake on PATH); using the "
                   "pure-JAX path")
    assert build.main(["--strict"]) == 1
    assert not (tmp_path / "lib").exists()


def test_a_failed_compile_leaves_no_library_and_keeps_its_log(monkeypatch, tmp_path, capsys):
    if build.missing_tools() is not None:
        pytest.skip(str(build.missing_tools()))
    package = tmp_path / "native"
    (package / "src").mkdir(parents=True)
    (package / "src" / "broken.cc").write_text("this is not C++\n")
    (package / "CMakeLists.txt").write_text(
        (build.PACKAGE_DIR / "CMakeLists.txt").read_text())
    monkeypatch.setattr(build, "PACKAGE_DIR", package)
    monkeypatch.setattr(build, "LIBRARY", package / "lib" / "libfedjax_native.so")
    assert build.main([]) == 0
    out = capsys.readouterr().out
    assert "the compile failed; see" in out and "using the pure-JAX path" in out
    assert not (package / "lib" / "libfedjax_native.so").exists()
    assert "this is not C++" in (package / "lib" / "build.log").read_text() or \
        "error" in (package / "lib" / "build.log").read_text()
    assert sorted(p.name for p in package.iterdir()) == ["CMakeLists.txt", "lib", "src"]
