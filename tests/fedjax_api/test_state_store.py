"""A run's client store: host and disk runs equal the device run, resume from incremental
checkpoints, the auto choice and the option errors."""

import json

import jax
import numpy as np
import pytest

from fedjax_api import ConfigError, Experiment, checkpoint, config, state_store
from fedjax_api.experiment import Interrupted
from fedjax_api.resume import resume_config
from fedjax_core import client_store
from tests.fedjax_api.tiny_task import NAME

OPTIONS = dict(algorithm="scaffold", rounds=6, eval_every=3, checkpoint_every=2,
               clients_per_round=4)


def same(a, b, tol=0.0):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


def rows(server):
    """Every row of the server's stores, in population row order."""
    index = client_store.host_index(server.state)
    if index is None:
        size = int(server.state.index.size)
        return jax.tree.map(lambda t: np.asarray(t[:size]), server.state.store.rows)
    index.host.view(index.version)
    return index.host.read(np.arange(index.host.size))[0]


@pytest.fixture(scope="module")
def device_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device") / "run"
    return Experiment.from_config(config.resolve(NAME, client_store="device", out=str(out),
                                                 **OPTIONS)).run()


@pytest.mark.parametrize("backend", ["host", "disk"])
def test_resume_equals_uninterrupted_and_device(tmp_path, backend, device_run, monkeypatch):
    # Deltas are written and read a row at a time (the chunked path of a large store).
    monkeypatch.setattr(state_store, "CHUNK_BYTES", 1)
    cfg = config.resolve(NAME, client_store=backend, out=str(tmp_path / "cut"), **OPTIONS)
    exp = Experiment.from_config(cfg)

    def stop_at_5(record):
        if record["kind"] == "train" and record["round"] == 5:
            exp.interrupt()

    with pytest.raises(Interrupted):
        exp.run(stop_at_5)
    deltas = sorted(p.name for p in (tmp_path / "cut" / "client_store" / "deltas").iterdir())
    assert deltas == ["delta-00000002.npz", "delta-00000004.npz", "delta-00000005.npz"]
    if backend == "disk":
        assert (tmp_path / "cut" / "client_store" / "store0-leaf0.bin").is_file()
    # A later delta than the checkpoint resumed is removed: fake a round-9 leftover.
    (tmp_path / "cut" / "client_store" / "deltas" / "delta-00000009.npz").write_bytes(b"x")
    resumed = Experiment.from_config(resume_config(tmp_path / "cut"), resuming=True).run(
        resume=True)
    assert not (tmp_path / "cut" / "client_store" / "deltas" / "delta-00000009.npz").exists()
    same(device_run.server.params, resumed.server.params, 1e-6)
    same(rows(device_run.server), rows(resumed.server), 1e-6)
    assert [r["round"] for r in resumed.history if r["kind"] == "train"] == list(range(1, 7))
    for a, b in zip(device_run.history, resumed.history):
        for k in ("train/loss", "test/loss"):
            if k in a:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-6)


def test_checkpoints_hold_only_changed_rows(tmp_path):
    exp = Experiment.from_config(config.resolve(NAME, client_store="host",
                                                out=str(tmp_path / "r"), **OPTIONS))
    exp.run()
    manifest = checkpoint.list_checkpoints(tmp_path / "r")[-1][1]
    listed = json.loads(manifest.read_text())["meta"]["client_store"]
    assert listed["backend"] == "host" and [d["round"] for d in listed["deltas"]] == [2, 4, 6]
    # 4 distinct clients a round out of 6: the first delta holds at least round 1's four
    # rows, and no delta more than the 6 clients there are.
    counts = [d["rows"] for d in listed["deltas"]]
    assert counts[0] >= 4 and all(0 < c <= 6 for c in counts)
    with np.load(tmp_path / "r" / "client_store" / "deltas" / "delta-00000004.npz",
                 allow_pickle=False) as z:
        assert z["rows"].shape[0] == counts[1] and z["s0_l0"].shape[0] == counts[1]


def test_auto_choice_and_note():
    shape = {"s": client_store.ClientStore({"w": jax.ShapeDtypeStruct((8, 1000), np.float32)})}
    gib = 2**30
    spec, note = state_store.choose("auto", "f32", shape, 1000, None, 16 * gib, 64 * gib)
    assert spec.backend == "device" and note is None
    spec, note = state_store.choose("auto", "f32", shape, 5 * 10**6, None, 16 * gib, 64 * gib)
    assert spec.backend == "host" and note is not None and note.startswith("client store: host")
    spec, note = state_store.choose("auto", "bf16", shape, 10**8, None, 16 * gib, 64 * gib)
    assert spec.backend == "disk" and spec.dtype == "bf16" and "in a file on disk" in str(note)
    with pytest.raises(ConfigError, match="needs --client-store host or disk"):
        state_store.choose("device", "bf16", shape, 10, None)


@pytest.mark.parametrize("args,message", [
    (["--client-store", "ssd"], "unknown client-store 'ssd'; choose one of:"),
    (["--client-store-dtype", "fp8"], "unknown client-store-dtype 'fp8'; choose one of: bf16, f32"),
    (["--client-store", "device", "--client-store-dtype", "bf16"],
     "--client-store-dtype bf16 needs --client-store host or disk"),
])
def test_cli_bad_values_exit_2(tmp_path, args, message):
    from typer.testing import CliRunner

    from cli import main
    res = CliRunner().invoke(main.app, ["run", NAME, "--algorithm", "scaffold", "--rounds", "1",
                                        *args])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert "Traceback" not in res.output
