"""`--track mlflow` / `--track wandb`: one tracked run, continued by `fedjax resume`, offline."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from fedjax_api import config, tracking
from fedjax_api.experiment import Experiment
from fedjax_api.loop import Callback
from tests.fedjax_api.tiny_task import NAME

runner = CliRunner()
TINY = ["--clients-per-round", "2", "--eval-every", "1", "--checkpoint-every", "1"]


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def _mlflow(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())


def test_mlflow_run_then_resume_is_one_run_with_a_continuous_history(tmp_path, monkeypatch):
    out, store = tmp_path / "run", tmp_path / "mlruns"
    res = runner.invoke(app, ["run", NAME, "--rounds", "2", *TINY, "--out", str(out),
                              "--track", f"mlflow:{store}"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["resume", str(out), "--rounds", "4", "--allow-changes", "rounds"])
    assert res.exit_code == 0, res.output
    client = _mlflow(monkeypatch, tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("fedjax-sim").experiment_id])
    run_id = json.loads((out / tracking.STATE_FILE).read_text())["mlflow"]["run_id"]
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["task"] == NAME and runs[0].data.params["clients_per_round"] == "2"
    assert runs[0].data.tags["fedjax.resumed.rounds"] == "4"
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx(
        [r["train/loss"] for r in _records(out, "train")], rel=1e-6)
    acc = client.get_metric_history(run_id, "test/accuracy")
    assert [m.step for m in acc] == [0, 1, 2, 3, 4]
    evals = _records(out, "eval")
    assert [m.value for m in acc] == pytest.approx([r["test/accuracy"] for r in evals])
    final = runs[0].data.metrics
    assert final["final/test/accuracy"] == pytest.approx(evals[-1]["test/accuracy"])
    assert final["eval/train/loss"] == pytest.approx(evals[-1]["train/loss"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"final_metrics.json", "metrics.jsonl", "config.json", "eval.csv"} <= artifacts


class _Crash(Callback):
    """Fails after round `at` has been recorded (a killed process, past a checkpoint)."""

    def __init__(self, at: int):
        self.at = at

    def on_round_end(self, loop):
        if loop.round == self.at:
            raise RuntimeError("killed")


def test_rounds_replayed_after_a_crash_are_not_logged_twice(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = config.resolve(NAME, rounds=4, clients_per_round=2, out=str(out), checkpoint_every=2,
                         track=(f"mlflow:{tmp_path / 'mlruns'}",))
    with pytest.raises(RuntimeError, match="killed"):
        Experiment.from_config(cfg).run(callbacks=[_Crash(3)])  # logged 1..3, checkpoint 2
    client = _mlflow(monkeypatch, tmp_path)
    run_id = json.loads((out / tracking.STATE_FILE).read_text())["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    result = Experiment.from_config(cfg, resuming=True).run(resume=True)  # replays round 3
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx(
        [r["train/loss"] for r in result.history if r["kind"] == "train"], rel=1e-6)
    assert client.get_run(run_id).info.status == "FINISHED"


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B transaction log (`run-ID.wandb`): a 7-byte header,
    then LevelDB-style records (crc32 4, length 2, type 1) in blocks of 32 KiB."""
    from wandb.proto import wandb_internal_pb2

    data, pos, out, part = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
        elif kind == 0:
            break
    return out


def test_wandb_offline_run_writes_its_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", NAME, "--rounds", "2", *TINY, "--out", str(out),
                              "--track", "wandb:tests"])
    assert res.exit_code == 0, res.output
    state = json.loads((out / tracking.STATE_FILE).read_text())["wandb"]
    assert state["project"] == "tests"
    files = list(out.glob(f"wandb/offline-run-*-{state['id']}/run-{state['id']}.wandb"))
    assert len(files) == 1
    rows: dict[int, dict] = {}
    for record in _wandb_records(files[0]):
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: i.value_json for i in record.history.item}
            rows[int(items["_step"])] = items
    assert sorted(rows) == [0, 1, 2]
    for r in _records(out, "train"):
        assert json.loads(rows[r["round"]]["train/loss"]) == pytest.approx(r["train/loss"])
    for r in _records(out, "eval"):
        assert json.loads(rows[r["round"]]["test/accuracy"]) == pytest.approx(
            r["test/accuracy"])


def test_missing_tracker_package_one_line_exit_2_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", NAME, "--rounds", "2", "--out", str(out),
                              "--track", "mlflow"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        "error: --track mlflow needs the mlflow extra: pip install 'fedjax-sim[mlflow]'"]
    assert not out.exists()


def test_track_names_a_tracker_and_comes_from_config_files(tmp_path):
    res = runner.invoke(app, ["run", NAME, "--rounds", "1", "--out", str(tmp_path / "r"),
                              "--track", "neptune"])
    assert res.exit_code == 2
    assert "track must name mlflow[:URI] or wandb[:PROJECT], got ('neptune',)" in res.output
    from fedjax_api import configfile
    path = tmp_path / "exp.toml"
    path.write_text('[run]\ntrack = ["mlflow:./mlruns", "wandb"]\n')
    assert configfile.load(path) == {"track": ("mlflow:./mlruns", "wandb")}
    cfg = configfile.resolve_file(path, default_task=NAME)
    assert cfg.track == ("mlflow:./mlruns", "wandb")
    assert configfile.resolve_file(tmp_path / "again.toml" if (tmp_path / "again.toml")
                                   .write_text(configfile.dump(cfg)) else path) == cfg


def test_no_extras_are_imported_without_them():
    code = ("import sys, fedjax_api, fedjax_core, cli.main\n"
            "from fedjax_api import experiment, tracking, export\n"
            "bad = ['datasets', 'flwr_datasets', 'mlflow', 'wandb', 'safetensors', 'orbax']\n"
            "print([m for m in sys.modules if m.split('.')[0] in bad])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parents[2])
    assert done.stdout.strip() == "[]", done.stdout
