"""The run record names what wrote it: the installed package and, from a clone, the commit."""

import importlib.metadata
import json
import shutil
import subprocess

import pytest

from fedjax_api import Experiment, checkpoint, config
from fedjax_api.versions import ROOT, git_commit, versions
from tests.fedjax_api.tiny_task import NAME


def installed() -> str | None:
    try:
        return importlib.metadata.version("fedjax-sim")
    except importlib.metadata.PackageNotFoundError:
        return None


def test_versions_name_the_installed_package_and_the_libraries():
    import jax
    import numpy as np
    import optax

    v = versions()
    assert v["fedjax_sim"] == installed()
    assert (v["jax"], v["optax"], v["numpy"]) == (jax.__version__, optax.__version__,
                                                  np.__version__)


def git(cwd, *args) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout.strip()


def test_git_commit_of_a_clone_and_of_other_folders(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("no git")
    repo = tmp_path / "clone"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.txt").write_text("a")
    git(repo, "add", "a.txt")
    git(repo, "commit", "-q", "-m", "a")
    head = git(repo, "rev-parse", "HEAD")
    assert git_commit(repo) == head
    (repo / "a.txt").write_text("b")  # a tracked file changed
    git_commit.cache_clear()
    assert git_commit(repo) == head + "-dirty"
    (repo / "sub").mkdir()
    assert git_commit(repo / "sub") is None  # not the top of the clone
    assert git_commit(tmp_path) is None       # not a clone
    git_commit.cache_clear()
    if (ROOT / ".git").exists():
        commit = git_commit()
        assert commit is not None and commit.split("-")[0] == git(ROOT, "rev-parse", "HEAD")


def test_config_json_and_checkpoints_record_the_versions(tmp_path):
    out = tmp_path / "run"
    Experiment.from_config(config.resolve(NAME, rounds=1, out=str(out))).run()
    want = versions()
    assert json.loads((out / "config.json").read_text())["versions"] == want
    (_, manifest), = checkpoint.list_checkpoints(out)
    saved = json.loads(manifest.read_text())
    assert saved["written_by"] == want and saved["meta"]["versions"] == want
