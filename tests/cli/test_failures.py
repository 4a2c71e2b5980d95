"""Every expected failure is one line `error: ...` and exit 2 (issue 15): OS errors name the
path and the fix, data-format and SQLite errors the file, absurd sizes the option; a bug
keeps its traceback. Numeric options have ranges; flags take no value."""

import errno
import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from cli.common import describe, user_errors
from cli.main import app
from fedjax_api import config
from fedjax_api.errors import ConfigError
from fedjax_core.data.errors import DataFormatError
from tests.fedjax_api.tiny_task import NAME

runner = CliRunner()


@pytest.mark.parametrize("error, line", [
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/data.sqlite"),
     "/x/data.sqlite: no such file or directory; check the path"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/x"),
     "/x: is a directory, not a file; give a file's path"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/out"),
     "/root/out: permission denied; choose a place you may use (e.g. another --out) or "
     "change its permissions"),
    (OSError(errno.ENOSPC, "No space left on device", "/mnt/run/metrics.jsonl"),
     "/mnt/run/metrics.jsonl: no space left on the device (disk full); free space or write "
     "to another disk (--out)"),
    (OSError(errno.ENOSPC, "No space left on device"),
     "no space left on the device (disk full); free space or write to another disk (--out)"),
    (FileNotFoundError("/x/y.sqlite: directory /x does not exist; create it first"),
     "/x/y.sqlite: directory /x does not exist; create it first"),
    (DataFormatError("f.sqlite: truncated SQLite file"), "f.sqlite: truncated SQLite file"),
    (sqlite3.OperationalError("/ro/out.sqlite: unable to open database file"),
     "SQLite: /ro/out.sqlite: unable to open database file; check that the file is a whole "
     "FedJAX SQLite file (download or convert it again) and that its folder is writable"),
    (MemoryError(), "out of memory: the run is too large for this machine; lower "
                    "--batch-size, --clients-per-round, --chunk-size, --epochs or --max-steps"),
    (OverflowError("Python int too large to convert to C long"),
     "a number is too large (Python int too large to convert to C long): lower the option "
     "that gave it (a seed fits in 32 bits; --batch-size, --clients-per-round, --chunk-size, "
     "--epochs or --max-steps must fit in memory)"),
])
def test_expected_failures_are_one_line(error, line):
    assert describe(error) == line

    @user_errors
    def command():
        raise error

    with pytest.raises(typer.Exit) as exit_info:
        command()
    assert exit_info.value.exit_code == 2


@pytest.mark.parametrize("bug", [KeyError("x"), TypeError("unsupported operand"),
                                 ValueError("an internal invariant broke"), AssertionError()])
def test_a_bug_keeps_its_traceback(bug):
    @user_errors
    def command():
        raise bug

    assert describe(bug) is None
    with pytest.raises(type(bug)):
        command()


def test_numpy_allocation_too_large_is_one_line():
    try:
        np.zeros((2**40, 2**40), np.float32)
    except (ValueError, MemoryError) as e:
        assert describe(e) is not None and "lower --batch-size" in describe(e)


