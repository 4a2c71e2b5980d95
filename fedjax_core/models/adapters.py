"""Models written with Flax (linen or NNX) or Equinox, as a `Model(init, apply, loss, metrics)`.

Neither library is a dependency of fedjax-sim: each adapter imports its library when called
and says which extra to install when it is missing (`pip install 'fedjax-sim[flax]'`,
`pip install 'fedjax-sim[equinox]'`). The adapted model is an ordinary `Model`: its params
are a pytree of arrays that every algorithm, aggregator and optimizer handles like the
params of the models written in plain JAX.

- `from_flax(module, example_batch, loss)`: params are `variables["params"]` of a
  `flax.linen.Module`; `apply(params, batch, key, train)` runs
  `module.apply({"params": params}, batch["x"], train=train, rngs={"dropout": key})`.
- `from_equinox(make_module, loss)`: params are the floating-point array leaves of
  `make_module(key)` (`eqx.partition`); `apply` runs `eqx.combine(params, static)` in
  inference mode unless `train`, `vmap`ped over the examples with one dropout key each.
- `from_nnx(module_factory, loss)`: params are the `nnx.Param` state of
  `module_factory(nnx.Rngs(key))` as a nested dict (`nnx.split`); `apply` runs
  `nnx.merge(graphdef, params, rest)` in `.train()` or `.eval()` mode, with the module's RNG
  streams (dropout) reseeded from the step key when training.

Example:
  >>> import flax.linen as nn
  >>> class MLP(nn.Module):
  ...     @nn.compact
  ...     def __call__(self, x, train: bool = False):
  ...         x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
  ...         x = nn.Dropout(0.5, deterministic=not train)(x)
  ...         return nn.Dense(10)(x)
  >>> model = from_flax(MLP(), {"x": np.zeros((1, 28, 28, 1), np.float32)},
  ...                   loss=classification_loss, metrics=classification_metrics)
"""

import importlib
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_core.models.base import MetricFn, Model
from fedjax_core.typing import Array, Batch, Params, PRNGKey

LossFn = Callable[[Batch, Array], Array]


def loss_metrics(loss: LossFn) -> MetricFn:
    """The default metrics of an adapted model: `{"loss": (loss(batch, preds), 1)}`.

    Args:
      loss: the per-example loss, `loss(batch, preds) -> Float[Array, "batch"]`.

    Returns:
      A `MetricFn`; evaluation reports the mean loss over the real examples.
    """
    def metrics(batch: Batch, preds: Array) -> dict[str, tuple[Array, Array]]:
        per_example = loss(batch, preds)
        return {"loss": (per_example, jnp.ones_like(per_example))}

    return metrics


def _require(module: str, extra: str, caller: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{caller} needs {extra}, which is not installed; install it with "
                          f"pip install 'fedjax-sim[{extra}]'") from e


def _inputs(batch: Batch, inputs: str | None, caller: str) -> Any:
    if inputs is None:
        return batch
    try:
        return batch[inputs]
    except KeyError:
        raise ValueError(f"{caller}: the batch has no feature {inputs!r} (it has {sorted(batch)}); "
                       "pass inputs= the feature the module reads, or inputs=None for the "
                       "whole batch") from None


def _call_parameters(fn: Callable) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or an odd callable: assume nothing
        return {}


def _accepts(params: Mapping[str, inspect.Parameter], name: str) -> bool:
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD
                                 for p in params.values())


