"""Fuzz suite (hypothesis): random mutations of valid inputs end in exit 0 or one error line.

Every case runs a real entry point in-process (`cli.main.main` with `sys.argv`, or a loader
wrapped in the CLI's own error mapping) and asserts: exit code 0 or 2, at most one `error:`
line, no traceback, and no file outside the command's output touched.

Profiles (`FEDJAX_FUZZ`): unset or `small`, the default of `make test` (the whole suite in
well under 2 minutes on 2 cores); `long`, many more cases per test, for a release or after a
parser changes (`FEDJAX_FUZZ=long pytest tests/fuzz`). Cases are derandomized (the same
cases each run) unless `FEDJAX_FUZZ_SEED` gives a seed; no example database is written.
"""

import contextlib
import hashlib
import io
import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

_COMMON = dict(deadline=None, database=None, print_blob=True,
               derandomize="FEDJAX_FUZZ_SEED" not in os.environ,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                      HealthCheck.filter_too_much])
settings.register_profile("fuzz-small", max_examples=25, **_COMMON)
settings.register_profile("fuzz-long", max_examples=1000, **_COMMON)
PROFILE = "fuzz-long" if os.environ.get("FEDJAX_FUZZ", "small") == "long" else "fuzz-small"
FUZZ = settings(settings.get_profile(PROFILE))
"""The settings of every fuzz test: the profile `FEDJAX_FUZZ` selects."""


def scaled(n: int) -> settings:
    """FUZZ with `n` cases in the small profile (a slow entry point) and 40x that in long."""
    return settings(FUZZ, max_examples=n if PROFILE == "fuzz-small" else 40 * n)


# ----------------------------------------------------------------------------- byte mutations

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**31), st.integers(1, 255)),
    st.tuples(st.just("bit"), st.integers(0, 2**31), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 2**31), st.just(0)),
    st.tuples(st.just("delete"), st.integers(0, 2**31), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.integers(0, 2**31), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("zero"), st.integers(0, 2**31), st.integers(1, 512)),
)
mutations = st.lists(mutation, min_size=1, max_size=4)


def mutate(data: bytes, ops) -> bytes:
    """`data` after random byte flips, bit flips, truncations, deletions, insertions, zeroing."""
    for kind, pos, arg in ops:
        if not data:
            return data
        pos %= len(data)
        if kind == "flip":
            data = data[:pos] + bytes([data[pos] ^ arg]) + data[pos + 1:]
        elif kind == "bit":
            data = data[:pos] + bytes([data[pos] ^ (1 << arg)]) + data[pos + 1:]
        elif kind == "truncate":
            data = data[:pos]
        elif kind == "delete":
            data = data[:pos] + data[pos + arg:]
        elif kind == "insert":
            data = data[:pos] + arg + data[pos:]
        else:
            data = data[:pos] + bytes(min(arg, len(data) - pos)) + data[pos + arg:]
    return data


# ----------------------------------------------------------------------------- running commands

class Outcome:
    """What one command did: its exit code and its stdout and stderr."""

    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def errors(self) -> list[str]:
        return [ln for ln in (self.out + self.err).splitlines() if ln.startswith("error:")]

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def run_cli(*args: str, cwd: Path | None = None) -> Outcome:
    """`fedjax ARGS` in this process, as the console script runs it (`cli.main.main`).

    An exception escaping `main` is a traceback the user would see: it fails the test with the
    arguments that caused it.
    """
    from cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["fedjax", *args]
    code = None
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli_main.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 - the point: any escaping exception is a defect
        raise AssertionError(f"`fedjax {' '.join(args)}` raised {type(e).__name__}: {e}\n"
                             f"--- stdout\n{out.getvalue()}\n--- stderr\n{err.getvalue()}") from e
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return Outcome(0 if code is None else code, out.getvalue(), err.getvalue())


def assert_clean(res: Outcome) -> None:
    """Exit 0 or 2, no traceback, at most one `error:` line (exactly one on exit 2)."""
    assert res.code in (0, 2), res
    assert "Traceback" not in res.out + res.err, res
    assert len(res.errors) <= 1, res
    if res.code == 2:
        assert len(res.errors) == 1, res
        assert not res.errors[0].rstrip().endswith("error:"), res  # never an empty message


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int, str]]:
    """`{relative path: (mtime_ns, size, sha256)}` of every file and folder under `root`
    except under `skip` (the command's output)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if skip is not None and (here == skip or skip in here.parents):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = here / name
            if skip is not None and p == skip:
                continue
            st_ = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            state[str(p.relative_to(root))] = (st_.st_mtime_ns, st_.st_size, digest)
    return state
