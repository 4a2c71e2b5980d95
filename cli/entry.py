"""The `fedjax` console script: handles Ctrl-C and SIGTERM (`cli.process`) before the
heavy imports (JAX, the tasks), so that even an interrupt while they load is one line.

Example:
  $ fedjax run shakespeare-plays --rounds 20
"""

import sys

from cli import process


def main() -> None:
    """Installs the signal handlers, then runs `cli.main.main`; Ctrl-C (or SIGTERM) while
    importing exits 130 (143) with one line."""
    process.install()
    try:
        from cli.main import main as run_main
    except KeyboardInterrupt:
        process.quit_on_signal()
        code = process.interrupted_code()
        print(f"error: {process.aborted_line(code)}", file=sys.stderr)
        raise SystemExit(code) from None
    run_main()
