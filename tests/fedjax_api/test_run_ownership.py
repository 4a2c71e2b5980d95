"""A run directory has one owner, nothing is written through a planted link, nothing is lost:
fedjax_core.atomic, rundir.RunDirLock, config.json's status, the torn-log restore, the resumed
config and the version warning (issue 15)."""

import json
import os
import stat

import jax
import pytest
from typer.testing import CliRunner

from cli.main import app
from fedjax_api import ConfigError, Experiment, config, report, rundir
from fedjax_api.resume import VersionWarning, resume_config, version_changes
from fedjax_core import atomic
from tests.fedjax_api.tiny_task import NAME

runner = CliRunner()


def error_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.strip()]


# --- fedjax_core.atomic ---------------------------------------------------------------------

def test_atomic_writes_replace_a_link_and_never_follow_one(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("victim")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.json").symlink_to(victim)
    atomic.write_text(out / "a.json", "new\n")
    assert victim.read_text() == "victim"
    assert not (out / "a.json").is_symlink() and (out / "a.json").read_text() == "new\n"
    old = os.umask(0o022)
    try:
        atomic.write_bytes(out / "b.bin", b"\x00\x01")
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "b.bin").stat().st_mode) == 0o644
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.bin"]  # no temporary left

    (out / "log").symlink_to(victim)
    with pytest.raises(atomic.LinkRefused, match="is a symbolic link"):
        atomic.open_append(out / "log")
    with pytest.raises(FileExistsError):
        atomic.create(out / "log")
    (out / "sub").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(atomic.LinkRefused):
        atomic.make_dir(out / "sub" / "deeper", root=out)
    assert not (tmp_path / "deeper").exists()
    assert victim.read_text() == "victim"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "f.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.replace(tmp_path / "f.txt", binary=False) as f:
            f.write("half")
            raise RuntimeError("disk full")
    assert (tmp_path / "f.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


# --- planted links in a shared --out ------------------------------------------------------

PLANTED = ["config.json", "config.toml", "metrics.jsonl", "train.csv", "eval.csv", ".lock",
           ".fedjax-write-test", ".config.json.tmp", ".metrics.jsonl.tmp", "checkpoints",
           "checkpoints/ckpt-00000002.npz", "checkpoints/.ckpt-00000002.npz.tmp"]
WRITTEN = ["config.json", "config.toml", "metrics.jsonl", "train.csv", "eval.csv",
           "checkpoints/ckpt-00000002.npz", "checkpoints/ckpt-00000002.json"]


@pytest.mark.parametrize("name", PLANTED)
def test_a_link_planted_in_out_is_never_written_through(tmp_path, name):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("victim")
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    link = out / name
    if name == "checkpoints":
        (out / "checkpoints").rmdir()
        link.symlink_to(victim, target_is_directory=True)
    else:
        link.symlink_to(victim / "file")
    res = runner.invoke(app, ["run", NAME, "--rounds", "2", "--checkpoint-every", "1",
                              "--out", str(out)])
    assert (victim / "file").read_text() == "victim"
    assert sorted(p.name for p in victim.iterdir()) == ["file"]
    assert "Traceback" not in res.output
    if res.exit_code == 0:
        for written in WRITTEN:  # real files of the run, not links
            assert (out / written).is_file() and not (out / written).is_symlink(), written
    else:
        assert res.exit_code == 2, res.output
        (line,) = error_lines(res.output)  # refused before it starts: one line, nothing else
        assert any(why in line for why in ("is a symbolic link", "already holds a run",
                                           f"holds a {rundir.CONFIG_FILE}")), line


# --- one owner -------------------------------------------------------------------------------

def test_the_lock_names_its_owner_and_is_released(tmp_path):
    out = tmp_path / "run"
    lock = rundir.RunDirLock(out).acquire()
    assert (out / rundir.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    message = f"{out} is in use by process {os.getpid()}; "
    with pytest.raises(ConfigError, match=message):
        rundir.RunDirLock(out).acquire()
    with pytest.raises(ConfigError, match=message):
        rundir.check_out(out)
    with pytest.raises(ConfigError, match=message):  # a resume is refused before any work
        Experiment.from_config(config.resolve(NAME, rounds=2, out=str(out)), resuming=True)
    lock.release()
    assert (out / rundir.LOCK_FILE).read_text() == ""
    with rundir.RunDirLock(out):
        pass
    rundir.check_out(out)


def test_a_run_finished_meanwhile_is_not_run_over(tmp_path):
    """Two experiments on one out, both validated before either ran: the second is refused
    once it owns the directory, and the log holds the first run's records once."""
    out = str(tmp_path / "run")
    first = Experiment.from_config(config.resolve(NAME, rounds=2, out=out))
    second = Experiment.from_config(config.resolve(NAME, rounds=2, out=out))
    first.run()
    with pytest.raises(ConfigError, match="already holds a run"):
        second.run()
    rounds = [r["round"] for r in rundir.read_metrics(out) if r["kind"] == "train"]
    assert rounds == [1, 2]


# --- an --out with only a config.json; an empty --out ----------------------------------------

def test_an_out_with_only_a_config_is_refused_unless_it_never_started(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"task": NAME, "rounds": 7}))
    res = runner.invoke(app, ["run", NAME, "--rounds", "2", "--out", str(out)])
    assert res.exit_code == 2
    (line,) = error_lines(res.output)
    assert f"holds a {rundir.CONFIG_FILE} that is not of a run that never started" in line
    assert json.loads((out / "config.json").read_text()) == {"task": NAME, "rounds": 7}

    (out / "config.json").write_text(json.dumps({"task": NAME, "status": "starting"}))
    res = runner.invoke(app, ["run", NAME, "--rounds", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["status"] == rundir.STATUS_STARTED and saved["rounds"] == 2


def test_an_empty_out_is_refused_and_nothing_lands_in_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["run", NAME, "--rounds", "1", "--out", ""])
    assert res.exit_code == 2
    (line,) = error_lines(res.output)
    assert "the output directory is empty (--out '')" in line
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="output directory is empty"):
        Experiment.from_config(config.resolve(NAME, rounds=1, out=" "))


