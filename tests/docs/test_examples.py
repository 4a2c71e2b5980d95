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
    "custom_algorithm.py": [
        ('TASK = "shakespeare-plays"', f'TASK = "{tiny_task.NAME}"'),
        ("ROUNDS = 20", "ROUNDS = 2"),
        ("CLIENTS_PER_ROUND = 10", "CLIENTS_PER_ROUND = 3"),
    ],
}


def shrink(name: str, source: str) -> str:
    """`source` with every replacement of `name` made; fails if one does not apply."""
    for old, new in REPLACEMENTS[name]:
        source, count = re.subn(rf"^{re.escape(old)}$", lambda _: new, source, flags=re.M)
        assert count == 1, (f"{name}: expected the line {old!r} exactly once, found it {count} "
                            "times; update REPLACEMENTS in tests/docs/test_examples.py")
    return source


def run_example(name: str, main: bool = True) -> dict:
    path = EXAMPLES / name
    source = shrink(name, path.read_text())
    namespace = {"__name__": "__main__" if main else "example", "__file__": str(path)}
    exec(compile(source, str(path), "exec"), namespace)
    return namespace


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


def test_custom_algorithm_tutorial_is_short_and_correct(capsys):
    source = (EXAMPLES / "custom_algorithm.py").read_text()
    body = source.split("# --- the algorithm ---")[1].split("# --- end of the algorithm ---")[0]
    lines = [ln for ln in body.splitlines() if ln.strip()]
    assert len(lines) < 40, f"the tutorial's algorithm takes {len(lines)} lines"
    run_example("custom_algorithm.py")
    out = capsys.readouterr().out
    assert "round 2: train loss" in out and "eta_g" in out and "'accuracy'" in out
    # One round of FedExP is FedAvg's mean delta scaled by eta_g >= 1.
    import jax
    import numpy as np
    import optax
    from fedjax_api import tasks
    from fedjax_core.algorithms import fedavg
    from fedjax_core.algorithms.base import jit_round
    ns = run_example("custom_algorithm.py", main=False)
    task = tasks.get(tiny_task.NAME)
    params = task.model.init(jax.random.key(0))
    cohort = task.train.sample(4, 0)
    exp_state, m = jit_round(ns["fedexp"](optax.sgd(0.5)), task.model)(
        ns["FedExPState"](params), cohort, jax.random.key(1))
    avg = fedavg(optax.sgd(0.5), optax.sgd(1.0))
    avg_state, _ = jit_round(avg, task.model)(avg.init(params), cohort, jax.random.key(1))
    eta = float(m["fedexp/eta_g"])
    assert eta >= 1.0
    jax.tree.map(lambda w, a, e: np.testing.assert_allclose(w - eta * (w - a), e, atol=1e-5),
                 params, avg_state.params, exp_state.params)
