"""The jaxtyping annotations are checked under pytest (tests/conftest.py), not at run time."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jaxtyping import TypeCheckError

from fedjax_core.aggregate import secure

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("FEDJAX_TYPECHECK", "1") == "0",
                    reason="FEDJAX_TYPECHECK=0 turns the checks off")
def test_a_kernel_called_with_the_wrong_rank_fails_under_pytest():
    key = jax.random.key(0)
    assert secure.encode(jnp.array([0.5, -0.25]), 4.0, 4.0, 8, key).tolist() == [2, 255]
    with pytest.raises(TypeCheckError, match="x"):  # `x: Float[Array, " d"]` is one vector
        secure.encode(jnp.full((2, 2), 0.5), 4.0, 4.0, 8, key)


def test_the_library_does_not_check_at_run_time():
    code = ("import jax, jax.numpy as jnp\n"
            "from fedjax_core.aggregate import secure\n"
            "print(secure.encode(jnp.full((2, 2), 0.5), 4.0, 4.0, 8, jax.random.key(0)).tolist())")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120, check=True)
    assert out.stdout.strip() == "[[2, 2], [2, 2]]"
