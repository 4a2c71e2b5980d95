"""Per-example losses and metric parts.

Every function returns arrays with a leading `batch` axis, never a batch mean, so that
a model's `metrics` can build `(numerator[batch], denominator[batch])` pairs that
evaluation masks, sums over batches and clients, and divides once at the end.
Sequence functions take `[batch, time]` targets and reduce over `time` only.
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from fedjax_core.typing import Array, ArrayLike, Bool, Float, Int

# ---------------------------------------------------------------- classification


def softmax_cross_entropy(logits: Float[ArrayLike, "*B C"],
                          labels: Int[ArrayLike, "*B"]) -> Float[Array, "*B"]:
    """Softmax cross-entropy with integer labels, per example.

    `ce = logsumexp(logits) - logits[label]`.

    Args:
      logits: `Float[Array, "*B C"]`.
      labels: `Int[Array, "*B"]`, values in `[0, C)`.

    Returns:
      `Float[Array, "*B"]`.

    Example:
      >>> softmax_cross_entropy(jnp.zeros((1, 4)), jnp.array([2]))  # log 4
      Array([1.3862944], dtype=float32)
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    label_logit = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32),
                                      axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - label_logit


def accuracy(logits: Float[ArrayLike, "*B C"],
             labels: Int[ArrayLike, "*B"]) -> Float[Array, "*B"]:
    """1.0 where the arg-max class equals the label, else 0.0, per example.

    `acc = [argmax(logits) == label]`.

    Args:
      logits: `Float[Array, "*B C"]`.
      labels: `Int[Array, "*B"]`.

    Returns:
      `Float[Array, "*B"]` of 0.0 and 1.0.

    Example:
      >>> accuracy(jnp.array([[0., 1.], [1., 0.]]), jnp.array([1, 1]))
      Array([1., 0.], dtype=float32)
    """
    pred = jnp.argmax(jnp.asarray(logits), axis=-1)
    return (pred == jnp.asarray(labels)).astype(jnp.float32)


# -------------------------------------------------------------------- sequences


def token_mask(targets: Int[ArrayLike, "B T"],
               masked_target_values: Sequence[int] = (0,)) -> Bool[Array, "B T"]:
    """True where a target token counts, False where it is one of `masked_target_values`.

    `m[b, t] = targets[b, t] not in masked_target_values`.

    Args:
      targets: `Int[Array, "B T"]`.
      masked_target_values: token ids to leave out (e.g. PAD, EOS).

    Returns:
      `Bool[Array, "B T"]`.

    Example:
      >>> token_mask(jnp.array([[5, 2, 0]]), (0, 2))
      Array([[ True, False, False]], dtype=bool)
    """
    targets = jnp.asarray(targets)
    mask = jnp.ones(targets.shape, bool)
    for v in masked_target_values:
        mask = mask & (targets != v)
    return mask


def make_logits_mask(num_classes: int, excluded_classes: Sequence[int]) -> Float[Array, " C"]:
    """An additive logits mask: 0 for allowed classes, -inf for excluded ones.

    `mask[c] = -inf if c in excluded_classes else 0`.

    Args:
      num_classes: `C`.
      excluded_classes: class ids that may never be predicted.

    Returns:
      `Float[Array, " C"]`, to add to logits before `argmax`.

    Example:
      >>> make_logits_mask(3, [0])
      Array([-inf,   0.,   0.], dtype=float32)
    """
    mask = jnp.zeros((num_classes,), jnp.float32)
    if len(excluded_classes):
        mask = mask.at[jnp.asarray(list(excluded_classes))].set(-jnp.inf)
    return mask


def sequence_token_cross_entropy(logits: Float[ArrayLike, "B T C"],
                                 targets: Int[ArrayLike, "B T"]) -> Float[Array, "B T"]:
    """Per-token softmax cross-entropy, no masking.

    `ce[b, t] = logsumexp(logits[b, t]) - logits[b, t, targets[b, t]]`.

    Args:
      logits: `Float[Array, "B T C"]`.
      targets: `Int[Array, "B T"]`.

    Returns:
      `Float[Array, "B T"]`.

    Example:
      >>> sequence_token_cross_entropy(jnp.zeros((1, 2, 4)), jnp.array([[1, 0]])).shape
      (1, 2)
    """
    return softmax_cross_entropy(logits, targets)


