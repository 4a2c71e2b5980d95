"""The `fedjax` process around its command: signals and warnings, each one line.

- Ctrl-C (SIGINT) or SIGTERM while a command starts (importing, loading the task) or
  outside the round loop ends the process with one line and exit code 130 (SIGINT) or 143
  (SIGTERM), no traceback: the first raises `KeyboardInterrupt`, so clean-up code runs
  (temporary files are removed); a second one, even while the process exits, ends it at
  once, without a traceback of an exit handler.
- In the round loop (`fedjax_api.loop`) the first SIGINT or SIGTERM finishes the round,
  checkpoints and exits 130 or 143 (`exit_code`); a second ends the process at once.
  SIGTERM is what a cluster scheduler sends to pre-empt a job: the run resumes with
  `fedjax resume RUN_DIR`.
- A warning of the library (a damaged checkpoint skipped, a resume under other versions)
  is one line: `warning: ...` on stderr.

`install()` runs first in `cli.entry.main` (the console script), before the heavy
imports, and again in `cli.main.main`.

Example:
  >>> from cli import process
  >>> process.install()
"""

import os
import signal
import sys
import warnings
from typing import Any

SIGNALLED: list[int] = []
"""The signals received outside the round loop (the first decides the exit code)."""


_UNRAISABLE = ("__del__", "_xla_gc_callback")
"""Functions in which Python ignores an exception (finalizers, JAX's gc callback): a signal
that lands in one ends the process at once rather than being lost."""


def _raise(signum: int, frame: Any) -> None:
    """The first signal raises `KeyboardInterrupt` (clean-up code runs: temporary files
    go); a second one, or one Python would ignore, exits at once with one line."""
    SIGNALLED.append(signum)
    if len(SIGNALLED) > 1 or (frame is not None and frame.f_code.co_name in _UNRAISABLE):
        exit_now()
    raise KeyboardInterrupt


def exit_now(say: bool = True) -> None:
    """Prints the one line (unless said already: not `say`) and ends the process at once
    by the signal itself (its default action: no exit handlers, nothing left to save
    outside the round loop; a shell sees 130 or 143)."""
    code = interrupted_code()
    try:
        sys.stdout.flush()
        if say:
            print(f"error: {aborted_line(code)}", file=sys.stderr, flush=True)
    finally:
        signum = code - 128
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def quit_on_signal() -> None:
    """From now on (the process is exiting, its one line printed) SIGINT and SIGTERM end it
    at once, without a traceback of an exit handler."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: exit_now(say=False))


def interrupted_code() -> int:
    """The exit code of a process ended by a signal outside the round loop: 128 + the
    signal (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (SIGNALLED[0] if SIGNALLED else signal.SIGINT)


def aborted_line(code: int) -> str:
    """The one line of a process ended by a signal outside the round loop."""
    what = "SIGTERM" if code == 128 + signal.SIGTERM else "Ctrl-C"
    return (f"aborted ({what}); run the command again (a run with a checkpoint continues "
            "with `fedjax resume RUN_DIR`)")


def exit_code(error: BaseException) -> int:
    """The exit code of a run that stopped with `error` (a `fedjax_api.loop.Interrupted`):
    3 at its time limit, 143 on SIGTERM, else 130 (Ctrl-C)."""
    from fedjax_api.loop import Terminated, TimeLimitReached

    if isinstance(error, TimeLimitReached):
        return 3
    return 143 if isinstance(error, Terminated) else 130


def after_command(code: int | None) -> int | None:
    """The exit code of a command that returned `code`: when a signal interrupted it outside
    the round loop (typer turns that `KeyboardInterrupt` into a silent exit 130), prints
    the one line and gives 130 or 143; a later signal ends the process at once."""
    if not SIGNALLED:
        return code
    quit_on_signal()
    code = interrupted_code()
    print(f"error: {aborted_line(code)}", file=sys.stderr, flush=True)
    return code


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, UserWarning):
        text = " ".join(str(message).split())
        print(f"warning: {text}", file=sys.stderr if file is None else file, flush=True)
    else:
        _default_show(message, category, filename, lineno, file, line)


_default_show = warnings.showwarning


def install() -> None:
    """SIGINT and SIGTERM raise `KeyboardInterrupt` once (a second exits at once, `_raise`);
    `UserWarning`s print as one line. Only in the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _raise)
    warnings.showwarning = _show_warning
