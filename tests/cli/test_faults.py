"""Real `fedjax` processes under faults: two runs racing on one --out, SIGTERM mid-run then
`fedjax resume` (equal to an uninterrupted run), and Ctrl-C or SIGTERM during start-up
(issue 15). docs/cli.md "What survives what" cites these tests."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np

from fedjax_api import Experiment, checkpoint, config
from tests.fedjax_api.tiny_task import NAME

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The console script (`cli.entry:main`) with the tiny task, and a task whose loading waits
# (so that a signal lands during start-up) after writing the marker file $FEDJAX_TEST_MARKER.
DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from cli import process
    process.install()
    import os, time
    import jax
    jax.config.update("jax_num_cpu_devices", 1)
    from fedjax_api import tasks
    from tests.fedjax_api import tiny_task
    tiny_task.register()

    def slow_load(data_path):
        open(os.environ["FEDJAX_TEST_MARKER"], "w").close()
        time.sleep(120)
        return tiny_task._load(data_path)

    tasks.register(tasks.entry(tiny_task.NAME)._replace(name="tiny-slow-load", load=slow_load))
    from cli.entry import main
    # Started ahead, imports done: the command runs once this file holds something.
    wait = os.environ.get("FEDJAX_TEST_WAIT_FOR")
    if wait:
        import cli.main  # noqa: F401  (what main() imports first)
    end = time.time() + 180
    while wait and time.time() < end and not (os.path.exists(wait) and os.path.getsize(wait)):
        time.sleep(0.02)
    sys.argv = ["fedjax"] + sys.argv[1:]
    main()
""")


def start(tmp_path, *args, wait_for=None):
    """A `fedjax` process; with `wait_for`, it starts (imports) now but runs the command
    only once that file is non-empty (up to 180 s)."""
    script = tmp_path / "driver.py"
    if not script.exists():
        script.write_text(DRIVER.format(root=ROOT))
    env = {**os.environ, "FEDJAX_TEST_MARKER": str(tmp_path / "loading"),
           "FEDJAX_COMPILATION_CACHE": "0"}
    if wait_for is not None:
        env["FEDJAX_TEST_WAIT_FOR"] = str(wait_for)
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def wait_for(condition, proc, timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def strip_times(history):
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in history]


def lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


def test_sigterm_checkpoints_a_second_run_is_refused_and_resume_is_exact(tmp_path):
    out = tmp_path / "run"
    args = ["run", NAME, "--rounds", "1000000", "--checkpoint-every", "0", "--out", str(out)]
    first = start(tmp_path, *args)
    # The same --out while the first trains: started together (their start-ups overlap, so
    # the first trains few rounds before the SIGTERM and the uninterrupted reference below
    # is short), the second's command runs once the first has written a record.
    second = start(tmp_path, *args, wait_for=out / "metrics.jsonl")
    assert wait_for(lambda: (out / "metrics.jsonl").exists()
                    and (out / "metrics.jsonl").stat().st_size > 0, first), first.stderr.read()

    _, err = second.communicate(timeout=300)
    assert second.returncode == 2, err
    assert lines(err) == [f"error: {out} is in use by process {first.pid}; wait for it to "
                          "finish (or stop it) or choose another --out"]

    first.send_signal(signal.SIGTERM)  # a scheduler's pre-emption
    _, err = first.communicate(timeout=300)
    assert first.returncode == 143, err
    (line,) = lines(err)
    done = int(re.fullmatch(r"error: terminated \(SIGTERM\) after round (\d+); resume with: "
                            rf"fedjax resume {re.escape(str(out))}", line).group(1))
    assert 0 < done and checkpoint.list_checkpoints(out)[-1][0] == done

    total = done + 7  # the rounds option decides nothing but where the run ends
    resumed = start(tmp_path, "resume", str(out), "--rounds", str(total),
                    "--allow-changes", "rounds")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert json.loads((out / "config.json").read_text())["rounds"] == total
    whole = Experiment.from_config(config.resolve(NAME, rounds=total, checkpoint_every=0,
                                                  out=str(tmp_path / "whole"))).run()
    _, state, _ = checkpoint.load(out, template=whole.server.state)
    jax.tree.map(np.testing.assert_array_equal, whole.server.state, state)
    assert strip_times(records(out)) == strip_times(whole.history)  # no record twice


def test_two_runs_started_together_one_wins(tmp_path):
    out = tmp_path / "run"
    args = ["run", NAME, "--rounds", "40", "--checkpoint-every", "10", "--out", str(out)]
    procs = [start(tmp_path, *args) for _ in range(2)]
    results = [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=600)]]
    assert sorted(code for code, _ in results) == [0, 2], results
    (err,) = [err for code, err in results if code == 2]
    (line,) = lines(err)
    assert re.fullmatch(rf"error: ({re.escape(str(out))} is in use by process \d+; .*|"
                        rf"'{re.escape(str(out))}' already holds a run \(metrics\.jsonl\); "
                        "choose a new --out)", line), line
    kept = records(out)
    assert [r["round"] for r in kept if r["kind"] == "train"] == list(range(1, 41))
    assert [r["kind"] for r in kept].count("eval") == 1


def test_ctrl_c_or_sigterm_during_start_up_is_one_line(tmp_path):
    for sig, code, name, twice in [(signal.SIGINT, 130, "Ctrl-C", False),
                                   (signal.SIGINT, 130, "Ctrl-C", True),
                                   (signal.SIGTERM, 143, "SIGTERM", False)]:
        (tmp_path / "loading").unlink(missing_ok=True)
        proc = start(tmp_path, "run", "tiny-slow-load", "--out", str(tmp_path / "never"))
        assert wait_for(lambda: (tmp_path / "loading").exists(), proc), proc.stderr.read()
        proc.send_signal(sig)
        if twice:
            time.sleep(0.2)
            if proc.poll() is None:
                proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        # A second Ctrl-C may land after Python restored the default handler on its way
        # out (then the process ends by the signal, -2): never with a traceback.
        assert proc.returncode == code or (twice and proc.returncode == -sig), err
        assert "Traceback" not in err and "Exception ignored" not in err, err
        assert lines(err) == [f"error: aborted ({name}); run the command again (a run with a "
                              "checkpoint continues with `fedjax resume RUN_DIR`)"], err
        assert not (tmp_path / "never").exists()
