"""Resumable, verified, atomic HTTP downloads into the data cache (stdlib only).

A download streams into `DEST.partial`; an interrupted one is resumed with an HTTP
`Range` request by the next call; a finished one is checked (size, sha256), fsynced
and renamed over `DEST`, so `DEST` is either absent or complete.

Example:
  >>> from fedjax_api.datasets.download import cache_dir, download
  >>> download("https://example.org/f.sqlite", cache_dir() / "f.sqlite", sha256=None, size=None)
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, cast

from fedjax_api.errors import ConfigError
from fedjax_core import atomic
from fedjax_core.data import index_cache

try:  # POSIX: one process at a time writes a given .partial file.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

Progress = Callable[[int, int | None], None]

CHUNK_BYTES = 1 << 18
# Seconds before the first retry of a transient failure; doubled for each further one.
BACKOFF_S = 1.0
_USER_AGENT = "fedjax-sim (+https://github.com/google/fedjax datasets)"
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class DownloadError(ConfigError):
    """A download failed; the one-line message says why and what to do next."""


class _Transient(Exception):
    """A failure worth retrying (and resuming): network error, timeout, 5xx, cut stream."""


class _Discard(Exception):
    """The partial file can never become the right file: delete it, then report this."""


def cache_dir() -> Path:
    """The data cache: `$FEDJAX_DATA` if set, else `~/.cache/fedjax` (not created here)."""
    return index_cache.data_dir()


def partial_path(dest: Path) -> Path:
    """Where `download` streams `dest` before it is complete and verified."""
    dest = Path(dest)
    return dest.with_suffix(dest.suffix + ".partial")


def format_bytes(n: int | None) -> str:
    """A human size: `1.5 MB`."""
    if n is None:
        return "unknown size"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def download(url: str, dest: Path, *, sha256: str | None, size: int | None,
             progress: Progress | None = None, timeout: float = 30,
             retries: int = 3) -> Path:
    """Downloads `url` to `dest`, resuming `dest.partial` if an earlier call left one.

    Transient failures (connection errors, timeouts, a stream cut short, HTTP 408/429/5xx)
    are retried `retries` times with exponential backoff, each retry resuming where the
    last stopped. When they run out, the partial file is kept and the error says to re-run
    the same command to resume. A checksum or size mismatch deletes the partial file.

    Args:
      url: an http(s) URL.
      dest: the final path; its parent is created.
      sha256: expected hex digest, or None when unknown (not verified then).
      size: expected size in bytes, or None when unknown (the server's Content-Length
        is still checked).
      progress: called as `progress(done_bytes, total_bytes_or_None)` when the transfer
        starts and after every chunk.
      timeout: seconds to wait for the connection and for each read, so nothing hangs.
      retries: further attempts after the first one fails transiently.

    Returns:
      `dest`.

    Raises:
      DownloadError: one line naming the problem and what to do.
    """
    dest = Path(dest)
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise DownloadError(f"cannot download {url!r}: only http(s) URLs are supported")
    if sha256 is not None:
        sha256 = sha256.lower()
    part = partial_path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {str(dest.parent)!r} ({e.strerror or e}); "
                            "set FEDJAX_DATA to a writable directory") from None
    try:
        with _open_partial(part) as f:
            state = _Partial(f)
            try:
                for attempt in range(retries + 1):
                    try:
                        _transfer(url, state, size=size, progress=progress, timeout=timeout)
                        break
                    except _Transient as e:
                        if attempt == retries:
                            raise DownloadError(_interrupted(url, e, state.size, part)) from None
                        time.sleep(BACKOFF_S * 2 ** attempt)
                _verify(url, state, sha256=sha256, size=size)
                f.flush()
                os.fsync(f.fileno())
                os.replace(part, dest)  # POSIX: renaming while holding the lock is fine.
            except DownloadError:
                if state.size == 0:  # nothing worth resuming: leave no empty file behind
                    part.unlink(missing_ok=True)
                raise
            except OSError as e:
                raise DownloadError(f"cannot write {str(dest)!r} ({e.strerror or e}); "
                                    "free some disk space or set FEDJAX_DATA") from None
    except _Discard as e:
        part.unlink(missing_ok=True)
        raise DownloadError(str(e)) from None
    atomic.fsync_dir(dest.parent)
    return dest


def _interrupted(url: str, e: _Transient, done: int, part: Path) -> str:
    if done == 0:
        return f"download of {url} failed ({e}); re-run the same command to try again"
    return (f"download of {url} interrupted ({e}); kept {format_bytes(done)} in {str(part)!r}: "
            "re-run the same command to resume")


class _Partial:
    """The open `.partial` file with a running sha256 of its contents."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.hasher = hashlib.sha256()
        self.size = 0
        f.seek(0)
        while chunk := f.read(CHUNK_BYTES):
            self.hasher.update(chunk)
            self.size += len(chunk)

    def restart(self) -> None:
        self.f.truncate(0)
        self.f.seek(0)
        self.hasher = hashlib.sha256()
        self.size = 0

    def append(self, chunk: bytes) -> None:
        self.f.write(chunk)
        self.hasher.update(chunk)
        self.size += len(chunk)


