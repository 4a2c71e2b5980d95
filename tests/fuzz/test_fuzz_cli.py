"""Fuzz: `fedjax run` option values and TOML config files end in a start or one error line.

The command is run in-process up to the point where training would start: `cli.main._train`
is replaced by a stand-in that builds the experiment (`Experiment.from_config`: the task, the
algorithm, the aggregator and every check made before the first round) and stops there, so a
case takes milliseconds and never trains. The launch options (`--coordinator`,
`--num-processes`, `--process-id`) are left out: they connect to other processes.

Where these tests fail, the defect is in the option and config handling (cli/common.py's error
mapping, option ranges), not in the data readers; the failing inputs are listed in the report
of the branch that added this file.
"""

import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cli import main as cli_main
from fedjax_api import config
from tests.fedjax_api.tiny_task import NAME, register
from tests.fuzz import FUZZ, assert_clean, mutate, mutations, run_cli, snapshot

LAUNCH = {"--coordinator", "--num-processes", "--process-id"}


def _run_options() -> dict[str, bool]:
    """`{--flag: is a boolean flag}` of `fedjax run`, from the command itself."""
    import typer.main

    command = typer.main.get_command(cli_main.app).commands["run"]  # type: ignore[attr-defined]
    found = {}
    for p in command.params:
        for opt in getattr(p, "opts", []):
            if opt.startswith("--") and opt not in LAUNCH and opt not in ("--config", "--out"):
                found[opt] = bool(getattr(p, "is_flag", False))
    return found


OPTIONS = _run_options()
KEYS = sorted(config.OPTIONS.by_key)

number_text = st.one_of(
    st.integers(-2**70, 2**70).map(str),
    st.sampled_from(["0", "-1", "1", "2", "3", "1e23", "1e-300", "nan", "inf", "-inf", "0.5",
                     "2147483648", "4294967296", "18446744073709551616", "1_000", "0x10", ""]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
word_text = st.one_of(
    st.sampled_from(["fedavg", "fedadam", "krum", "mean", "uniform", "true", "false", "yes",
                     "rdp", "pld", "abc", "-", "--rounds", "proximal_weight=abc", "x=1",
                     "clip=-1", "f=100", "=", "a=b=c", "\x00"]),
    st.text(max_size=12),
)
value_text = st.one_of(number_text, word_text)


@pytest.fixture
def stop_before_training(monkeypatch):
    """`_train` builds the experiment (every check before the first round) and returns."""
    from fedjax_api.experiment import Experiment

    register()
    built = []

    def build_only(cfg, resuming=False):
        built.append(Experiment.from_config(cfg, resuming=resuming))

    monkeypatch.setattr(cli_main, "_train", build_only)
    return built


def _case(tmp_path_factory, args: list[str]) -> None:
    root = tmp_path_factory.mktemp("cli")
    out = root / "out"
    before = snapshot(root, skip=out)
    res = run_cli("run", NAME, "--out", str(out), *args, cwd=root)
    assert_clean(res)
    assert snapshot(root, skip=out) == before, res


@FUZZ
@given(picks=st.lists(st.tuples(st.sampled_from(sorted(OPTIONS)), value_text),
                      min_size=1, max_size=3))
def test_run_option_values(stop_before_training, tmp_path_factory, picks):
    args = []
    for flag, value in picks:
        args += [flag] if OPTIONS[flag] else [flag, value]
    _case(tmp_path_factory, args)


@FUZZ
@given(sets=st.lists(st.tuples(st.sampled_from(KEYS + ["nope", "run.nope", "client..lr", ""]),
                               value_text), min_size=1, max_size=3))
def test_set_overrides(stop_before_training, tmp_path_factory, sets):
    args = []
    for key, value in sets:
        args += ["--set", f"{key}={value}"]
    _case(tmp_path_factory, args)


toml_scalar = st.one_of(
    st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.booleans(),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=8),  # TOML holds no surrogates
    st.lists(st.integers(-3, 3), max_size=2), st.sampled_from(["fedavg", "krum", "mean"]))


def _toml(doc: dict) -> str:
    """A TOML text of `{dotted key: value}` (what `tomllib` reads back), by hand."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(v), repr(v))
        if isinstance(v, str):
            return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}"
                                 for c in v) + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)
    return "".join(f"{'.'.join(repr(p) if not p.isidentifier() else p for p in k.split('.'))}"
                   f" = {value(v)}\n" for k, v in doc.items())


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(KEYS[1:] + ["nope", "run.nope"]), toml_scalar,
                           min_size=1, max_size=4),
       ops=st.one_of(st.none(), mutations))
def test_toml_config_files(stop_before_training, tmp_path_factory, doc, ops):
    root = tmp_path_factory.mktemp("toml")
    path = root / "exp.toml"
    text = _toml(doc).encode()
    if ops is None:
        tomllib.loads(text.decode())  # the generator writes valid TOML
    else:
        text = mutate(text, ops)
    path.write_bytes(text)
    out = root / "out"
    before = snapshot(root, skip=out)
    res = run_cli("run", NAME, "--config", str(path), "--out", str(out), cwd=root)
    assert_clean(res)
    assert snapshot(root, skip=out) == before, res


def test_the_stand_in_builds_a_valid_run(stop_before_training, tmp_path):
    """The stand-in is reached by a valid command line (so the fuzz cases above reach it)."""
    res = run_cli("run", NAME, "--out", str(tmp_path / "out"), "--rounds", "2", cwd=tmp_path)
    assert res.code == 0, res
    assert len(stop_before_training) == 1
    assert stop_before_training[0].rounds == 2


def test_cases_are_not_all_refused(stop_before_training, tmp_path):
    """A sample of generated values reaches the stand-in: the cases test more than parsing."""
    for args in (["--seed", "7"], ["--set", "client.lr=0.1"], ["--clients-per-round", "2"]):
        res = run_cli("run", NAME, "--out", str(tmp_path / "o"), *args, cwd=tmp_path)
        assert res.code == 0, (args, res)
    assert len(stop_before_training) == 3
    assert Path(tmp_path).is_dir()
