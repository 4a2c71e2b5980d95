"""The types of a factory's hyperparameters, read from its signature, and the check of given
values against them (so that `proximal_weight="abc"` is refused by name before any maths)."""

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

_WORDS = {bool: "a boolean (true or false)", int: "an integer", float: "a number",
          str: "a string"}


def expected_type(param: inspect.Parameter) -> tuple[type, bool] | None:
    """`(type, None allowed)` of a factory parameter: its annotation when that is `bool`,
    `int`, `float` or `str` (or one of them `| None`), else its default's type; None when
    neither says (no annotation and a default of None or none).

    Example:
      >>> expected_type(inspect.signature(lambda beta=0.1: 0).parameters["beta"])
      (<class 'float'>, False)
    """
    annotation = param.annotation
    optional = param.default is None
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = optional or len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else None
    if isinstance(annotation, type) and annotation in _WORDS:
        return annotation, optional
    if type(param.default) in _WORDS:
        return type(param.default), optional
    return None


_KINDS = {bool: "b", int: "iu", float: "fiu", str: "USO"}
"""numpy dtype kinds a scalar array (or a traced value, as a sweep's vmap passes) may have."""


def _fits(value: Any, kind: type) -> bool:
    dtype = getattr(value, "dtype", None)
    if dtype is not None and not isinstance(value, (bool, int, float, str)):
        return getattr(value, "shape", None) == () and getattr(dtype, "kind", "") in _KINDS[kind]
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def check_types(owner: str, build: Callable, given: dict[str, Any], flag: str = "--option",
                skip: tuple[str, ...] = ()) -> None:
    """Raises `ValueError` naming the first option in `given` whose value is not of the type
    `build`'s signature gives it (`expected_type`); options of unknown type pass.

    Args:
      owner: how the message names the factory, e.g. "algorithm 'fedprox'".
      build: the factory whose keyword parameters are the options.
      given: option name -> value (names `build` does not take are left to the caller).
      flag: the command-line flag the message suggests for the fix.
      skip: names not checked (e.g. the facts a facade supplies).

    Example:
      >>> check_types("algorithm 'fedprox'", lambda proximal_weight=0.01: 0,
      ...             {"proximal_weight": "abc"})
      Traceback (most recent call last):
      ValueError: algorithm 'fedprox' option proximal_weight expects a number, got 'abc'; ...
    """
    params = inspect.signature(build).parameters
    for key, value in given.items():
        if key in skip or key not in params:
            continue
        kind = expected_type(params[key])
        if kind is None or (value is None and kind[1]) or (value is not None
                                                           and _fits(value, kind[0])):
            continue
        example = params[key].default
        hint = (f"; e.g. {flag} {key}={str(example).lower() if kind[0] is bool else example}"
                if example is not inspect.Parameter.empty and example is not None else "")
        raise ValueError(f"{owner} option {key} expects {_WORDS[kind[0]]}, got {value!r}{hint}")
