"""The run directory: resolved config (JSON) and one metrics line per round or evaluation."""

import json
import math
import os
from pathlib import Path
from typing import Any

from fedjax_api.errors import ConfigError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


def check_writable_dir(path: Path) -> Path:
    """Creates `path` if needed and checks a file can be written there; else `ConfigError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".fedjax-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to output directory {str(path)!r} "
                          f"({e.strerror or e}); choose a writable --out") from None
    return path


def write_json_atomic(path: Path, obj: Any) -> None:
    """Writes JSON to a temporary file, fsyncs it, and renames it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _plain(value):
    """A JSON-safe float/int/str; NaN and inf become strings so every line parses."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Appends one complete JSON line per record and flushes it, so a crash never
    leaves half a line behind."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE
        self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of a run's `metrics.jsonl`."""
    with open(Path(run_dir) / METRICS_FILE) as f:
        return [json.loads(line) for line in f if line.strip()]
