"""Blocks of the docs that code generates (`<!-- BEGIN generated: NAME -->` ...
`<!-- END generated: NAME -->`), checked by the tests; `FEDJAX_UPDATE_DOCS=1` rewrites them."""

import os
import re
from pathlib import Path


def block(path: Path, name: str) -> str:
    """The body of the generated block `name` of the page at `path`."""
    return _find(path.read_text(), name, path)[1]


def check(path: Path, name: str, want: str, rerun: str) -> None:
    """Asserts the block `name` of `path` is `want` (one blank line around it); with
    FEDJAX_UPDATE_DOCS set, writes it first. `rerun` is the pytest command to name."""
    text = path.read_text()
    begin, body, end = _find(text, name, path)
    want = "\n" + want + "\n"
    if os.environ.get("FEDJAX_UPDATE_DOCS") and body != want:
        path.write_text(text.replace(begin + body + end, begin + want + end))
        body = want
    assert body == want, (f"docs/{path.name} is stale; regenerate it with FEDJAX_UPDATE_DOCS=1 "
                          f"{rerun}")


def _find(text: str, name: str, path: Path) -> tuple[str, str, str]:
    m = re.search(rf"(<!-- BEGIN generated: {name}[^\n]*-->\n)(.*?)(<!-- END generated: "
                  rf"{name} -->)", text, re.DOTALL)
    assert m, f"docs/{path.name} lost its generated {name} block"
    return m.group(1), m.group(2), m.group(3)