def from_flax(module: Any, example_batch: Batch, loss: LossFn,
              metrics: MetricFn | None = None, *, inputs: str | None = "x") -> Model:
    """A `flax.linen.Module` as a `Model`.

    `init(key) = module.init({"params": key}, example)["params"]` and
    `apply(params, batch, key, train) = module.apply({"params": params}, batch[inputs],
    rngs={"dropout": key})`, where `key` (a client step's key) is passed only when `train`.
    If the module's `__call__` takes a `train` argument it gets `train=train`; if it takes
    `deterministic` it gets `deterministic=not train`; otherwise neither. The params are the
    `"params"` collection as a nested dict (`{"Dense_0": {"kernel": ..., "bias": ...}}`).

    Only the `"params"` collection is trained and averaged. A module that creates other
    collections (BatchNorm's `"batch_stats"`, `self.sow`) is refused: federated training
    here has no place for mutable state; use GroupNorm or LayerNorm instead of BatchNorm.

    Args:
      module: a `flax.linen.Module` instance (not `flax.nnx`); it maps `batch[inputs]`
        with a leading `batch` axis to predictions with the same leading axis.
      example_batch: a batch whose `inputs` feature has the shape and dtype of the real
        ones (only the shape and dtype are kept; any batch size works), e.g.
        `{"x": np.zeros((1, 28, 28, 1), np.float32)}`.
      loss: `loss(batch, preds) -> Float[Array, "batch"]`, per example, e.g.
        `fedjax_core.models.linear.classification_loss`.
      metrics: `metrics(batch, preds)`, see `MetricFn`; default `loss_metrics(loss)`.
        `fedjax_core.models.linear.classification_metrics` adds accuracy.
      inputs: the batch feature passed to the module; `None` passes the whole batch dict.

    Returns:
      A `Model`.

    Raises:
      ImportError: flax is not installed (`pip install 'fedjax-sim[flax]'`).
      TypeError: `module` is not a `flax.linen.Module`.
      ValueError: `example_batch` has no feature `inputs`; or (at `init`) the module
        creates variable collections other than `"params"`.

    Example:
      >>> model = from_flax(MLP(), {"x": np.zeros((1, 3), np.float32)}, classification_loss)
      >>> params = model.init(jax.random.key(0))
      >>> logits = model.apply(params, {"x": x}, key=k, train=True)
    """
    linen = _require("flax.linen", "flax", "from_flax")
    if not isinstance(module, linen.Module):
        raise TypeError(f"from_flax takes a flax.linen.Module instance, got "
                        f"{type(module).__name__}; for a flax.nnx module use "
                        "from_nnx(lambda rngs: Module(..., rngs=rngs), loss)")
    call_params = _call_parameters(module.__call__)
    def mode(train) -> dict:
        if "train" in call_params:
            return {"train": train}
        if "deterministic" in call_params:
            return {"deterministic": not train}
        return {}
    example = _inputs(example_batch, inputs, "from_flax")
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype),
                        example)

    def init(key: PRNGKey) -> Params:
        x = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)
        variables = module.init({"params": key}, x, **mode(False))
        extra = sorted(set(variables) - {"params"})
        if extra:
            raise ValueError(
                f"from_flax: {type(module).__name__} creates the variable collections "
                f"{extra} besides 'params'; only 'params' can be trained and averaged across "
                "clients, so use a module without mutable state (e.g. GroupNorm or LayerNorm "
                "instead of BatchNorm)")
        return dict(variables.get("params", {}))

    def apply(params: Params, batch: Batch, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        rngs = {"dropout": key} if train and key is not None else {}
        return module.apply({"params": params}, _inputs(batch, inputs, "from_flax"),
                            rngs=rngs, **mode(train))

    return Model(init=init, apply=apply, loss=loss,
                 metrics=loss_metrics(loss) if metrics is None else metrics)


def from_equinox(make_module: Callable[[PRNGKey], Any], loss: LossFn,
                 metrics: MetricFn | None = None, *, inputs: str | None = "x",
                 per_example: bool = True) -> Model:
    """An Equinox module, built from a key, as a `Model`.

    `params, static = eqx.partition(make_module(key), eqx.is_inexact_array)`: the params
    are the module's floating-point array leaves (a pytree of the module's own type, `None`
    where a leaf is static); everything else (integer arrays, activations, sizes) is taken
    once from `make_module(jax.random.key(0))` and closed over. `apply` rebuilds the module
    with `eqx.combine(params, static)`, sets `eqx.nn.inference_mode(module, not train)` (so
    `eqx.nn.Dropout` is off unless `train`) and, with `per_example=True` (Equinox's usual
    style), maps it over the examples with `jax.vmap`; when `train` and a key is given, each
    example gets its own dropout key `split(key, batch)[i]`, passed as `key=` if the module's
    `__call__` takes one.

    Args:
      make_module: `make_module(key) -> eqx.Module`, e.g.
        `lambda key: eqx.nn.MLP(784, 10, 64, 1, key=key)`. It is called once here and once
        per `init`; the module's structure must not depend on the key.
      loss: `loss(batch, preds) -> Float[Array, "batch"]`, per example.
      metrics: `metrics(batch, preds)`, see `MetricFn`; default `loss_metrics(loss)`.
      inputs: the batch feature passed to the module; `None` passes the whole batch dict
        (then `per_example=True` maps over the leading axis of every feature).
      per_example: the module takes one example (`vmap` over the batch); `False` when it
        takes a whole batch itself (it then gets the whole step key).

    Returns:
      A `Model`.

    Raises:
      ImportError: equinox is not installed (`pip install 'fedjax-sim[equinox]'`).
      TypeError: `make_module` does not return an `equinox.Module` (e.g. the `(module,
        state)` pair of `eqx.nn.make_with_state`: stateful layers such as BatchNorm are not
        supported).

    Example:
      >>> model = from_equinox(lambda k: eqx.nn.MLP(3, 4, 5, 1, key=k), classification_loss)
      >>> params = model.init(jax.random.key(0))
      >>> logits = model.apply(params, {"x": x})
    """
    eqx = _require("equinox", "equinox", "from_equinox")
    template = make_module(jax.random.key(0))
    if not isinstance(template, eqx.Module):
        raise TypeError(f"from_equinox: make_module(key) returned {type(template).__name__}, not "
                        "an equinox.Module; return the module alone (stateful layers from "
                        "eqx.nn.make_with_state, such as BatchNorm, are not supported)")
    _, static = eqx.partition(template, eqx.is_inexact_array)
    takes_key = _accepts(_call_parameters(template.__call__), "key")

    def init(key: PRNGKey) -> Params:
        params, _ = eqx.partition(make_module(key), eqx.is_inexact_array)
        return params

    def call(module, x, key):
        return module(x, key=key) if takes_key else module(x)

    def apply(params: Params, batch: Batch, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        module = eqx.nn.inference_mode(eqx.combine(params, static), value=not train)
        x = _inputs(batch, inputs, "from_equinox")
        key = key if train else None
        if not per_example:
            return call(module, x, key)
        if key is None:
            return jax.vmap(lambda xi: call(module, xi, None))(x)
        n = jax.tree.leaves(x)[0].shape[0]
        return jax.vmap(lambda xi, ki: call(module, xi, ki))(x, jax.random.split(key, n))

    return Model(init=init, apply=apply, loss=loss,
                 metrics=loss_metrics(loss) if metrics is None else metrics)


def _nnx_str_keys(pure: Any) -> Any:
    """A pure state dict with every key as a string (`nnx.List` indices become "0", "1")."""
    if isinstance(pure, Mapping):
        return {str(k): _nnx_str_keys(v) for k, v in pure.items()}
    return pure


def _nnx_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def from_nnx(module_factory: Callable[[Any], Any], loss: LossFn,
             metrics: MetricFn | None = None, *, inputs: str | None = "x",
             allow_batch_stats: bool = False) -> Model:
    """A Flax NNX module, built from an `nnx.Rngs`, as a `Model`.

    `graphdef, params, rest = nnx.split(module_factory(nnx.Rngs(key)), nnx.Param, ...)`:
    the params are the module's `nnx.Param` state as a plain nested dict of arrays (string
    keys; an `nnx.List`'s indices become `"0"`, `"1"`, ...), so no NNX object is ever part of
    the state that algorithms jit, average or checkpoint. The graph definitions (one with the
    module in `.train()` mode, one in `.eval()` mode) and the other state (RNG streams,
    constants) are taken once from `module_factory(nnx.Rngs(0))` and closed over; `apply`
    rebuilds the module with `nnx.merge(graphdef, params, rest)` inside the caller's jit and
    calls it on `batch[inputs]`.

    Dropout: when `train`, every RNG stream of the module (`nnx.Dropout(rate, rngs=rngs)`
    keeps one) is reseeded from the step's key, `fold_in(key, i)` for the i-th stream with
    its count at 0, so the masks follow the client/step key the algorithm passes (and differ
    between clients and steps) and a run is reproducible from its seed. Outside training the
    module is in `.eval()` mode (`deterministic=True`). If `__call__` takes `train` or
    `deterministic` it also gets `train=train` / `deterministic=not train`.

    State other than `nnx.Param` is not trained or averaged. BatchNorm's running statistics
    (`nnx.BatchStat`) are refused unless `allow_batch_stats=True`: in federated training each
    client would update its own copy of the running mean and variance on its own (non-IID)
    data, so the copies diverge, and their average is not the statistics of the averaged
    model on any data (Hsieh et al. 2020; FedJAX and TFF's models use GroupNorm for this
    reason). With `allow_batch_stats=True`, BatchNorm normalizes with each batch's own
    statistics in training and in evaluation (`use_running_average=False`): the stored
    statistics stay at their initial values, are never read, and every update to them (or
    to any other non-Param variable) is dropped. Mind that padded rows of a batch then take
    part in its statistics. Without the opt-in, a module that changes any non-Param, non-RNG
    variable while it runs is refused when `apply` is traced.

    Args:
      module_factory: `module_factory(rngs) -> nnx.Module`, e.g.
        `lambda rngs: MLP(784, 64, 10, rngs=rngs)`; called once here and once per `init`.
        The module maps `batch[inputs]` with a leading batch axis to predictions with the
        same leading axis; its structure must not depend on the key.
      loss: `loss(batch, preds) -> Float[Array, "batch"]`, per example.
      metrics: `metrics(batch, preds)`, see `MetricFn`; default `loss_metrics(loss)`.
      inputs: the batch feature passed to the module; `None` passes the whole batch dict.
      allow_batch_stats: accept `nnx.BatchStat` state (see above).

    Returns:
      A `Model`.

    Raises:
      ImportError: flax is not installed (`pip install 'fedjax-sim[flax]'`).
      TypeError: `module_factory(rngs)` does not return an `nnx.Module`.
      ValueError: the module holds `nnx.BatchStat` state and `allow_batch_stats` is False;
        or (when `apply` is traced) it changes a non-Param variable while it runs.

    Example:
      >>> from flax import nnx
      >>> class MLP(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.hidden, self.out = nnx.Linear(3, 8, rngs=rngs), nnx.Linear(8, 4, rngs=rngs)
      ...         self.dropout = nnx.Dropout(0.5, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.out(self.dropout(nnx.relu(self.hidden(x))))
      >>> model = from_nnx(MLP, classification_loss, classification_metrics)
      >>> params = model.init(jax.random.key(0))  # {"hidden": {"kernel", "bias"}, "out": ...}
      >>> logits = model.apply(params, {"x": x}, key=k, train=True)
    """
    _require("flax", "flax", "from_nnx")
    nnx = _require("flax.nnx", "flax", "from_nnx")
    template = module_factory(nnx.Rngs(0))
    if not isinstance(template, nnx.Module):
        raise TypeError(f"from_nnx: module_factory(rngs) returned {type(template).__name__}, not "
                        "a flax.nnx.Module; pass a function of nnx.Rngs that builds the module, "
                        "e.g. lambda rngs: MLP(784, 10, rngs=rngs)")
    name = type(template).__name__
    _, params_state, rest_state = nnx.split(template, nnx.Param, ...)
    rest_flat = list(nnx.to_flat_state(rest_state))
    stats = [_nnx_path(p) for p, v in rest_flat if isinstance(v, nnx.BatchStat)]
    if stats and not allow_batch_stats:
        raise ValueError(
            f"from_nnx: {name} holds BatchNorm statistics (nnx.BatchStat at {', '.join(stats)}); "
            "running statistics that each client updates on its own data diverge across "
            "clients and their average is not the model's, so only nnx.Param state is trained "
            "and averaged: use nnx.GroupNorm or nnx.LayerNorm, or pass allow_batch_stats=True "
            "to normalize with each batch's own statistics")
    param_paths = [p for p, _ in nnx.to_flat_state(params_state)]
    rng_paths = [p for p, v in rest_flat if isinstance(v, nnx.RngKey)]
    count_paths = [p for p, v in rest_flat if isinstance(v, nnx.RngCount)]
    rng_kinds = (nnx.RngKey, nnx.RngCount)

    def graphdef(train: bool):
        template.train() if train else template.eval()
        if allow_batch_stats:
            template.set_attributes(use_running_average=False, raise_if_not_found=False)
        return nnx.split(template, nnx.Param, ...)[0]

    graphdefs = {True: graphdef(True), False: graphdef(False)}
    rest_pure = nnx.to_pure_dict(rest_state)
    call_params = _call_parameters(type(template).__call__)

    def mode(train: bool) -> dict:
        if "train" in call_params:
            return {"train": train}
        if "deterministic" in call_params:
            return {"deterministic": not train}
        return {}

    def get(tree: Mapping, path: tuple, str_keys: bool) -> Any:
        for p in path:
            tree = tree[str(p) if str_keys else p]
        return tree

    def put(tree: dict, path: tuple, value: Any) -> None:
        for p in path[:-1]:
            tree = tree.setdefault(p, {})
        tree[path[-1]] = value

    def init(key: PRNGKey) -> Params:
        _, params, _ = nnx.split(module_factory(nnx.Rngs(key)), nnx.Param, ...)
        return _nnx_str_keys(nnx.to_pure_dict(params))

    def apply(params: Params, batch: Batch, key: PRNGKey | None = None,
              train: bool = False) -> Array:
        train = bool(train)
        state: dict = {}
        for path in param_paths:
            put(state, path, get(params, path, True))
        rest = jax.tree.map(lambda a: a, rest_pure)  # a fresh dict: the template's stays
        if train and rng_paths:
            if key is None:
                raise ValueError(f"from_nnx: {name} has RNG streams (dropout); train=True "
                                 "needs the step key")
            step_key = jnp.asarray(key)
            if not jnp.issubdtype(step_key.dtype, jax.dtypes.prng_key):
                step_key = jax.random.wrap_key_data(step_key)  # a raw uint32 key
            for i, path in enumerate(rng_paths):
                put(rest, path, jax.random.fold_in(step_key, i))
            for path in count_paths:
                put(rest, path, jnp.zeros((), jnp.uint32))
        inputs_ = _inputs(batch, inputs, "from_nnx")
        module = nnx.merge(graphdefs[train], state, rest)
        others = nnx.Not(nnx.Param)
        given = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(module, others))}
        out = module(inputs_, **mode(train))
        if not allow_batch_stats:
            for p, v in nnx.to_flat_state(nnx.state(module, others)):
                if not isinstance(v, rng_kinds) and v.get_value() is not given.get(p):
                    raise ValueError(
                        f"from_nnx: {name} changes its {type(v).__name__} state at "
                        f"{_nnx_path(p)} while it runs; only nnx.Param state is trained and "
                        "averaged across clients, so make it an nnx.Param or compute it "
                        "without state (allow_batch_stats=True drops such updates)")
        return out

    return Model(init=init, apply=apply, loss=loss,
                 metrics=loss_metrics(loss) if metrics is None else metrics)


__all__ = ["from_equinox", "from_flax", "from_nnx", "loss_metrics"]
