"""Test set-up: 8 CPU devices, set before any JAX operation runs."""

import os

import jax

# Tests (and the CLI subprocesses they start) do not write JAX's compilation cache into the
# user's cache directory; tests/cli/test_compile_cache.py checks the cache on its own.
os.environ.setdefault("FEDJAX_COMPILATION_CACHE", "0")

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
