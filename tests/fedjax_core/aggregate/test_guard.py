"""skip_nonfinite drops diverged clients exactly like padding clients."""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_core.aggregate.guard import skip_nonfinite
from fedjax_core.aggregate.mean import mean


def test_nonfinite_clients_are_dropped_and_counted():
    deltas = {"w": jnp.array([[1.0, 2.0], [jnp.nan, 0.0], [3.0, 4.0], [5.0, jnp.inf]]),
              "b": jnp.array([1.0, 1.0, 3.0, 0.0])}
    weights = jnp.array([1.0, 2.0, 3.0, 0.0])  # the last one is padding
    agg = skip_nonfinite()
    out, _, metrics = jax.jit(agg.apply)(deltas, weights, agg.init(None), None, None)
    # Only clients 0 and 2 count: (1*[1,2] + 3*[3,4]) / 4.
    np.testing.assert_allclose(out["w"], [2.5, 3.5])
    np.testing.assert_allclose(out["b"], 2.5)
    assert float(metrics["train/nonfinite_clients"]) == 1.0  # padding is not counted
    plain, _, _ = mean().apply(deltas, weights, None)
    assert not np.isfinite(np.asarray(plain["w"])).all()
