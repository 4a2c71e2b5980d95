"""Checkpoints in the run loop: exact resume, refused changes, NaN guard, interrupts."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from fedjax_api import ConfigError, Experiment, checkpoint, config
from fedjax_api.experiment import Interrupted, NonFiniteError
from fedjax_api.resume import resume_config
from tests.fedjax_api.tiny_task import NAME


def strip_times(history):
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in history]


def assert_same_bits(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("options", [
    dict(),
    dict(algorithm="scaffold"),                                      # per-client stores
    dict(sampling="poisson", clip=0.5, noise_multiplier=0.8, dp_delta=1e-3),  # DP noise keys
])
def test_stop_and_resume_is_bit_identical(tmp_path, options):
    full = Experiment.from_config(config.resolve(
        NAME, rounds=6, eval_every=2, checkpoint_every=3, out=str(tmp_path / "full"), **options))
    whole = full.run()

    cfg = config.resolve(NAME, rounds=6, eval_every=2, checkpoint_every=3,
                         out=str(tmp_path / "cut"), **options)
    exp = Experiment.from_config(cfg)

    def stop_at_3(record):
        if record["kind"] == "train" and record["round"] == 3:
            exp.interrupt()

    with pytest.raises(Interrupted, match="interrupted after round 3; resume with: fedjax resume"):
        exp.run(stop_at_3)
    assert [r for r, _ in checkpoint.list_checkpoints(tmp_path / "cut")] == [3]
    resumed = Experiment.from_config(resume_config(tmp_path / "cut"), resuming=True).run(
        resume=True)
    assert_same_bits(whole.server.state, resumed.server.state)
    assert strip_times(whole.history) == strip_times(resumed.history)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert strip_times(json.loads(x) for x in lines) == strip_times(whole.history)


def test_resume_refuses_changes_unless_allowed(tmp_path):
    out = tmp_path / "run"
    Experiment.from_config(config.resolve(NAME, rounds=2, out=str(out))).run()
    with pytest.raises(ConfigError, match="the run in .* is complete"):
        Experiment.from_config(resume_config(out), resuming=True).run(resume=True)
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's \(rounds 2 -> 4\); "
                                          "pass --allow-changes rounds"):
        resume_config(out, {"rounds": 4})
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "client_lr": 0.9}))
    with pytest.raises(ConfigError, match="client_lr 0.5 -> 0.9"):
        resume_config(out, {"rounds": 4}, allow_changes=("rounds",))
    cfg = resume_config(out, {"rounds": 4}, allow_changes=("rounds", "client_lr"))
    result = Experiment.from_config(cfg, resuming=True).run(resume=True)
    assert [r["round"] for r in result.history if r["kind"] == "train"] == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="unknown option 'roundz'; did you mean 'rounds'"):
        resume_config(out, {"roundz": 4})
    with pytest.raises(ConfigError, match="is not a run directory"):
        resume_config(tmp_path / "nothing")


def test_a_damaged_newest_checkpoint_falls_back(tmp_path):
    out = tmp_path / "run"
    cfg = config.resolve(NAME, rounds=4, checkpoint_every=1, out=str(out))
    exp = Experiment.from_config(cfg)
    stop = lambda rec: rec["kind"] == "train" and rec["round"] == 3 and exp.interrupt()  # noqa: E731
    with pytest.raises(Interrupted):
        exp.run(stop)
    newest = checkpoint.list_checkpoints(out)[-1][1]
    npz = newest.with_suffix(".npz")
    npz.write_bytes(npz.read_bytes()[:-7])  # torn
    with pytest.warns(UserWarning, match="ckpt-00000003"):
        result = Experiment.from_config(resume_config(out), resuming=True).run(resume=True)
    whole = Experiment.from_config(config.resolve(NAME, rounds=4)).run()
    assert_same_bits(whole.server.state, result.server.state)


def test_nonfinite_loss_stops_with_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    cfg = config.resolve(NAME, rounds=6, checkpoint_every=2, client_lr=1e30, out=str(out))
    with pytest.raises(NonFiniteError) as e:
        Experiment.from_config(cfg).run()
    message = str(e.value)
    assert message.startswith("round ") and "is nan" in message or "is inf" in message
    assert "\n" not in message
    found = checkpoint.list_checkpoints(out)
    if found:
        assert f"last good checkpoint is {found[-1][1]}" in message
    else:
        assert "no checkpoint was written yet" in message


def test_skip_nonfinite_clients_drops_and_counts():
    """A client whose data holds NaN poisons FedAvg; skipping drops just that client."""
    from fedjax_api import tasks
    from fedjax_core.data import InMemoryFederatedData
    from tests.fedjax_api import tiny_task

    def load(data_path):
        loaded = tiny_task._load(data_path)
        train = loaded.train
        clients = {cid: dict(train.get_client(i)) for i, cid in enumerate(train.client_ids)}
        clients["c2"]["x"] = np.full_like(clients["c2"]["x"], np.nan)
        return loaded._replace(train=InMemoryFederatedData(clients))

    entry = tasks.entry(NAME)
    tasks.register(entry._replace(name="tiny-nan-test", load=load))
    cfg = config.resolve("tiny-nan-test", rounds=2, clients_per_round=6)
    with pytest.raises(NonFiniteError, match="round 1: train/delta_norm is nan"):
        Experiment.from_config(cfg).run()
    cfg = config.resolve("tiny-nan-test", rounds=2, clients_per_round=6,
                         skip_nonfinite_clients=True)
    result = Experiment.from_config(cfg).run()
    train = [r for r in result.history if r["kind"] == "train"]
    assert [r["train/nonfinite_clients"] for r in train] == [1.0, 1.0]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.server.params))


DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import jax
    jax.config.update("jax_num_cpu_devices", 1)
    from tests.fedjax_api import tiny_task
    tiny_task.register()
    from cli.main import main
    sys.argv = ["fedjax"] + sys.argv[1:]
    main()
""")


def start_cli(tmp_path, *args):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=root))
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=root)


def wait_for(path_fn, proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if path_fn():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_sigkill_mid_run_resumes_from_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = start_cli(tmp_path, "run", NAME, "--rounds", "400", "--checkpoint-every", "5",
                     "--out", str(out))
    assert wait_for(lambda: len(checkpoint.list_checkpoints(out)) >= 2, proc), proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = checkpoint.list_checkpoints(out)[-1][0]
    assert done < 400
    proc = start_cli(tmp_path, "resume", str(out))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    # The uninterrupted run, in memory: its 80 checkpoints would change nothing it computes.
    whole = Experiment.from_config(config.resolve(NAME, rounds=400, checkpoint_every=5)).run()
    _, state, _ = checkpoint.load(out, template=whole.server.state)
    assert_same_bits(whole.server.state, state)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines if r["kind"] == "train"] == list(range(1, 401))


def test_ctrl_c_finishes_the_round_checkpoints_and_exits_130(tmp_path):
    out = tmp_path / "run"
    proc = start_cli(tmp_path, "run", NAME, "--rounds", "100000", "--checkpoint-every", "0",
                     "--out", str(out))
    assert wait_for(lambda: (out / "metrics.jsonl").exists()
                    and (out / "metrics.jsonl").stat().st_size > 0, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "resume with: fedjax resume" in stderr and "Traceback" not in stderr
    rounds = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert checkpoint.list_checkpoints(out)[-1][0] == rounds[-1]
