"""Test set-up: 8 CPU devices, set before any JAX operation runs; run-time shape checks.

Under pytest (only here, never when the library runs) the jaxtyping annotations of the
public kernels are checked at every call: `jaxtyping.install_import_hook` wraps each
function of the modules below in `@jaxtyped(typechecker=beartype)`, so a wrong dtype, rank
or a shape that disagrees with another argument's (`"clients steps batch"`) fails the test
that made the call. Inside `jit` the check runs once per trace. The modules must be imported
after the hook, which is why it is installed here, before any test module imports them.
`FEDJAX_TYPECHECK=0` turns the checks off (to time a test file without them).
"""

import os

import jax

# Tests (and the CLI subprocesses they start) do not write JAX's compilation cache into the
# user's cache directory; tests/cli/test_compile_cache.py checks the cache on its own.
os.environ.setdefault("FEDJAX_COMPILATION_CACHE", "0")

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)

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
    import sys

    from jaxtyping import install_import_hook

    _early = [m for m in TYPECHECKED_MODULES if m in sys.modules]
    assert not _early, f"imported before the type-check hook: {_early}"
    # is_pep484_tower: an int passes where a float is annotated, as for pyright (PEP 484).
    install_import_hook(TYPECHECKED_MODULES,
                        "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")


def pytest_configure(config):
    if TYPECHECK:
        # beartype asks for `collections.abc.Callable` over `typing.Callable` (PEP 585) when it
        # decorates; both are valid hints and are checked the same.
        config.addinivalue_line(
            "filterwarnings", "ignore::beartype.roar.BeartypeDecorHintPep585DeprecationWarning")
