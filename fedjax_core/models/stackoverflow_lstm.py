"""FedJAX's Stack Overflow next-word LSTM (4,050,748 parameters)."""

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_core.models import metrics as metrics_lib
from fedjax_core.models import nn
from fedjax_core.models.base import Model
from fedjax_core.typing import Array, Batch, Params, PRNGKey

PAD = 0
"""Padding token id; its targets count nowhere."""
BOS = 1
"""Beginning-of-sequence token id."""
EOS = 2
"""End-of-sequence token id."""


def stackoverflow_lstm(vocab_size: int = 10_000, embed_size: int = 96, hidden_size: int = 670,
                       num_layers: int = 1, share_input_output_embeddings: bool = False,
                       expected_length: float | None = None,
                       kernels: nn.KernelChoice = "auto") -> Model:
    """The word LSTM of FedJAX's Stack Overflow task (Reddi et al. 2021).

    Token ids: PAD 0, BOS 1, EOS 2, words `3 .. V + 2`, OOV `V + 3`; `V + 4` ids in all.
    `e_t = embed(x_t)` (`V + 4` rows); for each layer `l`:
    `h_t = LSTM_l(in_t)`, `in_t <- dense_l(tanh(h_t))` (a projection back to `embed_size`,
    no activation after it; haiku `DeepRNN([LSTM, tanh, Linear(embed_size)] * layers)`);
    `logits_t = dense(in_t)`, or `in_t @ embed^T + b` when the embeddings are shared.
    Zero initial state; one `lax.scan` per layer.

    Loss per sequence (FedJAX's `train_loss`): `sum_t ce_t * [y_t != PAD]`, times
    `1 / expected_length` when given (a constant that turns it into a per-token scale).

    Metrics (FedJAX's names, each `(numerator[B], denominator[B])`):
    `'accuracy_in_vocab'`: correct / tokens, targets PAD and EOS left out, and PAD, BOS, EOS
    and OOV never predicted (so an OOV target is always wrong);
    `'accuracy_no_eos'`: the same without the logits mask;
    `'sequence_length'`: non-PAD targets / non-empty sequences;
    `'sequence_loss'`: ce summed over non-PAD targets / non-empty sequences;
    `'token_loss'`: the same sum / non-PAD targets;
    `'token_oov_rate'`: OOV targets / non-PAD targets;
    `'truncation_rate'`: non-empty sequences without an EOS target / non-empty sequences;
    and, under this library's common names, `'loss'` (= `'token_loss'`) and `'accuracy'`
    (= `'accuracy_no_eos'`). FedJAX's `'num_tokens'` is a sum, not a ratio: it is the
    denominator of `'token_loss'`.

    Args:
      vocab_size: `V`, words in the vocabulary, special ids and OOV not included.
      embed_size: embedding width, also the width of each layer's projection.
      hidden_size: width of every LSTM layer.
      num_layers: number of LSTM layers (each followed by tanh and a projection).
      share_input_output_embeddings: logits from the transposed input embeddings plus a
        bias (3,090,364 parameters with the defaults) instead of a dense layer.
      expected_length: optional constant that divides the training loss.
      kernels: `"auto"` (the XLA:CPU kernels on a CPU backend; elsewhere `jnp.dot`; both
        with `nn.lstm_unroll`'s hand-written gradient), `"plain"` (`jnp.dot` and autodiff
        of the scan: `jax.jvp` / `jax.jacfwd` work too), `"cpu"`, or an `nn.Kernels`; see
        `nn.Kernels`. Chosen once, here.

    Returns:
      A `Model`; `batch['x']`, `batch['y']` are `Int[Array, "B T"]`, logits `[B, T, V + 4]`.

    Example:
      >>> model = stackoverflow_lstm()
      >>> params = model.init(jax.random.key(0))  # 4,050,748 parameters

    References:
      Reddi et al., "Adaptive Federated Optimization", ICLR 2021;
      FedJAX, `fedjax/models/stackoverflow.py` (`create_lstm_model`).
    """
    full_vocab = vocab_size + 4
    oov = vocab_size + 3
    excluded = (PAD, BOS, EOS, oov)
    scale = None if expected_length is None else 1.0 / expected_length
    k = nn.resolve_kernels(kernels)

    def init(key: PRNGKey) -> Params:
        keys = jax.random.split(key, 2 * num_layers + 2)
        params: dict[str, Any] = {"embed": nn.embedding_init(keys[0], full_vocab, embed_size)}
        for i in range(num_layers):
            params[f"lstm_{i}"] = nn.lstm_init(keys[1 + 2 * i], embed_size, hidden_size)
            params[f"proj_{i}"] = nn.dense_init(keys[2 + 2 * i], hidden_size, embed_size)
        if share_input_output_embeddings:
            params["output_bias"] = jnp.zeros((full_vocab,), jnp.float32)
        else:
            params["dense"] = nn.dense_init(keys[-1], embed_size, full_vocab)
        return params

    def apply(params: Params, batch: Batch, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        del key, train
        h = nn.embedding(params["embed"], batch["x"])
        for i in range(num_layers):
            hs, _ = nn.lstm_unroll(params[f"lstm_{i}"], h, custom_vjp=k.lstm_custom_vjp,
                                   native=k.native_lstm)
            h = nn.dense(params[f"proj_{i}"], jnp.tanh(hs), kernels=k)
        if share_input_output_embeddings:
            return jnp.dot(h, params["embed"]["embeddings"].T) + params["output_bias"]
        return nn.dense(params["dense"], h, kernels=k)

    def loss(batch: Batch, logits: Array) -> Array:
        per_sequence = metrics_lib.sequence_cross_entropy(logits, batch["y"], (PAD,))
        return per_sequence if scale is None else per_sequence * scale

    def metrics(batch: Batch, logits: Array) -> dict[str, tuple[Array, Array]]:
        y = batch["y"]
        tokens = metrics_lib.sequence_token_count(y, (PAD,))
        nonempty = metrics_lib.sequence_nonempty(y, (PAD,))
        ce_sum = metrics_lib.sequence_cross_entropy(logits, y, (PAD,))
        logits_mask = metrics_lib.make_logits_mask(full_vocab, excluded)
        no_eos = metrics_lib.sequence_token_accuracy(logits, y, (PAD, EOS))
        return {
            "accuracy_in_vocab": metrics_lib.sequence_token_accuracy(
                logits, y, (PAD, EOS), logits_mask),
            "accuracy_no_eos": no_eos,
            "sequence_length": (tokens, nonempty),
            "sequence_loss": (ce_sum, nonempty),
            "token_loss": (ce_sum, tokens),
            "token_oov_rate": (metrics_lib.sequence_oov_count(y, (oov,), (PAD,)), tokens),
            "truncation_rate": metrics_lib.sequence_truncation_rate(y, EOS, (PAD,)),
            "loss": (ce_sum, tokens),
            "accuracy": no_eos,
        }

    return Model(init=init, apply=apply, loss=loss, metrics=metrics)


__all__ = ["BOS", "EOS", "PAD", "stackoverflow_lstm"]
