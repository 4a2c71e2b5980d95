"""Imports point one way: cli -> fedjax_api -> fedjax_core."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "fedjax_core": {"attrs", "typer", "rich", "fedjax_api", "cli"},
    "fedjax_api": {"cli", "typer"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources found under {package}"
    bad = {str(f.relative_to(ROOT)): sorted(imported_modules(f) & FORBIDDEN[package]) for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_checker_sees_violations(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import attrs\nfrom typer import Typer\nfrom . import x\n")
    assert imported_modules(f) == {"attrs", "typer"}
