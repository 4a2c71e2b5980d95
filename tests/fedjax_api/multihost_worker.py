"""One process of tests/fedjax_api/test_multihost.py: joins the others, runs an Experiment.

Usage: python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT ALGORITHM OUT_DIR [resume]
   or: python multihost_worker.py cli FEDJAX_ARGS...  (`fedjax FEDJAX_ARGS...` with the
       tests' tiny task registered)

Each process has 2 CPU devices; the mesh spans every process's devices. The process
writes its final server state and train metrics to OUT_DIR/process{ID}.npz; the run
directory OUT_DIR/run is written by process 0 only. With `resume`, the run stops after
round 2 and every process resumes it from process 0's checkpoint to round 3.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FEDJAX_COMPILATION_CACHE", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # CPU devices, on any machine
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import attrs  # noqa: E402
import jax  # noqa: E402

from fedjax_api import config, distributed  # noqa: E402
from fedjax_api.experiment import Experiment  # noqa: E402
from tests.fedjax_api import tiny_task  # noqa: E402


def main(process_id: int, num_processes: int, port: int, algorithm: str, out: Path,
         resume: bool = False) -> None:
    jax.config.update("jax_num_cpu_devices", 2)  # before any JAX operation
    assert distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    assert jax.process_count() == num_processes and len(jax.devices()) == 2 * num_processes
    tiny_task.register()
    cfg = config.resolve(tiny_task.NAME, algorithm=algorithm, rounds=2 if resume else 3,
                         clients_per_round=5, eval_every=2, checkpoint_every=2, devices=0,
                         out=str(out / "run"))
    exp = Experiment.from_config(cfg)
    assert exp.plan.mesh.size == 2 * num_processes
    result = exp.run()
    if resume:
        cfg = attrs.evolve(cfg, rounds=3)
        result = Experiment.from_config(cfg, resuming=True).run(resume=True)
    leaves = jax.tree.leaves(jax.device_get(result.server.state))
    losses = [r["train/loss"] for r in result.history if r["kind"] == "train"]
    accuracy = [r["test/accuracy"] for r in result.history if r["kind"] == "eval"]
    import numpy as np
    np.savez(out / f"process{process_id}.npz", *leaves, losses=np.asarray(losses),
             accuracy=np.asarray(accuracy))


if __name__ == "__main__":
    if sys.argv[1] == "cli":
        tiny_task.register()
        from cli.main import main as fedjax
        sys.argv = ["fedjax"] + sys.argv[2:]
        fedjax()
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5]),
         sys.argv[6:] == ["resume"])
