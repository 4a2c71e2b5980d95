"""Property-based bad input: mutated dataset files end in a clean error or a correct result.

Every case runs the real command (`fedjax data info` to read, `fedjax data convert` to write)
and asserts: exit code 0 or 2, no traceback, a one-line error on failure, and no partial
output file left behind. Case counts are printed (`pytest -s`).
"""

import json
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli.main import app
from fedjax_core.data import write_sqlite

runner = CliRunner()
COUNTS = {"sqlite": 0, "leaf": 0, "npz": 0}

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9), st.just(0)),
    st.tuples(st.just("append"), st.integers(0, 10**9), st.integers(1, 255)),
)


def mutate(data: bytes, m) -> bytes:
    kind, pos, value = m
    if not data:
        return data
    pos %= len(data)
    if kind == "flip":
        return data[:pos] + bytes([data[pos] ^ value]) + data[pos + 1:]
    if kind == "truncate":
        return data[:pos]
    return data + bytes([value]) * (pos % 64 + 1)


def check_clean(res, out: Path | None = None):
    assert res.exit_code in (0, 2), res.output
    assert "Traceback" not in res.output
    if res.exit_code == 2:
        assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1, res.output
        if out is not None:
            assert not out.exists() and not list(out.parent.glob(f"*{out.name}*tmp*"))


def sqlite_file(tmp: Path) -> bytes:
    path = tmp / "good.sqlite"
    rng = np.random.default_rng(0)
    write_sqlite(path, [(f"client{i}", {"x": rng.normal(size=(3 + i, 4)).astype(np.float32),
                                        "y": np.arange(3 + i, dtype=np.int32)})
                        for i in range(4)])
    return path.read_bytes()


SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(m=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_sqlite_files(tmp_path_factory, m):
    tmp = tmp_path_factory.mktemp("sq")
    data = sqlite_file(tmp)
    for one in m:
        data = mutate(data, one)
    path = tmp / "bad.sqlite"
    path.write_bytes(data)
    res = runner.invoke(app, ["data", "info", str(path)])
    check_clean(res)
    if res.exit_code == 0:  # undamaged where it mattered: the right answer
        assert "4 clients, 18 examples" in " ".join(res.output.split())
    COUNTS["sqlite"] += 1


@SETTINGS
@given(m=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_leaf_json(tmp_path_factory, m):
    tmp = tmp_path_factory.mktemp("leaf")
    folder = tmp / "train"
    folder.mkdir()
    doc = {"users": ["u1", "u2"], "num_samples": [2, 1],
           "user_data": {"u1": {"x": [[0.0] * 784, [1.0] * 784], "y": [3, 4]},
                         "u2": {"x": [[0.5] * 784], "y": [7]}}}
    data = json.dumps(doc).encode()
    for one in m:
        data = mutate(data, one)
    (folder / "part.json").write_bytes(data)
    res = runner.invoke(app, ["data", "info", str(folder)])
    check_clean(res)
    out = tmp / "out.sqlite"
    res = runner.invoke(app, ["data", "convert", str(folder), str(out)])
    check_clean(res, out)
    COUNTS["leaf"] += 1


@SETTINGS
@given(m=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_npz_partition_input(tmp_path_factory, m):
    tmp = tmp_path_factory.mktemp("npz")
    good = tmp / "good.npz"
    np.savez(good, x=np.zeros((40, 3), np.float32), y=np.arange(40, dtype=np.int32) % 4)
    data = good.read_bytes()
    for one in m:
        data = mutate(data, one)
    src = tmp / "bad.npz"
    src.write_bytes(data)
    out = tmp / "parts.sqlite"
    res = runner.invoke(app, ["data", "partition", str(src), str(out), "--clients", "4"])
    check_clean(res, out)
    COUNTS["npz"] += 1


def teardown_module():
    print(f"\nhypothesis cases run: {COUNTS}")
