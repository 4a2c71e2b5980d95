"""Mixed precision: a `Policy` of three dtypes, and `with_precision`, which makes a model compute in one.

A policy has the three dtypes of the `jmp` pattern (DeepMind's mixed-precision library):

| dtype | what has it | `"f32"` | `"bf16"` |
| --- | --- | --- | --- |
| `param_dtype` | the stored (master) params, the optimizer states, client deltas, aggregation, DP noise | f32 | f32 |
| `compute_dtype` | the model's forward and backward pass | f32 | bfloat16 |
| `output_dtype` | the predictions the loss and the metrics see | f32 | f32 |

`with_precision(model, "bf16")` returns a `Model` whose `apply` casts the params and the
floating features of the batch to bfloat16, runs the model's own `apply`, and casts its
floating outputs back to float32. Nothing else changes: `init` still makes f32 params, the
loss and the metrics run in f32 on f32 logits, and every optimizer, client update,
aggregator and server step sees only f32 arrays. The gradient of the f32 params arrives in
f32 through the transpose of the cast (`astype`'s VJP casts the cotangent back), so the
client optimizer steps f32 master weights with f32 gradients whose values were computed in
bfloat16. Evaluation runs the same `apply`, so it computes in the training precision; its
metric sums are accumulated in f32 (`fedjax_core.evaluate`). The f32 policy returns the
model itself: every number of an f32 run is bit-identical to a run without a policy.

No loss scaling: bfloat16 has float32's 8-bit exponent (range up to ~3.4e38, normal values
down to ~1.2e-38), so gradients do not underflow the way float16's (5-bit exponent) do;
only the mantissa is shorter (8 bits, ~3 significant digits). Loss scaling is a float16
remedy and float16 is not offered.

Why not the `jmp` package itself: the pattern is the three dtypes and three casts, about
30 lines here; a dependency for them would add an install and a version to track (and jmp
is in maintenance mode), for nothing these lines do not.

Layers that need more than bfloat16 keep f32 inside: `resnet.group_norm` computes its
mean and variance in f32; the matmuls accumulate in f32 on every XLA backend and round
their result to bfloat16.

Example:
  >>> model = with_precision(emnist_cnn(), "bf16")
  >>> params = model.init(jax.random.key(0))        # f32, as without a policy
  >>> grads = jax.grad(lambda p: masked_mean_loss(model, p, batch, mask, key))(params)
  >>> grads["conv_0"]["w"].dtype                    # f32; computed in bfloat16
  dtype('float32')

References:
  Micikevicius et al., "Mixed Precision Training", ICLR 2018; Kalamkar et al., "A Study of
  BFLOAT16 for Deep Learning Training", 2019; DeepMind's jmp
  (https://github.com/google-deepmind/jmp), `jmp.Policy`.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_core.models.base import Model

PRECISIONS = ("f32", "bf16")
"""The precisions a run takes (`--precision`)."""


def _cast_floats(tree: Any, dtype: Any) -> Any:
    """Every floating-point leaf of `tree` as `dtype`; other leaves (ints, bools, keys) as they are."""
    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return jnp.asarray(x).astype(dtype)
        return x
    return jax.tree.map(cast, tree)


class Policy(NamedTuple):
    """The dtypes of a mixed-precision run, as `jmp.Policy`.

    Attributes:
      param_dtype: the stored params and everything the optimizers and the server touch.
      compute_dtype: the model's forward and backward pass.
      output_dtype: the predictions given to the loss and the metrics.

    Example:
      >>> policy("bf16").compute_dtype
      dtype(bfloat16)
    """

    param_dtype: Any
    compute_dtype: Any
    output_dtype: Any

    def cast_to_compute(self, tree: Any) -> Any:
        """The floating leaves of `tree` (params, features) as `compute_dtype`."""
        return _cast_floats(tree, self.compute_dtype)

    def cast_to_param(self, tree: Any) -> Any:
        """The floating leaves of `tree` as `param_dtype`."""
        return _cast_floats(tree, self.param_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        """The floating leaves of `tree` (predictions) as `output_dtype`."""
        return _cast_floats(tree, self.output_dtype)

    @property
    def name(self) -> str:
        """`"f32"` or `"bf16"`: the compute dtype's short name."""
        return {jnp.dtype(jnp.float32): "f32",
                jnp.dtype(jnp.bfloat16): "bf16"}.get(jnp.dtype(self.compute_dtype),
                                                     str(jnp.dtype(self.compute_dtype)))