def sequence_token_count(targets: Int[ArrayLike, "B T"],
                         masked_target_values: Sequence[int] = (0,)) -> Float[Array, " B"]:
    """Number of counted (non-masked) target tokens per sequence.

    `n[b] = sum_t [targets[b, t] not in masked_target_values]`.

    Args:
      targets: `Int[Array, "B T"]`.
      masked_target_values: token ids not counted.

    Returns:
      `Float[Array, " B"]`.

    Example:
      >>> sequence_token_count(jnp.array([[5, 2, 0]]), (0,))
      Array([2.], dtype=float32)
    """
    return jnp.sum(token_mask(targets, masked_target_values), axis=-1, dtype=jnp.float32)


def sequence_cross_entropy(logits: Float[ArrayLike, "B T C"],
                           targets: Int[ArrayLike, "B T"],
                           masked_target_values: Sequence[int] = (0,)) -> Float[Array, " B"]:
    """Token cross-entropy summed over the counted tokens of each sequence.

    `s[b] = sum_t m[b, t] * ce[b, t]`, `m = token_mask(targets, masked_target_values)`.
    Pair it with `sequence_token_count` for a per-token mean.

    Args:
      logits: `Float[Array, "B T C"]`.
      targets: `Int[Array, "B T"]`.
      masked_target_values: token ids whose loss is left out (e.g. PAD).

    Returns:
      `Float[Array, " B"]`.

    Example:
      >>> sequence_cross_entropy(jnp.zeros((1, 3, 4)), jnp.array([[1, 3, 0]]))  # 2 log 4
      Array([2.7725887], dtype=float32)
    """
    ce = sequence_token_cross_entropy(logits, targets)
    return jnp.sum(jnp.where(token_mask(targets, masked_target_values), ce, 0.0), axis=-1)


def sequence_token_correct(logits: Float[ArrayLike, "B T C"],
                           targets: Int[ArrayLike, "B T"],
                           masked_target_values: Sequence[int] = (0,),
                           logits_mask: Float[ArrayLike, " C"] | None = None
                           ) -> Float[Array, " B"]:
    """Number of correctly predicted counted tokens per sequence.

    `k[b] = sum_t m[b, t] * [argmax(logits[b, t] + logits_mask) == targets[b, t]]`,
    `m = token_mask(targets, masked_target_values)`. Pair it with
    `sequence_token_count(targets, masked_target_values)` for a token accuracy.

    Args:
      logits: `Float[Array, "B T C"]`.
      targets: `Int[Array, "B T"]`.
      masked_target_values: token ids not counted (e.g. PAD, EOS).
      logits_mask: optional additive `Float[Array, " C"]`, -inf for classes that may
        not be predicted (see `make_logits_mask`).

    Returns:
      `Float[Array, " B"]`.

    Example:
      >>> logits = jnp.array([[[0., 1., 2.], [2., 1., 0.]]])
      >>> sequence_token_correct(logits, jnp.array([[2, 1]]), (0,), make_logits_mask(3, [0]))
      Array([2.], dtype=float32)
    """
    logits = jnp.asarray(logits)
    if logits_mask is not None:
        logits = logits + jnp.asarray(logits_mask, logits.dtype)
    pred = jnp.argmax(logits, axis=-1)
    correct = (pred == jnp.asarray(targets)) & token_mask(targets, masked_target_values)
    return jnp.sum(correct, axis=-1, dtype=jnp.float32)


def sequence_token_accuracy(logits: Float[ArrayLike, "B T C"],
                            targets: Int[ArrayLike, "B T"],
                            masked_target_values: Sequence[int] = (0,),
                            logits_mask: Float[ArrayLike, " C"] | None = None
                            ) -> tuple[Float[Array, " B"], Float[Array, " B"]]:
    """Token accuracy as a `(correct, counted)` pair per sequence.

    `(sequence_token_correct(...), sequence_token_count(targets, masked_target_values))`.

    Args:
      logits: `Float[Array, "B T C"]`.
      targets: `Int[Array, "B T"]`.
      masked_target_values: token ids not counted (e.g. PAD, EOS).
      logits_mask: optional additive `Float[Array, " C"]` (see `make_logits_mask`).

    Returns:
      `(numerator, denominator)`, each `Float[Array, " B"]`.

    Example:
      >>> logits = jnp.eye(3)[jnp.array([[1, 2]])]
      >>> sequence_token_accuracy(logits, jnp.array([[1, 0]]), (0,))
      (Array([1.], dtype=float32), Array([1.], dtype=float32))
    """
    return (sequence_token_correct(logits, targets, masked_target_values, logits_mask),
            sequence_token_count(targets, masked_target_values))


