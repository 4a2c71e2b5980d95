"""Numerics at an accelerator's real precision (`pytest -m gpu`; deselected on a CPU).

On an NVIDIA GPU the default f32 matmul is TF32 (10-bit mantissa, relative error about
1e-3 per product), so model training at the default precision differs from HIGHEST by
about that much; aggregation is exact f32 whatever the default (`tree.EXACT`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_core import tree
from fedjax_core.aggregate.mean import mean
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.data import pack_cohort
from fedjax_core.models.linear import mlp
from fedjax_core.parallel import Plan
from tests.fedjax_core.helpers import unequal_clients

pytestmark = pytest.mark.gpu

TF32_RTOL = 2e-2
"""A FedAvg round's params at the default precision against HIGHEST (TF32 on an H100,
bf16 passes on a TPU): 10-bit mantissas accumulate to about 1e-3 relative per layer."""

EXACT_RTOL = 1e-6
"""Aggregation against float64 numpy: f32 rounding only."""


def _round(precision: str):
    data = unequal_clients(sizes=(8, 5, 12, 3), features=16, classes=10, seed=0)
    model = mlp((16,), (64,), num_classes=10)
    alg = fedavg(optax.sgd(0.1))
    state = alg.init(model.init(jax.random.key(0)))
    cohort = pack_cohort(data, [0, 1, 2, 3], batch_size=4, epochs=1, seed=0, round_num=0)
    with jax.default_matmul_precision(precision):
        step = jit_round(alg, model, Plan(chunk_size=4))
        state, _ = step(state, cohort, jax.random.key(1))
    return state.params


def test_fedavg_round_default_precision_is_close_to_highest():
    default, highest = _round("default"), _round("highest")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=TF32_RTOL, atol=1e-4),
                 default, highest)


@pytest.mark.parametrize("precision", ["default", "bfloat16"])
def test_weighted_mean_is_exact_at_any_default_precision(precision):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1000)).astype(np.float32)
    w = rng.uniform(1, 100, size=64).astype(np.float32)
    want = (w.astype(np.float64) @ x.astype(np.float64)) / w.astype(np.float64).sum()
    with jax.default_matmul_precision(precision):
        got = jax.jit(tree.weighted_mean)(jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(got), want, rtol=EXACT_RTOL, atol=1e-6)


def test_streamed_and_stacked_mean_agree_on_the_accelerator():
    rng = np.random.default_rng(1)
    x = {"w": jnp.asarray(rng.normal(size=(32, 300)).astype(np.float32))}
    w = jnp.asarray(rng.uniform(1, 50, size=32).astype(np.float32))
    agg = mean()
    stacked, _, _ = agg.apply(x, w, agg.init({"w": x["w"][0]}), None, None)
    assert agg.stream is not None
    parts = jax.vmap(agg.stream.contribution)(x, w)
    total = jax.tree.map(lambda v: jnp.sum(v, axis=0), parts)
    streamed, _, _ = agg.stream.finalize(total, {"w": x["w"][0]}, agg.init({"w": x["w"][0]}),
                                         None)
    np.testing.assert_allclose(np.asarray(streamed["w"]), np.asarray(stacked["w"]),
                               rtol=1e-5, atol=1e-6)
