"""`fedjax run --devices N` and the multi-process options' mistakes (one line, exit 2).

Two processes through the CLI run in tests/fedjax_api/test_multihost.py.
"""

import json

import jax
import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.fedjax_api.tiny_task import NAME

runner = CliRunner()


@pytest.fixture(autouse=True)
def _jax_started():
    """`--devices N` asks JAX for N CPU devices only while JAX has not started; start it
    first so that these tests keep the 8 devices of tests/conftest.py."""
    jax.devices()


def test_run_over_devices_writes_the_one_device_metrics(tmp_path):
    losses = {}
    for devices in ("1", "4"):
        out = tmp_path / devices
        res = runner.invoke(app, ["run", NAME, "--rounds", "2", "--clients-per-round", "3",
                                  "--devices", devices, "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert ("clients split over 4 cpu devices, 1 process(es)" in res.output) == (devices == "4")
        assert json.loads((out / "config.json").read_text())["devices"] == int(devices)
        assert "devices = " + devices in (out / "config.toml").read_text()
        losses[devices] = [json.loads(x)["train/loss"] for x in
                           (out / "metrics.jsonl").read_text().splitlines()
                           if json.loads(x)["kind"] == "train"]
    assert losses["4"] == pytest.approx(losses["1"], abs=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--devices", "9"], ("--devices 9 asks for more devices than the 8 cpu device(s) of this "
                          "process")),
    (["--devices", "-1"], "devices must be at least 0, got -1"),
    (["--num-processes", "2"], "several processes need --coordinator HOST:PORT, --process-id too"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
     "--coordinator must be HOST:PORT"),
])
def test_bad_device_options_one_line_exit_2(args, message, tmp_path):
    res = runner.invoke(app, ["run", NAME, *args, "--out", str(tmp_path / "x")])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "x").exists()