def sequence_oov_count(targets: Int[ArrayLike, "B T"], oov_target_values: Sequence[int],
                       masked_target_values: Sequence[int] = (0,)) -> Float[Array, " B"]:
    """Number of counted target tokens that are out-of-vocabulary, per sequence.

    `o[b] = sum_t m[b, t] * [targets[b, t] in oov_target_values]`. Pair it with
    `sequence_token_count(targets, masked_target_values)` for the OOV rate.

    Args:
      targets: `Int[Array, "B T"]`.
      oov_target_values: the OOV token ids.
      masked_target_values: token ids not counted (e.g. PAD).

    Returns:
      `Float[Array, " B"]`.

    Example:
      >>> sequence_oov_count(jnp.array([[89, 5, 0]]), (89,), (0,))
      Array([1.], dtype=float32)
    """
    is_oov = ~token_mask(targets, oov_target_values)
    counted = token_mask(targets, masked_target_values)
    return jnp.sum(is_oov & counted, axis=-1, dtype=jnp.float32)


def sequence_nonempty(targets: Int[ArrayLike, "B T"],
                      masked_target_values: Sequence[int] = (0,)) -> Float[Array, " B"]:
    """1.0 for a sequence with at least one counted target token, else 0.0.

    `e[b] = [any_t targets[b, t] not in masked_target_values]`: the per-sequence weight of
    FedJAX's `SequenceCrossEntropyLoss`, `SequenceLength` and `SequenceTruncationRate`.

    Args:
      targets: `Int[Array, "B T"]`.
      masked_target_values: token ids not counted (e.g. PAD).

    Returns:
      `Float[Array, " B"]` of 0.0 and 1.0.

    Example:
      >>> sequence_nonempty(jnp.array([[5, 0], [0, 0]]))
      Array([1., 0.], dtype=float32)
    """
    return jnp.any(token_mask(targets, masked_target_values), axis=-1).astype(jnp.float32)


def sequence_length(targets: Int[ArrayLike, "B T"],
                    masked_target_values: Sequence[int] = (0,)
                    ) -> tuple[Float[Array, " B"], Float[Array, " B"]]:
    """Mean counted length of the non-empty sequences, as a pair (FedJAX's `SequenceLength`).

    `(n[b], e[b])`, `n = sequence_token_count(targets, masked_target_values)`,
    `e = sequence_nonempty(targets, masked_target_values)`.

    Args:
      targets: `Int[Array, "B T"]`.
      masked_target_values: token ids not counted (e.g. PAD).

    Returns:
      `(numerator, denominator)`, each `Float[Array, " B"]`.

    Example:
      >>> sequence_length(jnp.array([[1, 2, 3, 4, 0, 0]]))
      (Array([4.], dtype=float32), Array([1.], dtype=float32))
    """
    return (sequence_token_count(targets, masked_target_values),
            sequence_nonempty(targets, masked_target_values))


def sequence_truncation_rate(targets: Int[ArrayLike, "B T"], eos_target_value: int,
                             masked_target_values: Sequence[int] = (0,)
                             ) -> tuple[Float[Array, " B"], Float[Array, " B"]]:
    """Share of non-empty sequences whose targets hold no EOS (FedJAX's `SequenceTruncationRate`).

    `(e[b] * [all_t targets[b, t] != eos], e[b])`,
    `e = sequence_nonempty(targets, masked_target_values)`: a sequence cut at the maximum
    length loses its final EOS target.

    Args:
      targets: `Int[Array, "B T"]`.
      eos_target_value: the EOS token id.
      masked_target_values: token ids not counted (e.g. PAD).

    Returns:
      `(numerator, denominator)`, each `Float[Array, " B"]`.

    Example:
      >>> sequence_truncation_rate(jnp.array([[5, 6, 2, 0], [5, 6, 7, 8], [0, 0, 0, 0]]), 2)
      (Array([0., 1., 0.], dtype=float32), Array([1., 1., 0.], dtype=float32))
    """
    targets = jnp.asarray(targets)
    nonempty = sequence_nonempty(targets, masked_target_values)
    truncated = jnp.all(targets != eos_target_value, axis=-1).astype(jnp.float32)
    return truncated * nonempty, nonempty


