"""Test set-up: 8 CPU devices, set before any JAX operation runs."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
