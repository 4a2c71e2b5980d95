"""JAX's persistent compilation cache under fedjax-sim's cache directory.

A round is one jitted call whose compilation takes seconds (much longer for large models
on CPU). With the persistent cache, a second process that compiles the same round (same
model, cohort shape, algorithm and JAX version) loads the executable from disk instead.
`fedjax` turns it on by default; scripts call `enable_compilation_cache()`.
"""

import os
from pathlib import Path

import jax

from fedjax_api.datasets.download import cache_dir

ENV = "FEDJAX_COMPILATION_CACHE"
"""Set to `0` to keep `fedjax` from enabling the cache, or to a directory to use that one."""

MIN_COMPILE_SECONDS = 0.5
"""Compilations faster than this are not worth a disk entry (JAX's default is 1 s)."""


def default_dir() -> Path | None:
    """`$FEDJAX_COMPILATION_CACHE` if it names a directory, None if it is `0`, else
    `cache_dir() / "jax-compilation"` (`$FEDJAX_DATA` or `~/.cache/fedjax`)."""
    env = os.environ.get(ENV, "").strip()
    if env == "0":
        return None
    return Path(env).expanduser() if env else cache_dir() / "jax-compilation"


def enable_compilation_cache(path: Path | str | None = None,
                             min_compile_seconds: float = MIN_COMPILE_SECONDS) -> Path | None:
    """Points JAX's persistent compilation cache at `path` (default: `default_dir()`).

    Args:
      path: the cache directory (created if needed); None for `default_dir()`.
      min_compile_seconds: only compilations at least this long are stored.

    Returns:
      The directory used, or None when the cache is disabled (`FEDJAX_COMPILATION_CACHE=0`)
      or the directory cannot be created (the run then simply compiles as usual).

    Example:
      >>> enable_compilation_cache()          # ~/.cache/fedjax/jax-compilation
      >>> enable_compilation_cache("/scratch/jax-cache", min_compile_seconds=0.0)
    """
    path = default_dir() if path is None else Path(path).expanduser()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