def policy(precision: str) -> Policy:
    """The `Policy` of a precision name.

    `"f32"`: everything float32. `"bf16"`: float32 params and outputs, bfloat16 compute.

    Args:
      precision: `"f32"` or `"bf16"`.

    Returns:
      A `Policy`.

    Raises:
      ValueError: `precision` is neither.

    Example:
      >>> policy("bf16") == Policy(jnp.float32, jnp.bfloat16, jnp.float32)
      True
    """
    if precision == "f32":
        return Policy(jnp.dtype(jnp.float32), jnp.dtype(jnp.float32), jnp.dtype(jnp.float32))
    if precision == "bf16":
        return Policy(jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


class PrecisionApply:
    """A model's `apply` run under a `Policy` (what `with_precision` puts in `Model.apply`).

    `__call__(params, batch, key, train) = cast_to_output(inner(cast_to_compute(params),
    cast_to_compute(batch), key, train))`.

    Attributes:
      inner: the model's own `apply`.
      policy: the `Policy`.
    """

    def __init__(self, inner: Any, policy: Policy):
        self.inner, self.policy = inner, policy

    def __call__(self, params: Any, batch: Any, key: Any = None, train: bool = False,
                 **kwargs: Any) -> Any:
        p = self.policy
        out = self.inner(p.cast_to_compute(params), p.cast_to_compute(batch), key=key,
                         train=train, **kwargs)
        return p.cast_to_output(out)


def with_precision(model: Model, precision: str | Policy) -> Model:
    """`model` computing its forward and backward pass in `precision`'s compute dtype.

    `apply'(params, batch) = f32(apply(bf16(params), bf16(batch)))` for `"bf16"`, where
    `bf16(.)` casts the floating leaves only (integer token ids, labels and keys stay);
    `init`, `loss` and `metrics` are the model's. Gradients with respect to the f32 params
    are f32. `"f32"` (or any policy whose three dtypes are float32) returns `model` itself,
    so an f32 run is bit-identical to one without a policy. A model already wrapped is
    rewrapped from its own `apply`, never twice.

    Args:
      model: any `Model` (the task models, `mlp`, `resnet18`, the Flax / NNX / Equinox
        adapters' models).
      precision: `"f32"`, `"bf16"` or a `Policy`.

    Returns:
      A `Model`.

    Raises:
      ValueError: an unknown precision name.

    Example:
      >>> model = with_precision(shakespeare_lstm(), "bf16")
      >>> logits = model.apply(params, batch)   # computed in bfloat16
      >>> logits.dtype
      dtype('float32')
    """
    pol = policy(precision) if isinstance(precision, str) else precision
    apply = model.apply
    wrapped = isinstance(apply, PrecisionApply)
    inner = apply.inner if wrapped else apply
    if all(jnp.dtype(d) == jnp.float32 for d in pol):
        return model._replace(apply=inner) if wrapped else model
    if wrapped and apply.policy == pol:
        return model
    return model._replace(apply=PrecisionApply(inner, pol))


def precision_of(model: Model) -> str:
    """The precision `model` computes in: `"bf16"` under `with_precision(..., "bf16")`, else `"f32"`.

    Example:
      >>> precision_of(with_precision(emnist_cnn(), "bf16"))
      'bf16'
    """
    return model.apply.policy.name if isinstance(model.apply, PrecisionApply) else "f32"


__all__ = ["PRECISIONS", "Policy", "PrecisionApply", "policy", "precision_of", "with_precision"]
