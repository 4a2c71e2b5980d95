"""Tests for fedjax_core.models.metrics on tiny hand-computed logits."""

import math

import jax.numpy as jnp
import numpy as np

from fedjax_core.models import metrics as M

PAD, EOS, OOV = 0, 2, 4


def test_softmax_cross_entropy_by_hand():
    logits = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    ce = M.softmax_cross_entropy(logits, jnp.array([0, 2]))
    expected = [math.log(math.e + math.e**2 + math.e**3) - 1.0, math.log(3.0)]
    np.testing.assert_allclose(ce, expected, rtol=1e-6)
    assert ce.shape == (2,)


def test_accuracy_by_hand():
    logits = jnp.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    np.testing.assert_array_equal(M.accuracy(logits, jnp.array([1, 1, 1])), [1.0, 0.0, 1.0])


def _one_hot_logits(preds, num_classes=5):
    # Logits whose arg-max is `preds`; runner-up is class 3.
    logits = np.zeros(np.shape(preds) + (num_classes,), np.float32)
    logits[..., 3] = 1.0
    np.put_along_axis(logits, np.asarray(preds)[..., None], 2.0, axis=-1)
    return jnp.asarray(logits)


# Two sequences of 4 tokens. Vocabulary: 0 PAD, 1 BOS, 2 EOS, 3 'a', 4 OOV.
TARGETS = jnp.array([[3, 4, 2, 0],
                     [3, 3, 3, 2]])
PREDS = jnp.array([[3, 0, 2, 1],
                   [3, 1, 4, 1]])


def test_token_mask_and_count():
    np.testing.assert_array_equal(M.token_mask(TARGETS, (PAD, EOS)),
                                  [[True, True, False, False], [True, True, True, False]])
    np.testing.assert_array_equal(M.sequence_token_count(TARGETS, (PAD,)), [3.0, 4.0])
    np.testing.assert_array_equal(M.sequence_token_count(TARGETS, (PAD, EOS)), [2.0, 3.0])


def test_sequence_token_accuracy_masks_pad_and_eos():
    logits = _one_hot_logits(PREDS)
    # Row 0: t0 correct (3), t1 wrong (pred PAD for OOV), t2 EOS (masked), t3 PAD (masked).
    # Row 1: t0 correct, t1 wrong, t2 wrong, t3 EOS (masked).
    num, den = M.sequence_token_accuracy(logits, TARGETS, (PAD, EOS))
    np.testing.assert_array_equal(num, [1.0, 1.0])
    np.testing.assert_array_equal(den, [2.0, 3.0])
    # Counting EOS as well: row 0 gets its correct EOS, row 1 misses its EOS.
    num, den = M.sequence_token_accuracy(logits, TARGETS, (PAD,))
    np.testing.assert_array_equal(num, [2.0, 1.0])
    np.testing.assert_array_equal(den, [3.0, 4.0])


def test_sequence_token_accuracy_with_logits_mask():
    # Excluding PAD, BOS, EOS, OOV: every masked prediction falls back to class 3 ('a').
    mask = M.make_logits_mask(5, (PAD, 1, EOS, OOV))
    np.testing.assert_array_equal(mask, [-np.inf, -np.inf, -np.inf, 0.0, -np.inf])
    logits = _one_hot_logits(PREDS)
    num, den = M.sequence_token_accuracy(logits, TARGETS, (PAD, EOS), mask)
    # Row 0: t0 'a' correct, t1 target OOV can never be predicted -> wrong.
    # Row 1: t0, t1, t2 all predicted 'a' -> 3 correct.
    np.testing.assert_array_equal(num, [1.0, 3.0])
    np.testing.assert_array_equal(den, [2.0, 3.0])
    np.testing.assert_array_equal(
        M.sequence_token_correct(logits, TARGETS, (PAD, EOS), mask), num)


def test_sequence_cross_entropy_sums_non_masked_tokens():
    logits = jnp.zeros((2, 4, 5))  # uniform: every token costs log 5
    np.testing.assert_allclose(M.sequence_cross_entropy(logits, TARGETS, (PAD,)),
                               [3 * math.log(5), 4 * math.log(5)], rtol=1e-6)
    logits = _one_hot_logits(PREDS)
    tok = M.sequence_token_cross_entropy(logits, TARGETS)
    assert tok.shape == (2, 4)
    # t0 of row 0: target 3 == pred: logits [0, 0, 0, 2, 0].
    np.testing.assert_allclose(tok[0, 0], math.log(math.e**2 + 4) - 2.0, rtol=1e-6)
    # t1 of row 0: pred 0, target OOV (4): logits [2, 0, 0, 1, 0].
    np.testing.assert_allclose(tok[0, 1], math.log(math.e**2 + math.e + 3), rtol=1e-6)
    s = M.sequence_cross_entropy(logits, TARGETS, (PAD,))
    np.testing.assert_allclose(s[0], tok[0, 0] + tok[0, 1] + tok[0, 2], rtol=1e-6)


def test_oov_count():
    np.testing.assert_array_equal(M.sequence_oov_count(TARGETS, (OOV,), (PAD,)), [1.0, 0.0])
    # An OOV id that is also masked is not counted.
    np.testing.assert_array_equal(M.sequence_oov_count(TARGETS, (OOV,), (PAD, OOV)), [0.0, 0.0])
