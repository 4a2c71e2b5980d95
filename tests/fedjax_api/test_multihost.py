"""Two processes on this machine (JAX's multi-process runtime, gloo collectives on CPU),
2 CPU devices each, run one Experiment together; the result equals one process's.

Each process samples the same cohort, packs only the slots of its own two devices, and
the round runs over all four devices. Only process 0 writes the run directory.
"""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fedjax_api import checkpoint, config
from fedjax_api.experiment import Experiment
from fedjax_api.rundir import read_metrics
from tests.fedjax_api.tiny_task import NAME

WORKER = Path(__file__).with_name("multihost_worker.py")
ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-6
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(algorithm: str, out: Path, num_processes: int = 2,
                  resume: bool = False) -> list[dict]:
    port = free_port()
    wait([[str(i), str(num_processes), str(port), algorithm, str(out)] + ["resume"] * resume
          for i in range(num_processes)])
    return [dict(np.load(out / f"process{i}.npz")) for i in range(num_processes)]


def wait(arguments: list[list[str]]) -> list[str]:
    """Starts the worker once per argument list, waits (bounded), checks the exit codes."""
    procs = [subprocess.Popen([sys.executable, str(WORKER), *args], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for args in arguments]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{text[-4000:]}"
    return outputs


def test_two_processes_match_one(tmp_path):
    """SCAFFOLD (per-client state rows, replicated) through the Experiment API; the run
    stops after round 2 and both processes resume it from process 0's checkpoint.
    FedAvg through the CLI: the next test."""
    algorithm = "scaffold"
    results = run_processes(algorithm, tmp_path, resume=True)

    cfg = config.resolve(NAME, algorithm=algorithm, rounds=3, clients_per_round=5, eval_every=2)
    one = Experiment.from_config(cfg).run()  # one process, one device
    want = jax.tree.leaves(jax.device_get(one.server.state))
    want_losses = [r["train/loss"] for r in one.history if r["kind"] == "train"]
    want_accuracy = [r["test/accuracy"] for r in one.history if r["kind"] == "eval"]
    for got in results:
        assert len([k for k in got if k.startswith("arr_")]) == len(want)
        for i, w in enumerate(want):
            np.testing.assert_allclose(got[f"arr_{i}"], w, atol=TOL, rtol=TOL)
        np.testing.assert_allclose(got["losses"], want_losses, atol=TOL, rtol=TOL)
        np.testing.assert_allclose(got["accuracy"], want_accuracy, atol=TOL, rtol=TOL)

    # Process 0 alone wrote the run directory: each record once, and the checkpoints.
    run = tmp_path / "run"
    records = read_metrics(run)
    assert [(r["round"], r["kind"]) for r in records] == [
        (0, "eval"), (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (3, "eval")]
    assert json.loads((run / "config.json").read_text())["algorithm"] == algorithm
    assert [r for r, _ in checkpoint.list_checkpoints(run)] == [2, 3]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> tuple[list[str], Path]:
    """`fedjax run --devices 2 --coordinator ... --num-processes 2 --process-id I`, 3 rounds
    (the processes' outputs and the run directory): run once, read by the next test and
    copied, then resumed, by the one after it."""
    port, out = free_port(), tmp_path_factory.mktemp("cli_run") / "run"
    outputs = wait([["cli", "run", NAME, "--rounds", "3", "--clients-per-round", "5",
                     "--devices", "2", "--coordinator", f"127.0.0.1:{port}",
                     "--num-processes", "2", "--process-id", str(i), "--out", str(out)]
                    for i in range(2)])
    return outputs, out


def test_cli_two_processes_write_one_run_dir(cli_run):
    """`fedjax run --devices 2 --coordinator ... --num-processes 2 --process-id I`: the run
    directory process 0 writes holds the one-process run's metrics."""
    outputs, out = cli_run
    for i, text in enumerate(outputs):
        assert f"clients split over 4 cpu devices, 2 process(es); this is process {i}" in text
        assert "metrics after round 3" in text
    cfg = config.resolve(NAME, rounds=3, clients_per_round=5)
    one = Experiment.from_config(cfg).run()
    got = [r for r in read_metrics(out) if r["kind"] == "train"]
    want = [r for r in one.history if r["kind"] == "train"]
    assert [r["round"] for r in got] == [1, 2, 3]
    for g, w in zip(got, want):
        assert g["train/loss"] == pytest.approx(w["train/loss"], abs=TOL)
    final = read_metrics(out)[-1]  # the final parameters' test metrics
    assert final["kind"] == "eval" and final["round"] == 3
    for name in ("loss", "accuracy"):
        assert final[f"test/{name}"] == pytest.approx(one.final["test"][name], abs=TOL)
    saved = json.loads((out / "config.json").read_text())
    assert saved["devices"] == 2 and "coordinator" not in saved


def test_cli_two_processes_resume_with_the_cli_options(cli_run, tmp_path):
    """`fedjax resume RUN --coordinator ... --num-processes 2 --process-id I` continues a
    two-process run (no FEDJAX_* variables) to the one-process run's round 4. The run is
    a copy of the previous test's (the same `fedjax run` command line, run once)."""
    out = tmp_path / "run"
    shutil.copytree(cli_run[1], out)
    port = free_port()
    outputs = wait([["cli", "resume", str(out), "--rounds", "4", "--allow-changes", "rounds",
                     "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                     "--process-id", str(i)] for i in range(2)])
    for i, text in enumerate(outputs):
        assert f"2 process(es); this is process {i}" in text
    one = Experiment.from_config(config.resolve(NAME, rounds=4, clients_per_round=5)).run()
    got = {r["round"]: r for r in read_metrics(out) if r["kind"] == "train"}
    want = {r["round"]: r for r in one.history if r["kind"] == "train"}
    assert sorted(got) == [1, 2, 3, 4]
    assert got[4]["train/loss"] == pytest.approx(want[4]["train/loss"], abs=TOL)
