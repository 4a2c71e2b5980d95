"""What every command shares: the consoles and the one-line handling of user mistakes and of
the failures a user can meet (a missing file, a full disk, a corrupt dataset, too little
memory): `user_errors` prints each as one line `error: ...` and exits 2. Anything else is a
bug and keeps its traceback."""

import errno
import functools
import sqlite3

import typer
from rich.console import Console
from rich.markup import escape

from fedjax_api.errors import ConfigError
from fedjax_core.data.errors import DataFormatError

console = Console()
err_console = Console(stderr=True)

SIZES = "--batch-size, --clients-per-round, --chunk-size, --epochs or --max-steps"
"""The options that size a run's memory, named when memory runs out."""

_OS_FIXES = {
    errno.ENOENT: "no such file or directory; check the path",
    errno.EISDIR: "is a directory, not a file; give a file's path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; check the path",
    errno.EACCES: "permission denied; choose a place you may use (e.g. another --out) or "
                  "change its permissions",
    errno.EPERM: "operation not permitted; choose another place or change its permissions",
    errno.ENOSPC: "no space left on the device (disk full); free space or write to another "
                  "disk (--out)",
    errno.EDQUOT: "disk quota exceeded; free space or write to another disk (--out)",
    errno.EROFS: "read-only file system; write to another place (--out)",
    errno.EEXIST: "already exists; choose another name or remove it",
    errno.ENAMETOOLONG: "file name too long; choose a shorter path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
    errno.ENFILE: "too many open files in the system; close some programs",
}

_NUMPY_SIZE = ("array is too big", "Maximum allowed size exceeded", "Maximum allowed dimension")
"""The starts of numpy's ValueErrors for an allocation too large to describe."""


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _os_message(e: OSError) -> str:
    path = e.filename if e.filename is not None else None
    fix = _OS_FIXES.get(e.errno or 0)
    if fix is None or (path is None and e.strerror is None):  # our own OSErrors say it all
        text = e.strerror or str(e)
        return f"{path}: {text}" if path is not None and str(path) not in text else text
    where = f"{path}: " if path is not None else ""
    if e.filename2 is not None:
        where = f"{path} -> {e.filename2}: "
    return f"{where}{fix}"


def describe(e: BaseException) -> str | None:
    """The one line `user_errors` prints for an expected failure `e`, or None for a bug
    (which keeps its traceback).

    Example:
      >>> describe(FileNotFoundError(2, "No such file or directory", "data.sqlite"))
      'data.sqlite: no such file or directory; check the path'
    """
    if isinstance(e, (ConfigError, DataFormatError)):
        return str(e)
    if isinstance(e, OSError):
        return _os_message(e)
    if isinstance(e, sqlite3.Error):
        return (f"SQLite: {e}; check that the file is a whole FedJAX SQLite file (download or "
                "convert it again) and that its folder is writable")
    if isinstance(e, MemoryError):
        return (f"out of memory{f' ({e})' if str(e) else ''}: the run is too large for this "
                f"machine; lower {SIZES}")
    if isinstance(e, OverflowError):
        return (f"a number is too large ({e}): lower the option that gave it (a seed fits in "
                f"32 bits; {SIZES} must fit in memory)")
    if isinstance(e, ValueError) and str(e).startswith(_NUMPY_SIZE):
        return f"an array would be too large ({e}); lower {SIZES}"
    if type(e).__name__ in ("XlaRuntimeError", "JaxRuntimeError") \
            and "RESOURCE_EXHAUSTED" in str(e):
        return (f"out of device memory ({str(e).splitlines()[0][:200]}); lower --chunk-size "
                "(clients trained together), --batch-size or --clients-per-round")
    return None


def user_errors(fn):
    """Turns an expected failure (`describe`: a `ConfigError`, a `DataFormatError`, an
    `OSError` such as a missing file or a full disk, an SQLite error, memory or overflow
    from absurd sizes) into one `error: ...` line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataFormatError, OSError, sqlite3.Error, MemoryError,
                OverflowError, ValueError, RuntimeError) as e:
            message = describe(e)
            if message is None:
                raise
            print_error(message.replace("\r", " ").replace("\n", " "))
            raise typer.Exit(2) from None

    return wrapper