# --- resume: a torn log, more rounds, other versions -----------------------------------------

def test_a_torn_last_line_is_restored_from_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    Experiment.from_config(config.resolve(NAME, rounds=3, eval_every=1, out=str(out))).run()
    path = out / rundir.METRICS_FILE
    lines = path.read_text().splitlines()
    last = json.loads(lines[-1])
    assert (last["round"], last["kind"]) == (3, "eval")  # the final evaluation, checkpointed
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])  # a crash mid-write
    cfg = resume_config(out, {"rounds": 4}, allow_changes=("rounds",))
    Experiment.from_config(cfg, resuming=True).run(resume=True)
    after = [json.loads(x) for x in path.read_text().splitlines()]
    assert after[:len(lines)] == [json.loads(x) for x in lines]  # the torn record is back
    assert [(r["round"], r["kind"]) for r in after[len(lines):]] == [(4, "train"), (4, "eval")]
    evals = (out / "eval.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in evals[1:]] == ["0", "1", "2", "3", "4"]


def test_resume_with_more_rounds_updates_config_json_and_toml(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, ["run", NAME, "--rounds", "2", "--out", str(out)]).exit_code == 0
    res = runner.invoke(app, ["resume", str(out), "--rounds", "3", "--allow-changes", "rounds"])
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["rounds"] == 3 and saved["status"] == rundir.STATUS_STARTED
    assert "rounds = 3" in (out / "config.toml").read_text().splitlines()
    cfg, records = report.load_run(out)
    assert cfg is not None and cfg["rounds"] == 3
    assert [r["round"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert resume_config(out).rounds == 3  # a plain resume sees no change
    res = runner.invoke(app, ["resume", str(out)])
    assert res.exit_code == 2 and "is complete (3 rounds)" in res.output


def test_resume_under_other_versions_warns_in_one_line(tmp_path):
    out = tmp_path / "run"
    Experiment.from_config(config.resolve(NAME, rounds=1, out=str(out))).run()
    saved = json.loads((out / "config.json").read_text())
    saved["versions"] = {**saved["versions"], "jax": "0.0.1", "fedjax_sim": "0.0.0"}
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.warns(VersionWarning) as caught:
        resume_config(out, {"rounds": 2}, allow_changes=("rounds",))
    (w,) = caught
    assert str(w.message) == (
        f"resuming {out} under other versions than it started with (fedjax_sim 0.0.0 -> "
        f"{_current('fedjax_sim')}, jax 0.0.1 -> {jax.__version__}); "
        "later rounds may differ from an uninterrupted run")
    assert version_changes({"jax": jax.__version__}) == ""
    assert version_changes(None) == ""


def _current(name):
    from fedjax_api.versions import versions

    return versions()[name]
