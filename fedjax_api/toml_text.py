"""TOML text in and out, for config files (`fedjax_api.configfile`): parsing with one-line
errors that give the line and column, and writing values as TOML literals.

Example:
  >>> parse(b"rounds = 5\\n", "exp.toml")
  {'rounds': 5}
  >>> literal({"b2": 0.999, "name": "x"})
  '{b2 = 0.999, name = "x"}'
"""

import math
import re
import tomllib
from typing import Any

from fedjax_api.errors import ConfigError

TYPE_WORDS = {"string": "a string", "integer": "an integer", "number": "a number",
              "boolean": "true or false", "table": "a table", "array": "an array of strings"}
"""How an error names each option type: `rounds expects an integer, got ...`."""

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def parse(raw: bytes, name: str) -> dict:
    """The TOML document of `raw` (UTF-8, BOM allowed), read from the file `name`.

    Raises:
      ConfigError: `name:LINE:COL: invalid TOML: ...` for text that is not UTF-8 or not
        TOML (a key defined twice is hinted at), or nested too deeply.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{name}:{line}: invalid TOML: not UTF-8 text (byte {e.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e).splitlines()[0] if str(e) else "syntax error"
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
        if m:
            line, col = m[1], m[2]
        else:  # "(at end of document)"
            m = re.search(r"\s*\(at end of document\)$", msg)
            line = text.count("\n") + 1
            col = len(text) - (text.rfind("\n") + 1) + 1
        what = msg[:m.start()] if m else msg
        if what.startswith(("Cannot overwrite", "Cannot declare")):
            what += " (a key or table defined twice?)"
        raise ConfigError(f"{name}:{line}:{col}: invalid TOML: "
                          f"{printable(what, quote=False)}") from None
    except RecursionError:
        raise ConfigError(f"{name}: invalid TOML: arrays or tables nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{name}: invalid TOML: "
                          f"{printable(str(e).split(';')[0], quote=False)}") from None


def check_plain(where: str, key: str, value: Any) -> None:
    """Raises a ConfigError unless `value` is a TOML string, number, boolean, array or table
    of those (not a date)."""
    if isinstance(value, dict):
        for name, v in value.items():
            check_plain(where, f"{key}.{show_key((name,))}", v)
    elif isinstance(value, list):
        for v in value:
            check_plain(where, key, v)
    elif not isinstance(value, (str, int, float, bool)):
        raise ConfigError(f"{where}{key} expects a string, number, boolean, array or table, "
                          f"got {describe(value)}")


def describe(value: Any) -> str:
    """`string 'ten'`, `float 10.0`, `boolean true`, `an array`, `a table`, `date/time ...`."""
    if isinstance(value, str):
        return f"string {printable(value)}"
    if isinstance(value, (bool, int, float)):
        kind = ("boolean" if isinstance(value, bool) else "integer" if isinstance(value, int)
                else "float")
        return f"{kind} {printable(literal(value), quote=False)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"date/time {printable(str(value), quote=False)}"


def printable(text: str, quote: bool = True, limit: int = 80) -> str:
    """`text` safe for a one-line message, shortened: repr-quoted, or (`quote=False`) with
    only its unprintable characters escaped."""
    text = text if len(text) <= limit else text[:limit] + "..."
    if quote:
        return repr(text)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def show_key(path) -> str:
    """A key path as TOML writes it: bare parts, or quoted ones (`algorithm.options."a b"`)."""
    return ".".join(p if _BARE.fullmatch(p) else _string(p) for p in path)


def literal(value: Any) -> str:
    """A TOML literal: strings, integers, floats (inf, nan), booleans, arrays, inline tables
    (None values of a table are left out)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{show_key((k,))} = {literal(v)}"
                               for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def _string(text: str) -> str:
    return '"' + "".join(
        _ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
        for c in text) + '"'
