"""The run options are declared once (`ExperimentConfig`'s fields): the commands, config
files, config.json, validation and docs/cli.md are all made from the declarations."""

import inspect
import json
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
import typer
from typer.testing import CliRunner

from cli import main, options
from cli import sweep as sweep_cli
from fedjax_api import config, configfile, listing
from fedjax_api.errors import ConfigError
from fedjax_api.options import Schema, at_least, option
from fedjax_api.resume import resume_config
from tests import generated_docs
from tests.fedjax_api.tiny_task import NAME

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
runner = CliRunner()


@attrs.frozen(kw_only=True)
class FooConfig(config.ExperimentConfig):
    """The run options plus one made up for this test: one declaration."""

    foo: int = option(3, key="run.foo", check=at_least(0), help="A made-up option.")


FOO = Schema(FooConfig)


def foo_app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("run")(main.run_command(FOO))
    app.command("sweep")(sweep_cli.sweep_command(FOO))
    app.command("resume")(main.resume_command(FOO))
    return app


def test_a_new_option_is_one_declaration(tmp_path):
    app = foo_app()
    for command in ("run", "sweep", "resume"):  # the commands take --foo
        res = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert res.exit_code == 0 and re.search(r"--foo\s+<int>\s+A made-up option\.", res.output)

    # fedjax run --foo: validated, then in config.json (and the checkpoint's config).
    res = runner.invoke(app, ["run", NAME, "--rounds", "1", "--foo", "-1", "--out",
                              str(tmp_path / "bad")])
    assert res.exit_code == 2 and "foo must be at least 0, got -1" in res.output
    assert not (tmp_path / "bad").exists()
    res = runner.invoke(app, ["run", NAME, "--rounds", "1", "--foo", "5", "--out",
                              str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["foo"] == 5

    # fedjax sweep --foo: every member's config.json.
    res = runner.invoke(app, ["sweep", NAME, "--rounds", "1", "--seeds", "0,1", "--foo", "7",
                              "--out", str(tmp_path / "sweep")])
    assert res.exit_code == 0, res.output
    members = sorted((tmp_path / "sweep" / "members").glob("*/config.json"))
    assert [json.loads(p.read_text())["foo"] for p in members] == [7, 7]

    # A TOML key, with its type checked, --set, and written back by dump.
    path = tmp_path / "exp.toml"
    path.write_text(f'task = "{NAME}"\n[run]\nfoo = 4\n')
    assert configfile.load(path, FOO) == {"task": NAME, "foo": 4}
    cfg = configfile.resolve_file(path, [], {}, schema=FOO)
    assert isinstance(cfg, FooConfig) and cfg.foo == 4
    again = configfile.resolve_file(path, ["run.foo=6"], {}, schema=FOO)
    assert isinstance(again, FooConfig) and again.foo == 6
    assert "\nfoo = 4\n" in configfile.dump(cfg, FOO).split("\n[run]\n")[1]
    path.write_text("[run]\nfoo = 1.5\n")
    with pytest.raises(ConfigError, match=r"run\.foo expects an integer, got float 1\.5"):
        configfile.load(path, FOO)
    with pytest.raises(ConfigError, match=r"unknown key 'run\.fooo'; did you mean 'run\.foo'"):
        configfile.apply_overrides({}, ["run.fooo=1"], FOO)

    # fedjax resume --foo: resumable, so allowed when named.
    with pytest.raises(ConfigError, match="pass --allow-changes foo"):
        resume_config(tmp_path / "run", {"foo": 6}, schema=FOO)
    resumed = resume_config(tmp_path / "run", {"foo": 6}, ("foo",), schema=FOO)
    assert isinstance(resumed, FooConfig) and resumed.foo == 6

    # The docs: docs/cli.md's table and docs/config.md's.
    assert re.search(r"^\| `--foo` \| int >= 0 \| 3 \| `run.foo` \| yes \| yes \| "
                     r"A made-up option\. \|$", options.markdown(FOO), re.MULTILINE)
    assert "| `run.foo` | integer | `3` | `--foo` | `foo` | A made-up option. |" in \
        listing.schema_markdown(FOO)


def test_docs_option_table_is_current():
    generated_docs.check(DOCS, "options", options.markdown(config.OPTIONS),
                         ".venv/bin/python -m pytest -q tests/cli/test_options.py -k docs")


def test_docs_option_table_lists_every_option_of_fedjax_run():
    body = generated_docs.block(DOCS, "options")
    flags = {row.split("|")[1].strip().strip("`").split()[0]
             for row in body.strip().splitlines()[2:]}
    params = inspect.signature(main.run).parameters.values()
    declared = set()
    for p in params:
        info = p.annotation.__metadata__[0]  # Option("--flag", ...) keeps "--flag" in .default
        flag = info.default if isinstance(info.default, str) else f"--{p.name.replace('_', '-')}"
        declared.add("TASK" if isinstance(info, typer.models.ArgumentInfo) else flag)
    assert flags == declared and "--config" in flags and "--coordinator" in flags


def test_sweep_and_resume_take_the_options_their_declarations_say():
    sweep_params = set(inspect.signature(sweep_cli.sweep).parameters)
    resume_params = set(inspect.signature(main.resume).parameters)
    for o in config.OPTIONS.options:
        assert (options.name(o, "sweep") in sweep_params) == (o.sweep != "no"), o.field
        assert (o.field in resume_params) == o.resumable, o.field
    assert {"seeds", "client_lr", "server_lr", "option"} <= sweep_params
    assert not {"clip", "devices", "device_data", "personalize_steps"} & sweep_params
    assert {"rounds", "eval_every", "checkpoint_every"} <= resume_params
    assert not {"seed", "algorithm", "task", "sampling", "clip"} & resume_params


def test_values_turn_parsed_options_into_config_options():
    given: dict[str, Any] = {"option": ["b2=0.9", "name=adam"], "aggregator_option": None,
                             "client_lr": 0.1, "tensorboard": False, "device_data": True}
    got = options.values(config.OPTIONS, "run", given)
    assert got["algorithm_options"] == {"b2": 0.9, "name": "adam"}
    assert got["client_lr"] == 0.1 and got["tensorboard"] is None and got["device_data"] is True
    assert got["rounds"] is None and set(got) == set(config.OPTIONS.by_field)
    sweep = {"client_lr": "0.1,0.2", "seeds": "3,4", "option": ["momentum=0.0,0.9", "x=1"]}
    got = options.values(config.OPTIONS, "sweep", sweep)
    assert (got["client_lr"], got["seed"]) == (0.1, 3)
    assert got["algorithm_options"] == {"x": 1, "momentum": 0.0}
    lists = options.sweep_lists(config.OPTIONS, sweep)
    assert lists["client_lr"] == [0.1, 0.2] and lists["seed"] == [3, 4]
    assert lists["server_lr"] is None and lists["algorithm_options"] == {"momentum": [0.0, 0.9]}


def test_resume_refuses_to_change_what_its_declaration_keeps(tmp_path):
    res = runner.invoke(main.app, ["run", NAME, "--rounds", "1", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main.app, ["resume", str(tmp_path / "r"), "--allow-changes", "seed"])
    assert res.exit_code == 2
    assert "seed cannot change when a run resumes" in res.output
    res = runner.invoke(main.app, ["resume", str(tmp_path / "r"), "--seed", "1"])
    assert res.exit_code == 2 and "No such option: --seed" in res.output
