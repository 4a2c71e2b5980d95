"""`fedjax export RUN_DIR --format safetensors|orbax|npz OUT`: a run's global params with a
JSON sidecar (`fedjax_api.export`). Register it on the main app with `register(app)`."""

from pathlib import Path
from typing import Annotated

import typer

from cli.common import console, user_errors
from fedjax_api import export as api


@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (the --out of `fedjax run`).",
                                            show_default=False)],
    out: Annotated[Path, typer.Argument(
        help="The file (safetensors, npz) or folder (orbax) to write; the sidecar is "
             "OUT.json.", show_default=False)],
    format: Annotated[str, typer.Option(
        "--format", help=f"One of: {', '.join(api.FORMATS)}.")] = "safetensors",
    best: Annotated[str | None, typer.Option(
        metavar="METRIC", help="Export the kept checkpoint whose evaluation has the best "
                               "METRIC (e.g. test/accuracy; lowest for a loss) instead of "
                               "the final one.")] = None,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Export the final (or best) global params of a run, with a JSON sidecar (model, task,
    round, metrics); `fedjax_api.export.load(OUT)` reads them back."""
    info = api.export(run_dir, out, format, best=best, force=force)
    console.print(f"wrote {out} ({format}, round {info['round']}, {len(info['keys'])} arrays) "
                  f"and {out}.json", highlight=False)


def register(main_app: typer.Typer) -> None:
    """Adds `fedjax export` to the main app."""
    main_app.command("export")(export)
