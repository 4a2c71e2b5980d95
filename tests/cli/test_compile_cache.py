"""The persistent compilation cache: a second process compiles nothing new."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from fedjax_api import compile_cache

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import jax
    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    from fedjax_api.compile_cache import enable_compilation_cache
    assert enable_compilation_cache({cache!r}, min_compile_seconds=0.0) is not None
    from fedjax_api import Experiment, config
    from tests.fedjax_api import tiny_task
    tiny_task.register()
    Experiment.from_config(config.resolve(tiny_task.NAME, rounds=2)).run()
    hits = sum(e.endswith("/cache_hits") for e in events)
    misses = sum(e.endswith("/cache_misses") for e in events)
    print(f"hits={{hits}} misses={{misses}}")
""")


def entries(path: Path) -> set[str]:
    return {p.name for p in path.rglob("*") if p.is_file()}


def test_second_process_reuses_the_compiled_round(tmp_path):
    cache = tmp_path / "cache"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=str(ROOT), cache=str(cache)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    def run():
        out = subprocess.run([sys.executable, str(script)], check=True, env=env, cwd=ROOT,
                             capture_output=True, text=True).stdout
        hits, misses = (int(x.split("=")[1]) for x in out.split()[-2:])
        return hits, misses

    hits, misses = run()
    assert hits == 0 and misses > 0
    first = entries(cache)
    assert first, "the first process stored no executables"
    hits, misses = run()
    assert hits > 0 and misses == 0  # every compilation came from the cache
    assert entries(cache) == first


def test_default_directory_and_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDJAX_DATA", str(tmp_path / "data"))
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    assert compile_cache.default_dir() == tmp_path / "data" / "jax-compilation"
    monkeypatch.setenv(compile_cache.ENV, "0")
    assert compile_cache.default_dir() is None
    assert compile_cache.enable_compilation_cache() is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "elsewhere"))
    assert compile_cache.default_dir() == tmp_path / "elsewhere"