def _rank_correct(logits: Array, labels: Array, k: int) -> Array:
    # The label is in the top k iff fewer than k classes come before it in a stable
    # descending sort: a larger logit, or an equal logit at a lower class index (the
    # order of FedJAX's `jnp.argsort(-logits)[:k]`). O(C) compares, no sort.
    label = labels.astype(jnp.int32)[..., None]
    label_logit = jnp.take_along_axis(logits, label, axis=-1)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    before = (logits > label_logit) | ((logits == label_logit) & (index < label))
    return jnp.sum(before, axis=-1) < k


def top_k_accuracy(logits: Float[ArrayLike, "*B C"], labels: Int[ArrayLike, "*B"],
                   k: int) -> Float[Array, "*B"]:
    """1.0 where the label is among the `k` largest logits, else 0.0, per example.

    `acc = [label in top_k(logits)]`, ties broken towards the lower class index, as in
    FedJAX's `TopKAccuracy` (`argsort(-logits)[:k]`). `k < 1` gives 0; `k >= C` gives 1.

    Args:
      logits: `Float[Array, "*B C"]`.
      labels: `Int[Array, "*B"]`.
      k: a Python int.

    Returns:
      `Float[Array, "*B"]` of 0.0 and 1.0.

    Example:
      >>> top_k_accuracy(jnp.array([[0., .5, .2], [0., .5, .2]]), jnp.array([2, 0]), 2)
      Array([1., 0.], dtype=float32)
    """
    return _rank_correct(jnp.asarray(logits), jnp.asarray(labels), k).astype(jnp.float32)


def sequence_token_top_k_correct(logits: Float[ArrayLike, "B T C"],
                                 targets: Int[ArrayLike, "B T"], k: int,
                                 masked_target_values: Sequence[int] = (0,),
                                 logits_mask: Float[ArrayLike, " C"] | None = None
                                 ) -> Float[Array, " B"]:
    """Number of counted tokens whose target is among the top `k` logits, per sequence.

    `k[b] = sum_t m[b, t] * [targets[b, t] in top_k(logits[b, t] + logits_mask)]`, ties
    towards the lower class index (FedJAX's `SequenceTokenTopKAccuracy`). Pair it with
    `sequence_token_count(targets, masked_target_values)`.

    Args:
      logits: `Float[Array, "B T C"]`.
      targets: `Int[Array, "B T"]`.
      k: a Python int.
      masked_target_values: token ids not counted (e.g. PAD, EOS).
      logits_mask: optional additive `Float[Array, " C"]` (see `make_logits_mask`).

    Returns:
      `Float[Array, " B"]`.

    Example:
      >>> logits = jnp.array([[[0., 1., .5, 0.], [1., .5, 0., 0.], [.8, 0., .7, 0.]]])
      >>> sequence_token_top_k_correct(logits, jnp.array([[1, 2, 2]]), 2)
      Array([2.], dtype=float32)
    """
    logits = jnp.asarray(logits)
    if logits_mask is not None:
        logits = logits + jnp.asarray(logits_mask, logits.dtype)
    correct = _rank_correct(logits, jnp.asarray(targets), k)
    correct = correct & token_mask(targets, masked_target_values)
    return jnp.sum(correct, axis=-1, dtype=jnp.float32)


__all__ = [
    "accuracy",
    "make_logits_mask",
    "sequence_cross_entropy",
    "sequence_length",
    "sequence_nonempty",
    "sequence_oov_count",
    "sequence_token_accuracy",
    "sequence_token_correct",
    "sequence_token_count",
    "sequence_token_cross_entropy",
    "sequence_token_top_k_correct",
    "sequence_truncation_rate",
    "softmax_cross_entropy",
    "token_mask",
    "top_k_accuracy",
]
