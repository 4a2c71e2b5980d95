"""FedJAX's Shakespeare next-character LSTM (820,522 parameters)."""

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
OOV = 89
"""Out-of-vocabulary token id (the last of the 90)."""


def shakespeare_lstm(vocab_size: int = 90, embed_size: int = 8, hidden_size: int = 256,
                     num_layers: int = 2, kernels: nn.KernelChoice = "auto") -> Model:
    """The character LSTM of FedJAX's Shakespeare task.

    `e_t = embed(x_t)`; for each layer `l`: `h^l_t = LSTM_l(in^l_t, state^l_{t-1})`,
    `in^{l+1}_t = tanh(h^l_t)` (haiku `DeepRNN([LSTM, tanh, LSTM, tanh])`);
    `logits_t = dense(in^{L+1}_t)`. Zero initial state; one `lax.scan` per layer.

    Loss per sequence (FedJAX's `train_loss`): `mean_t(ce_t * [y_t != PAD])`, the mean
    over all `T` steps. Metrics, as `(numerator[B], denominator[B])`:
    `'loss'`: (ce summed over non-PAD tokens, non-PAD tokens);
    `'accuracy'`: (correct tokens, tokens), targets PAD and EOS left out;
    `'accuracy_in_vocab'`: the same with PAD, BOS, EOS, OOV never predicted;
    `'oov_rate'`: (OOV targets, non-PAD tokens).

    Args:
      vocab_size: number of token ids `V` (90: PAD, BOS, EOS, 86 characters, OOV).
      embed_size: embedding width.
      hidden_size: width of every LSTM layer.
      num_layers: number of stacked LSTM layers.
      kernels: `"auto"` (the XLA:CPU kernels on a CPU backend; elsewhere `jnp.dot`; both
        with `nn.lstm_unroll`'s hand-written gradient, about 2x faster on CPU), `"plain"`
        (`jnp.dot` and autodiff of the scan: forward mode such as `jax.jvp` / `jax.jacfwd`
        works too), `"cpu"`, or an `nn.Kernels`; see `nn.Kernels`. Chosen once, here.

    Returns:
      A `Model`; `batch['x']`, `batch['y']` are `Int[Array, "B T"]`, logits `[B, T, V]`.

    Example:
      >>> model = shakespeare_lstm()
      >>> params = model.init(jax.random.key(0))  # 820,522 parameters

    References:
      Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
    """
    oov = vocab_size - 1  # == OOV for the default vocabulary of 90
    excluded = (PAD, BOS, EOS, oov)
    layer_names = [f"lstm_{i}" for i in range(num_layers)]
    k = nn.resolve_kernels(kernels)

    def init(key: PRNGKey) -> Params:
        keys = jax.random.split(key, num_layers + 2)
        params = {"embed": nn.embedding_init(keys[0], vocab_size, embed_size)}
        in_size = embed_size
        for name, k in zip(layer_names, keys[1:-1]):
            params[name] = nn.lstm_init(k, in_size, hidden_size)
            in_size = hidden_size
        params["dense"] = nn.dense_init(keys[-1], hidden_size, vocab_size)
        return params

    def apply(params: Params, batch: Batch, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        del key, train
        h = nn.embedding(params["embed"], batch["x"])
        for name in layer_names:
            hs, _ = nn.lstm_unroll(params[name], h, custom_vjp=k.lstm_custom_vjp,
                                   native=k.native_lstm)
            h = jnp.tanh(hs)
        return nn.dense(params["dense"], h, kernels=k)

    def loss(batch: Batch, logits: Array) -> Array:
        ce = metrics_lib.sequence_token_cross_entropy(logits, batch["y"])
        return jnp.mean(ce * (batch["y"] != PAD), axis=-1)

    def metrics(batch: Batch, logits: Array) -> dict[str, tuple[Array, Array]]:
        y = batch["y"]
        tokens = metrics_lib.sequence_token_count(y, (PAD,))
        logits_mask = metrics_lib.make_logits_mask(vocab_size, excluded)
        return {
            "loss": (metrics_lib.sequence_cross_entropy(logits, y, (PAD,)), tokens),
            "accuracy": metrics_lib.sequence_token_accuracy(logits, y, (PAD, EOS)),
            "accuracy_in_vocab": metrics_lib.sequence_token_accuracy(
                logits, y, (PAD, EOS), logits_mask),
            "oov_rate": (metrics_lib.sequence_oov_count(y, (oov,), (PAD,)), tokens),
        }

    return Model(init=init, apply=apply, loss=loss, metrics=metrics)


__all__ = ["BOS", "EOS", "OOV", "PAD", "shakespeare_lstm"]
