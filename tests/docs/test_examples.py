"""The scripts under docs/examples run against the current API.

Each script is executed in-process with its module-level constants swapped for the tiny
test task, so a renamed function or argument fails here instead of in a reader's hands.
"""

import re
from pathlib import Path

import pytest

from tests.fedjax_api import tiny_task

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"

# script -> [(a whole line that must occur exactly once, its replacement)]
REPLACEMENTS = {
    "fedavg_shakespeare.py": [
        ('TASK = "shakespeare-plays"', f'TASK = "{tiny_task.NAME}"'),
        ("ROUNDS = 300", "ROUNDS = 2"),
        ("CLIENTS_PER_ROUND = 10", "CLIENTS_PER_ROUND = 3"),  # the tiny task has 6 clients
    ],
}


def shrink(name: str, source: str) -> str:
    """`source` with every replacement of `name` made; fails if one does not apply."""
    for old, new in REPLACEMENTS[name]:
        source, count = re.subn(rf"^{re.escape(old)}$", lambda _: new, source, flags=re.M)
        assert count == 1, (f"{name}: expected the line {old!r} exactly once, found it {count} "
                            "times; update REPLACEMENTS in tests/docs/test_examples.py")
    return source


def run_example(name: str) -> None:
    path = EXAMPLES / name
    source = shrink(name, path.read_text())
    exec(compile(source, str(path), "exec"), {"__name__": "__main__", "__file__": str(path)})


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(REPLACEMENTS)


def test_fedavg_shakespeare_runs(capsys):
    run_example("fedavg_shakespeare.py")
    out = capsys.readouterr().out
    assert "round 1: train loss" in out
    assert "test after 2 rounds:" in out
    assert "'accuracy'" in out


def test_shrink_fails_when_a_replacement_is_missing():
    with pytest.raises(AssertionError, match="exactly once"):
        shrink("fedavg_shakespeare.py", 'TASK = "other"\nROUNDS = 300\nCLIENTS_PER_ROUND = 10\n')
    with pytest.raises(AssertionError, match="exactly once"):
        shrink("fedavg_shakespeare.py", 'TASK = "shakespeare-plays"\nROUNDS = 3000\n')
