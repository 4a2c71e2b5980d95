"""No module reaches into another module's private names.

A name starting with one underscore is private to the module that defines it. This test
reads every module of the project's packages and fails on:

- `from fedjax_x.y import _name` (or `import fedjax_x._y`) of a project module;
- `thing._name` or `getattr(thing, "_name")` where `_name` is defined nowhere in the module
  that uses it (not as a function, class, variable, argument or attribute it assigns), so
  it can only be another module's.

Dunders and the NamedTuple API (`_replace`, `_asdict`, `_fields`, `_make`,
`_field_defaults`) are public.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedjax_core", "fedjax_api", "cli", "benchmarks")
PUBLIC = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) \
        and name not in PUBLIC


def defined_names(tree: ast.AST) -> set[str]:
    """Every name a module binds: functions, classes, variables, arguments, the attributes
    it assigns (`self._x = ...`), import aliases."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    return names


def violations(path: Path) -> list[str]:
    """`path:line: what` for every private name of another module that `path` uses."""
    source = path.read_text()
    tree = ast.parse(source, str(path))
    own = defined_names(tree) - {a.asname or a.name for n in ast.walk(tree)
                                 if isinstance(n, ast.ImportFrom) for a in n.names}
    found = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            first_party = node.level > 0 or module.split(".")[0] in PACKAGES
            for alias in node.names:
                if first_party and (is_private(alias.name) or
                                    any(is_private(p) for p in module.split("."))):
                    flag(node, f"imports {alias.name} from {module or '.'}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in PACKAGES and any(is_private(p) for p in parts):
                    flag(node, f"imports {alias.name}")
        elif (isinstance(node, ast.Attribute) and is_private(node.attr)
              and node.attr not in own) or (
              isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and is_private(node.args[1].value) and node.args[1].value not in own):
            flag(node, f"uses {ast.unparse(node)}")
    return found


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_no_module_uses_another_modules_private_names():
    assert len(modules()) > 50
    found = [v for path in modules() for v in violations(path)]
    assert not found, "private names of other modules in use:\n" + "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("from fedjax_api.experiment import Experiment, _versions\n", "imports _versions"),
    ("from . import _helpers\n", "imports _helpers"),
    ("import fedjax_core._impl\n", "imports fedjax_core._impl"),
    ("def f(exp):\n    return exp._eval_record(1)\n", "uses exp._eval_record"),
    ("def f(exp):\n    return getattr(exp, '_sample')\n", "uses getattr(exp, '_sample')"),
])
def test_the_check_finds_each_kind_of_reach(source, expected):
    path = ROOT / "fedjax_api" / "_probe_for_test.py"
    try:
        path.write_text(source)
        found = violations(path)
    finally:
        path.unlink()
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize("source", [
    ("class A:\n    def __init__(self):\n        self._x = 1\n    def f(self, o):\n"
     "        return o._x + self._x\n"),
    "def _helper():\n    pass\n\ndef f(m):\n    return m._helper\n",
    "def f(p):\n    return p._replace(a=1)._asdict(), p.__class__\n",
    "from jax._src import core\n",
])
def test_the_check_allows_own_and_public_names(source):
    path = ROOT / "fedjax_api" / "_probe_for_test.py"
    try:
        path.write_text(source)
        assert violations(path) == []
    finally:
        path.unlink()
