"""The sequential baseline computes the library's FedAvg; the analytic FLOP counts."""

import jax
import numpy as np
import optax

from benchmarks import baseline, measure
from fedjax_api.dataset import FederatedDataset
from fedjax_core.algorithms.base import jit_round
from fedjax_core.algorithms.fedavg import fedavg
from fedjax_core.evaluate import evaluate
from fedjax_core.parallel import Plan
from tests.fedjax_core.helpers import close, tiny_softmax_model, unequal_clients


def test_sequential_fedavg_equals_the_jitted_round():
    model = tiny_softmax_model()
    data = FederatedDataset(data=unequal_clients(), batch_size=2, epochs=2, seed=3)
    params = model.init(jax.random.key(0))
    alg = fedavg(optax.sgd(0.3), optax.sgd(0.7))
    step = jit_round(alg, model, Plan(chunk_size=2))
    loop = baseline.SequentialFedAvg(model, client_lr=0.3, server_lr=0.7)
    state, ref = alg.init(params), params
    key = jax.random.key(5)
    for r in range(3):
        cohort = data.sample(4, r)
        rk = jax.random.fold_in(key, r)
        state, metrics = step(state, cohort, rk)
        ref, loss = loop.round(ref, cohort, rk)
        close(state.params, ref)
        np.testing.assert_allclose(float(loss), float(metrics["train/loss"]), rtol=1e-5)


def test_sequential_evaluate_equals_evaluate():
    model = tiny_softmax_model()
    data = unequal_clients(sizes=(5, 2, 9, 1, 4, 7))
    params = model.init(jax.random.key(1))
    ours = evaluate(model, params, data, batch_size=4)
    theirs = baseline.sequential_evaluate(model, params, data, batch_size=4)
    for k in ("loss", "accuracy"):
        np.testing.assert_allclose(theirs[k], ours[k], rtol=1e-5)


def test_flop_counts():
    cnn = measure.emnist_cnn_flops()
    # conv 26x26x32x9 and 24x24x64x288, dense 9216x128 and 128x62 multiply-adds, x2.
    assert cnn["forward"] == 2 * (194_688 + 10_616_832 + 1_179_648 + 7_936) == 23_998_208
    assert cnn["train"] == 3 * 23_998_208 - 2 * 194_688
    assert cnn["conv_train"] == 2 * 2 * 194_688 + 3 * 2 * 10_616_832
    assert measure.mlp_flops([784, 62]) == {"forward": 97_216, "train": 2 * 97_216}
    # Shakespeare: per position 2*4*256*(8+256) + 2*4*256*(256+256) + 2*256*90 = 1,635,328.
    lstm = measure.lstm_lm_flops(80, 90, 8, [256, 256])
    assert lstm == {"forward": 80 * 1_635_328, "train": 3 * 80 * 1_635_328}
    # Stack Overflow: 4*670*(96+670) + 670*96 (projection) + 96*10004, times 2.
    so = measure.lstm_lm_flops(20, 10_004, 96, [670], proj=96)
    assert so["forward"] == 20 * 2 * (2680 * 766 + 670 * 96 + 96 * 10_004)
