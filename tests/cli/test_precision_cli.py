"""`fedjax run --precision bf16`: runs, records the precision, resumes with it, refuses a change."""

import json

from typer.testing import CliRunner

from cli.main import app
from fedjax_api.experiment import Experiment
from fedjax_api.resume import resume_config
from fedjax_core.models.precision import precision_of
from tests.fedjax_api.tiny_task import NAME

runner = CliRunner()


def one_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_bf16_run_records_resumes_and_refuses_a_change(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", NAME, "--rounds", "2", "--clients-per-round", "3",
                              "--precision", "bf16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"{NAME} with fedavg, precision bf16: 2 rounds" in res.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["precision"] == "bf16"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "train", "eval"]
    assert 0 < records[0]["train/loss"] < 10 and 0 <= records[-1]["test/accuracy"] <= 1
    # A resume rebuilds the model in bf16 from config.json.
    cfg = resume_config(out, {"rounds": 3}, allow_changes=("rounds",))
    assert cfg.precision == "bf16"
    assert precision_of(Experiment.from_config(cfg, resuming=True).task.model) == "bf16"
    # Changing it is refused in one line, exit 2.
    (out / "config.json").write_text(json.dumps({**saved, "precision": "f32"}))
    res = runner.invoke(app, ["resume", str(out)])
    assert res.exit_code == 2
    assert "precision 'bf16' -> 'f32', which cannot change when a run resumes" in one_line(
        res.output)


def test_unknown_precision_is_one_line(tmp_path):
    res = runner.invoke(app, ["run", NAME, "--precision", "fp16", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert "unknown precision 'fp16'" in one_line(res.output)
    assert not (tmp_path / "x").exists()