@contextlib.contextmanager
def _open_partial(part: Path) -> Iterator[BinaryIO]:
    try:
        # appends; created if absent; kept if present; never through a planted link
        f = cast(BinaryIO, atomic.open_append(part, binary=True, create=True, readable=True))
    except OSError as e:
        raise DownloadError(f"cannot write {str(part)!r} ({e.strerror or e}); "
                            "set FEDJAX_DATA to a writable directory") from None
    with f:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise DownloadError(f"another process is downloading {str(part)!r}; "
                                    "wait for it to finish") from None
        yield f


def _transfer(url: str, state: _Partial, *, size: int | None, progress: Progress | None,
              timeout: float) -> None:
    """Appends the rest of `url` to the partial file; raises `_Transient` if cut short."""
    if size is not None and state.size > size:
        state.restart()  # longer than the file can be: not a prefix of it
    if size is not None and state.size == size and size > 0:
        return  # complete already (an earlier call was interrupted before the rename)
    response = _open(url, state, timeout=timeout)
    if response is None:
        return  # 416 for exactly our size: the partial file is the whole file
    with response:
        total = _reported_total(response, state)
        if size is not None and total is not None and total != size:
            raise _Discard(
                f"{url} is {total} bytes but {size} were expected; the published file "
                "has changed, so the catalog entry needs updating")
        expected = size if size is not None else total
        if progress is not None:
            progress(state.size, expected)
        while True:
            try:
                chunk = response.read1(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, ...
                raise _Transient(_reason(e)) from None
            if not chunk:
                break
            state.append(chunk)  # OSError (disk full): reported by `download`
            if progress is not None:
                progress(state.size, expected)
    if expected is not None and state.size < expected:
        raise _Transient(f"connection closed after {format_bytes(state.size)} "
                         f"of {format_bytes(expected)}")


def _open(url: str, state: _Partial, *, timeout: float):
    """Opens `url` from the partial file's end; None if the server says it is complete."""
    for _ in range(2):  # at most one restart from byte 0
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        if state.size:
            headers["Range"] = f"bytes={state.size}-"
        request = urllib.request.Request(url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            with e:
                if e.code == 416 and state.size:
                    full = _content_range(e.headers.get("Content-Range"))[1]
                    if full == state.size:
                        return None
                    state.restart()  # the partial file does not fit the server's file
                    continue
                if e.code in _RETRY_STATUSES:
                    raise _Transient(f"HTTP {e.code} {e.reason}") from None
                raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
        except http.client.InvalidURL as e:
            raise DownloadError(f"cannot download {url!r}: {e}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise _Transient(_reason(e)) from None
        status = response.status
        if status == 200:
            if state.size:
                state.restart()  # the server ignored Range: take the whole body
            return response
        if status == 206 and state.size:
            start = _content_range(response.headers.get("Content-Range"))[0]
            if start == state.size:
                return response
            response.close()
            state.restart()  # a range we did not ask for: start again
            continue
        response.close()
        raise DownloadError(f"download of {url} failed: unexpected HTTP {status} {response.reason}")
    raise _Transient("the server did not honour the resume request")


def _reported_total(response, state: _Partial) -> int | None:
    """The full file size the server reports, if it reports one."""
    if response.status == 206:
        full = _content_range(response.headers.get("Content-Range"))[1]
        if full is not None:
            return full
    length = response.headers.get("Content-Length")
    if length is not None and length.strip().isdigit():
        return state.size + int(length)
    return None


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, full size) from `Content-Range: bytes START-END/FULL` or `bytes */FULL`."""
    match = _CONTENT_RANGE.match(value.strip()) if value else None
    if not match:
        return None, None
    start, full = match.groups()
    return (int(start) if start else None, int(full) if full != "*" else None)


def _verify(url: str, state: _Partial, *, sha256: str | None, size: int | None) -> None:
    """Checks the finished partial file; `_Discard` (delete it) on a mismatch."""
    name = Path(urllib.parse.urlsplit(url).path).name or url
    if size is not None and state.size != size:
        raise _Discard(f"size mismatch for {name}: expected {size} bytes, got {state.size}; "
                            "deleted the download, re-run to try again")
    if sha256 is not None:
        got = state.hasher.hexdigest()
        if got != sha256:
            raise _Discard(f"checksum mismatch for {name}: expected sha256 {sha256}, "
                                f"got {got}; deleted the download, re-run to try again")


def _reason(e: BaseException) -> str:
    """One line for a network exception."""
    if isinstance(e, urllib.error.URLError):
        if not isinstance(e.reason, BaseException):
            return " ".join(str(e.reason).split())
        e = e.reason
    if isinstance(e, TimeoutError):
        return "timed out"
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return " ".join(str(text).split())
