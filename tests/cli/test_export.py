"""`fedjax export`: a run's params as safetensors, Orbax or npz, read back with one call."""

import json

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from fedjax_api import checkpoint, config, export
from fedjax_api.errors import ConfigError
from fedjax_api.experiment import Experiment
from tests.fedjax_api.tiny_task import NAME

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run: 3 rounds, evaluated and checkpointed every round, 3 kept."""
    out = tmp_path_factory.mktemp("export") / "run"
    cfg = config.resolve(NAME, rounds=3, clients_per_round=2, eval_every=1, checkpoint_every=1,
                         keep_checkpoints=3, out=str(out))
    result = Experiment.from_config(cfg).run()
    return out, result


def _checkpoint_params(out, round_num, like):
    exp = Experiment.from_config(config.resolve(NAME, rounds=3, clients_per_round=2))
    from fedjax_api.server import Server
    server = Server.create(exp.algorithm, exp.task.model)
    _, state, _ = checkpoint.load(out / "checkpoints" / f"ckpt-{round_num:08d}.json",
                                  template=server.state)
    return state.params


@pytest.mark.parametrize("fmt", ["safetensors", "orbax", "npz"])
def test_export_round_trips_the_final_params(run, tmp_path, fmt):
    out, result = run
    target = tmp_path / f"model.{fmt}"
    res = runner.invoke(app, ["export", str(out), "--format", fmt, str(target)])
    assert res.exit_code == 0, res.output
    params, info = export.load(target)
    want = jax.device_get(result.server.params)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == expected.dtype
    assert info["task"] == NAME and info["round"] == 3 and info["algorithm"] == "fedavg"
    assert info["model"].startswith("tests.fedjax_core.helpers.")
    assert info["metrics"]["test/accuracy"] == result.final["test"]["accuracy"]
    assert json.loads(target.with_name(target.name + ".json").read_text()) == info
    # Given the model's params as a template, they come back in its own structure.
    template = result.server.params
    again, _ = export.load(target, template=template)
    assert jax.tree.structure(again) == jax.tree.structure(template)


def test_export_best_picks_the_kept_checkpoint_with_the_best_metric(run, tmp_path):
    out, result = run
    evals = {r["round"]: r["test/loss"] for r in result.history if r["kind"] == "eval"}
    best = min((r for r in evals if r >= 1), key=lambda r: evals[r])  # kept: rounds 1..3
    target = tmp_path / "best.npz"
    info = export.export(out, target, "npz", best="loss")
    assert info["round"] == best and info["selected_by"] == "loss"
    assert info["metrics"]["test/loss"] == evals[best]
    params, _ = export.load(target)
    for got, want in zip(jax.tree.leaves(params),
                         jax.tree.leaves(_checkpoint_params(out, best, params))):
        np.testing.assert_array_equal(got, np.asarray(want))


def test_export_mistakes_are_one_line(run, tmp_path):
    out, _ = run
    target = tmp_path / "m.npz"
    assert runner.invoke(app, ["export", str(out), "--format", "npz", str(target)]).exit_code == 0
    before = target.read_bytes()
    for args, message in [
        (["--format", "npz", str(target)], f"{str(target)!r} exists; choose another name or "
                                           "pass --force to replace it"),
        (["--format", "onnx", str(tmp_path / "x")], "unknown export format 'onnx'; choose one "
                                                    "of: safetensors, orbax, npz"),
        (["--format", "npz", "--best", "test/nope", str(tmp_path / "y.npz")],
         "no kept checkpoint (rounds 1, 2, 3) is at a round evaluated with test/nope"),
    ]:
        res = runner.invoke(app, ["export", str(out), *args])
        assert res.exit_code == 2, res.output
        assert len(res.output.strip().splitlines()) == 1 and message in res.output, res.output
    assert target.read_bytes() == before
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"task": NAME}))
    res = runner.invoke(app, ["export", str(empty), str(tmp_path / "z.npz")])
    assert res.exit_code == 2 and "has no checkpoint to export" in res.output
    res = runner.invoke(app, ["export", str(out), "--format", "npz", "--force", str(target)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "m.npz", "m.npz.json"]
    with pytest.raises(ConfigError, match="has no sidecar"):
        export.load(tmp_path / "empty")
