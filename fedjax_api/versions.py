"""What wrote a run: the installed fedjax-sim, the git commit of a clone, and the libraries.

config.json, a sweep's sweep.json and every checkpoint manifest record `versions()`.
"""

import functools
import importlib.metadata
import subprocess
from pathlib import Path

import jax
import numpy as np
import optax

ROOT = Path(__file__).resolve().parents[1]
"""The folder holding the `fedjax_api` package: a clone's root when run from a clone."""


def package_version() -> str | None:
    """The installed fedjax-sim's version (`importlib.metadata`), or None when the package
    is not installed (e.g. imported from a clone on `PYTHONPATH`)."""
    try:
        return importlib.metadata.version("fedjax-sim")
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def git_commit(root: Path = ROOT) -> str | None:
    """The commit checked out in `root` when it is the top of a git clone (or worktree),
    with "-dirty" when tracked files differ from it; None otherwise (an installed copy, no
    git)."""
    if not (root / ".git").exists():
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return None
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _jaxlib_version() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """`{"fedjax_sim", "git_commit", "jax", "jaxlib", "optax", "numpy"}` of this process.

    Example:
      >>> versions()
      {'fedjax_sim': '0.1.0', 'git_commit': '1b5d73b...', 'jax': '0.10.2', 'jaxlib': ...}
    """
    return {"fedjax_sim": package_version(), "git_commit": git_commit(), "jax": jax.__version__,
            "jaxlib": _jaxlib_version(), "optax": optax.__version__, "numpy": np.__version__}
