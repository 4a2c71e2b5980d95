"""Every file fedjax-sim writes goes through here: whole, in place, and never through a link.

The one home of the project's file writes (the core's SQLite writer, the facade's run
directories, checkpoints, plots, downloads, and the CLI's outputs all call it):

- `replace(path)` / `write_bytes` / `write_text`: a new version of `path`, written to a
  temporary file of a random name beside it (`.NAME.tmp-PID-RANDOM`, created with
  `O_CREAT | O_EXCL | O_NOFOLLOW`, so it is always a new file of this process), flushed,
  fsynced, renamed over `path` with `os.replace` and made durable by an fsync of the
  folder. A reader sees the old file or the new one, never half of one. A symbolic link
  planted at `path` is replaced by the file, its target left untouched (a rename replaces
  the directory entry; it does not follow it).
- `create(path)`: a new file that must not exist yet (temporary files, probes).
- `open_append(path)`: appends to a regular file the caller made (`metrics.jsonl`, the
  CSVs), opened with `O_APPEND | O_NOFOLLOW`: a link planted there is refused, not followed.
- `make_dir(path, root)`: creates `path` below `root`, refusing a component that is a link.

Files get mode 0o666 less the umask, as `open()` gives them (0o644 under the usual 022).

Example:
  >>> from fedjax_core import atomic
  >>> atomic.write_text("runs/x/config.json", "{}\\n")
  >>> with atomic.replace("runs/x/plot.png") as f:
  ...     figure.savefig(f, format="png")
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

FILE_MODE = 0o666
"""Mode of a new file before the umask (as `open()`)."""

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class LinkRefused(OSError):
    """A file or folder to write is a symbolic link (planted, not made by fedjax-sim)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(errno.ELOOP, "is a symbolic link; fedjax-sim never writes through "
                                      "a link: remove it", os.fspath(path))

    def __str__(self) -> str:
        return f"{self.filename!r} {self.strerror}"


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside `path`: `.NAME.tmp-PID-RANDOM` (64 random bits).

    Example:
      >>> temp_path("runs/x/config.json")
      PosixPath('runs/x/.config.json.tmp-4242-1f2e3d4c5b6a7988')
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}")


def _refuse_link(path: str | os.PathLike, e: OSError) -> OSError:
    """`LinkRefused` when `e` came from O_NOFOLLOW meeting a link at `path`, else `e`."""
    if e.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
        return LinkRefused(path)
    return e


def create(path: str | os.PathLike, binary: bool = True, **text: Any) -> IO[Any]:
    """Opens a NEW file at `path` for writing (`O_CREAT | O_EXCL | O_NOFOLLOW`): fails with
    `FileExistsError` if anything, a link included, is there already.

    Args:
      path: the file to create.
      binary: a binary file (else text; `text` holds `open`'s `encoding`, `newline`).

    Returns:
      The open file object.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, FILE_MODE)
    return os.fdopen(fd, "wb" if binary else "w", **text)


def fsync_dir(path: str | os.PathLike) -> None:
    """Makes renames in the folder `path` durable (best effort: a no-op where folders cannot
    be opened or synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replace(path: str | os.PathLike, binary: bool = True, **text: Any) -> Iterator[IO[Any]]:
    """Writes a new version of `path`: yields a new temporary file beside it; when the block
    ends without an error, flushes and fsyncs it, renames it over `path` and fsyncs the
    folder. On an error the temporary file is removed and `path` is untouched.

    Args:
      path: the file to (re)write; a link there is replaced, not followed.
      binary: a binary file (else text; `text` holds `open`'s `encoding`, `newline`).

    Example:
      >>> with replace("out/plot.png") as f:
      ...     fig.savefig(f, format="png")
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with create(tmp, binary, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replaces `path` with `data` atomically (`replace`)."""
    with replace(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replaces `path` with `text` atomically (`replace`; newlines written as given)."""
    with replace(path, binary=False, encoding=encoding, newline="") as f:
        f.write(text)


def open_append(path: str | os.PathLike, binary: bool = False, *, create: bool = False,
                readable: bool = False, **text: Any) -> IO[Any]:
    """Opens the regular file `path` to append (`O_APPEND | O_NOFOLLOW`): a link there
    raises `LinkRefused`, something else than a regular file `OSError`.

    Args:
      path: the file.
      binary: a binary file (else text; `text` holds `open`'s `encoding`, `newline`).
      create: create it if absent (a resumable download's `.partial`); else it must exist
        (a file the caller made, e.g. `metrics.jsonl`).
      readable: also open it for reading (`"a+"`).

    Example:
      >>> with open_append("runs/x/metrics.jsonl", encoding="utf-8") as f:
      ...     f.write(line)
    """
    flags = (os.O_RDWR if readable else os.O_WRONLY) | os.O_APPEND | _NOFOLLOW | _CLOEXEC
    try:
        fd = os.open(path, flags | (os.O_CREAT if create else 0), FILE_MODE)
    except OSError as e:
        raise _refuse_link(path, e) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "is not a regular file", os.fspath(path))
    return os.fdopen(fd, ("a+" if readable else "a") + ("b" if binary else ""), **text)


def open_lock(path: str | os.PathLike) -> int:
    """A read-write descriptor of the lock file `path`, created if absent (mode 0o666 less
    the umask), never through a link (`LinkRefused`)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, FILE_MODE)
    except OSError as e:
        raise _refuse_link(path, e) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "is not a regular file", os.fspath(path))
    return fd


def make_dir(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Creates the folder `path` (and its parents); every component below `root` (the
    run directory, which may itself be a link the user chose) must be a real folder, not a
    link (`LinkRefused`).

    Example:
      >>> make_dir("runs/x/checkpoints", root="runs/x")
      PosixPath('runs/x/checkpoints')
    """
    path = Path(path)
    if root is None:
        path.mkdir(parents=True, exist_ok=True)
        return path
    part = Path(root)
    part.mkdir(parents=True, exist_ok=True)
    for name in path.relative_to(part).parts:
        part = part / name
        with contextlib.suppress(FileExistsError):
            part.mkdir()
        if part.is_symlink():
            raise LinkRefused(part)
    return path