def test_a_missing_config_file_is_one_line(tmp_path):
    res = runner.invoke(app, ["run", NAME, "--config", str(tmp_path / "none.toml")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.count("error:") == 1


def test_data_info_on_a_directory_and_a_missing_file_is_one_line(tmp_path):
    for path in (tmp_path, tmp_path / "missing.sqlite"):
        res = runner.invoke(app, ["data", "info", str(path)])
        assert res.exit_code == 2, res.output
        assert res.output.count("error:") == 1 and str(path) in res.output


@pytest.mark.parametrize("args, message", [
    (["--rounds", "100000000000000000000000"],
     "rounds must be at most 10000000 (10^7) to fit in memory; lower it, got "
     "100000000000000000000000"),
    (["--seed", str(2**32)], "seed must be at most 4294967295 (2^32 - 1) (seeds fit in 32 "
                             "bits), got 4294967296"),
    (["--batch-size", "10000000"], "batch-size must be at most 1000000 (10^6)"),
    (["--epochs", "1000000"], "epochs must be at most 10000 (10^4)"),
    (["--client-lr", "inf"], "client-lr must be finite, got inf"),
    (["--server-lr", "nan"], "server-lr must be a non-negative number, got nan"),
    (["--clients-per-round", "99999999"], "clients-per-round must be at most 10000000"),
    (["--tensorboard", "true"], "'true' is not a task: the flags (" + ", ".join(
        o.flag for o in config.OPTIONS.options if o.type == "boolean") + ") take no value"),
    (["--rounds", "1e23"], "Invalid value for '--rounds'"),
])
def test_numeric_options_have_ranges(args, message, tmp_path):
    task = [] if args[0] == "--tensorboard" else [NAME]
    res = runner.invoke(app, ["run", *args, *task, "--out", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "r").exists()


def test_toml_and_set_ranges(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(f'task = "{NAME}"\nseed = -1\n')
    res = runner.invoke(app, ["run", "--config", str(path), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "seed must be at least 0, got -1" in res.output
    res = runner.invoke(app, ["run", NAME, "--set", "rounds=1e23", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "rounds expects an integer" in res.output


def test_help_shows_ranges_and_flags_without_bool():
    res = runner.invoke(app, ["run", "--help"], terminal_width=200)
    text = " ".join(res.output.split())
    assert "Valid: 0 .. 2^32 - 1." in text and "Valid: 1 .. 10^7." in text
    assert "Valid: >= 0, finite." in text
    line = next(ln for ln in res.output.splitlines() if "--tensorboard" in ln)
    assert "<bool>" not in line and "takes no value" in text


def test_bare_fedjax_prints_no_empty_error_line(tmp_path):
    res = subprocess.run([sys.executable, "-c", "from cli.main import main; main()"],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[2]),
                              "FEDJAX_COMPILATION_CACHE": "0", "JAX_PLATFORMS": "cpu"})
    assert "Usage" in res.stdout + res.stderr
    assert "error:" not in res.stdout + res.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--option", "proximal_weight=abc",
     "algorithm 'fedprox' option proximal_weight expects a number, got 'abc'; e.g. --option "
     "proximal_weight=0.01"),
    ("--aggregator-option", "beta=[1]",
     "aggregator 'trimmed_mean' option beta expects a number, got [1]"),
])
def test_a_wrong_option_type_names_the_option(flag, value, message, tmp_path):
    algorithm = "fedprox" if flag == "--option" else "fedavg"
    res = runner.invoke(app, ["run", NAME, "--algorithm", algorithm, "--aggregator",
                              "trimmed_mean", flag, value, "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output


def test_krum_needs_enough_clients_at_config_time():
    with pytest.raises(ConfigError, match=r"aggregator 'krum' with num_byzantine=2 needs at "
                                          r"least 5 clients per round, got --clients-per-round "
                                          r"4; raise --clients-per-round to 5 or lower"):
        config.resolve(NAME, clients_per_round=4, aggregator="krum",
                       aggregator_options={"num_byzantine": 2})
    with pytest.raises(ConfigError, match="'norm_bounding' with inner=multi_krum needs at "
                                          "least 4 clients"):
        config.resolve(NAME, clients_per_round=3, aggregator="norm_bounding",
                       aggregator_options={"inner": "multi_krum"})
    with pytest.raises(ConfigError, match="trimmed_mean needs 0 <= beta < 0.5, got beta=0.5"):
        config.resolve(NAME, aggregator="trimmed_mean", aggregator_options={"beta": 0.5})
    cfg = config.resolve(NAME, clients_per_round=5, aggregator="krum",
                         aggregator_options={"num_byzantine": 2})
    assert cfg.aggregator_options == {"num_byzantine": 2}


def test_resume_does_not_suggest_an_allow_changes_it_refuses(tmp_path):
    out = tmp_path / "r"
    res = runner.invoke(app, ["run", NAME, "--rounds", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "roundz": 3}))
    res = runner.invoke(app, ["resume", str(out)])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "holds 'roundz', not an option of ExperimentConfig" in text
    assert "--allow-changes" not in text
    (out / "config.json").write_text(json.dumps({**saved, "seed": 7, "rounds": 2}))
    res = runner.invoke(app, ["resume", str(out), "--allow-changes", "rounds"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "seed 0 -> 7, which cannot change when a run resumes" in text
    assert "--allow-changes" not in text
