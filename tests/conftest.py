"""Test set-up: the CPU backend with 8 CPU devices, set before JAX starts; run-time shape checks.

The suite runs on the CPU on any machine: `JAX_PLATFORMS=cpu` is set before JAX is imported
(subprocesses, e.g. the multi-host workers and CLI runs, inherit it), and no process
pre-allocates accelerator memory (`XLA_PYTHON_CLIENT_PREALLOCATE=false`). Accelerator
tests carry the `gpu` marker: `pytest -m gpu` leaves the platform to JAX and runs only
them, at the accelerator's real precision; without an accelerator they are deselected.

Under pytest (only here, never when the library runs) the jaxtyping annotations of the
public kernels are checked at every call: `jaxtyping.install_import_hook` wraps each
function of the modules below in `@jaxtyped(typechecker=beartype)`, so a wrong dtype, rank
or a shape that disagrees with another argument's (`"clients steps batch"`) fails the test
that made the call. Inside `jit` the check runs once per trace. The modules must be imported
after the hook, which is why it is installed here, before any test module imports them.
`FEDJAX_TYPECHECK=0` turns the checks off (to time a test file without them).
"""

import os
import sys


def _gpu_run(argv: list[str]) -> bool:
    """Whether the command line selects the `gpu` marker (`-m gpu`, `-m "gpu and ..."`)."""
    for i, arg in enumerate(argv):
        expr = argv[i + 1] if arg == "-m" and i + 1 < len(argv) else (
            arg[2:] if arg.startswith("-m") and len(arg) > 2 else None)
        if expr is not None and "gpu" in expr and "not gpu" not in expr:
            return True
    return False


GPU_RUN = _gpu_run(sys.argv)
if not GPU_RUN:
    os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

# One persistent compilation cache for the whole session, in a temporary directory removed at
# exit, never the user's: each tiny experiment builds new closures, so JAX traces again, but
# the same program (same HLO, same flags) then loads instead of compiling; the CLI
# subprocesses the tests start share it through FEDJAX_COMPILATION_CACHE. Measured on three
# test files: 50.5 -> 22.4 s of CPU. tests/cli/test_compile_cache.py checks the cache with
# its own directory; FEDJAX_COMPILATION_CACHE=0 (or a directory) set by the caller wins.
if "FEDJAX_COMPILATION_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="fedjax-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["FEDJAX_COMPILATION_CACHE"] = _cache_dir
# Nor the data files' index cache (tests/fedjax_core/data/test_index_cache.py passes folders).
os.environ.setdefault("FEDJAX_INDEX_CACHE", "0")

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
if os.environ["FEDJAX_COMPILATION_CACHE"] != "0":
    jax.config.update("jax_compilation_cache_dir", os.environ["FEDJAX_COMPILATION_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# fedjax_core modules whose public functions carry jaxtyping annotations (a name also
# covers its submodules). Not yet: fedjax_core.client (`first_epoch_mask` says `Array` where
# callers pass numpy arrays and ints), fedjax_core.sweep (`hparams` says `dict[str, Array]`
# where numpy arrays come), fedjax_core.models (a test passes `conv2d` an invalid `impl` to
# see its ValueError) and fedjax_core.algorithms (being rewritten).
TYPECHECKED_MODULES = [
    "fedjax_core.tree",
    "fedjax_core.evaluate",
    "fedjax_core.parallel",
    "fedjax_core.client_state",
    "fedjax_core.personalization",
    "fedjax_core.data.pack",
    "fedjax_core.data.device",
    "fedjax_core.aggregate.compression",
    "fedjax_core.aggregate.privacy",
    "fedjax_core.aggregate.robust",
    "fedjax_core.aggregate.secure",
]

TYPECHECK = os.environ.get("FEDJAX_TYPECHECK", "1") != "0"

if TYPECHECK:
    from jaxtyping import install_import_hook

    _early = [m for m in TYPECHECKED_MODULES if m in sys.modules]
    assert not _early, f"imported before the type-check hook: {_early}"
    # is_pep484_tower: an int passes where a float is annotated, as for pyright (PEP 484).
    install_import_hook(TYPECHECKED_MODULES,
                        "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")


def pytest_collection_modifyitems(config, items):
    """Deselects the `gpu` tests unless the backend is an accelerator (`pytest -m gpu` on a
    machine with one)."""
    if jax.default_backend() != "cpu":
        return
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]


def pytest_configure(config):
    if TYPECHECK:
        # beartype asks for `collections.abc.Callable` over `typing.Callable` (PEP 585) when it
        # decorates; both are valid hints and are checked the same.
        config.addinivalue_line(
            "filterwarnings", "ignore::beartype.roar.BeartypeDecorHintPep585DeprecationWarning")
