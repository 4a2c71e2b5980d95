"""What every command shares: the consoles and the one-line handling of user mistakes."""

import functools

import typer
from rich.console import Console
from rich.markup import escape

from fedjax_api.errors import ConfigError

console = Console()
err_console = Console(stderr=True)


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def user_errors(fn):
    """Turns a `ConfigError` into one `error: ...` line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            print_error(str(e))
            raise typer.Exit(2) from None

    return wrapper
