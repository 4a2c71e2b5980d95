"""The run directory: resolved config (JSON) and one metrics line per round or evaluation.

A run directory holds:
- `config.json`: the resolved configuration (written atomically);
- `metrics.jsonl`: one JSON record per line, the source of truth: `{"round": r, "kind":
  "train", "train/loss": ..., "round_time_s": ...}` after round r, or `{"round": r, "kind":
  "eval", "test/accuracy": ..., "eval_time_s": ...}`; NaN and inf are written as the strings
  "nan", "inf", "-inf" so every line is plain JSON, and read back as floats;
- `train.csv`, `eval.csv`: the same records as spreadsheets, one per kind, with `round` and
  then the union of the kind's columns (an empty cell where a record lacks one);
- `tb/train`, `tb/eval`: TensorBoard event files, when asked for (the `tensorboard` extra).
  The two kinds are two TensorBoard runs, so the training-round `train/loss` and the final
  evaluation's `train/loss` stay apart and plot together;
- `.lock`: the owner's `fcntl.flock` and process id (`RunDirLock`).

Every file is written through `fedjax_core.atomic` (a new temporary file renamed into place;
appends never follow a link); `check_out` says whether a directory may take a run.
"""

import contextlib
import csv
import io
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from fedjax_api.errors import ConfigError
from fedjax_core import atomic

try:
    import fcntl
except ImportError:  # not POSIX: a run directory is not locked
    fcntl = None

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CSV_FILES = {"train": "train.csv", "eval": "eval.csv"}
TENSORBOARD_DIR = "tb"

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def check_writable_dir(path: Path) -> Path:
    """Creates `path` if needed and checks a file can be written there; else `ConfigError`.

    The probe is a new file of a random name (`atomic.create`), so a link planted in the
    folder is never followed."""
    if not str(path).strip():  # before Path(""), which is "."
        raise ConfigError("the output directory is empty (--out ''); give a directory name")
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = atomic.temp_path(path / ".fedjax-write-test")
        atomic.create(probe).close()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to output directory {str(path)!r} "
                          f"({e.strerror or e}); choose a writable --out") from None
    return path


def write_json_atomic(path: Path, obj: Any) -> None:
    """Writes JSON over `path` atomically (`fedjax_core.atomic.write_text`): a reader sees
    the old file or the new one, never half of one, and a link at `path` is replaced, not
    followed."""
    atomic.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _plain(value):
    """A JSON-safe float/int/str; NaN and inf become strings so every line parses."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _from_json(record: dict) -> dict:
    """A parsed record with the strings "nan", "inf", "-inf" of its metrics back as floats."""
    return {k: _NON_FINITE[v] if k != "kind" and isinstance(v, str) and v in _NON_FINITE else v
            for k, v in record.items()}


def _csv_cell(value) -> str:
    """A CSV cell: floats in their shortest exact form, NaN/inf as `nan`/`inf`/`-inf`."""
    value = _plain(value)
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)  # str(float) is its shortest round-tripping repr; str(nan) == "nan"


def _csv_text(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _columns(records: list[dict]) -> list[str]:
    """`round`, then every other key (but `kind`) in the order it first appears."""
    cols = {"round": None}
    for record in records:
        cols.update((k, None) for k in record if k != "kind")
    return list(cols)


def _metrics_text(records: list[dict]) -> str:
    return "".join(json.dumps({k: _plain(v) for k, v in r.items()}) + "\n" for r in records)


class MetricsLog:
    """Appends one complete JSON line per record and flushes it, so a crash never
    leaves half a line behind; mirrors each record into `<kind>.csv` and, when
    `tensorboard`, into TensorBoard event files under `run_dir/tb/<kind>/`.

    Args:
      run_dir: the run directory (it must exist).
      tensorboard: also write every numeric metric of every record as a TensorBoard scalar
        at step = round (needs tensorboardX, the `tensorboard` extra; else `ConfigError`).
      truncate_after_round: when resuming from round R, first rewrite `metrics.jsonl`
        (atomically) keeping only the records with round <= R, so the resumed run logs no
        round twice; TensorBoard hides the old events from step R + 1 on (`purge_step`).
      restore: with `truncate_after_round`, the records of rounds <= R as the checkpoint
        holds them (its history): those the file lost (a last line torn by a crash) are
        put back.

    An existing `metrics.jsonl` is appended to, after dropping a last line torn by a crash;
    the CSV files are rebuilt from it (atomically) so they always hold the same records.
    Every file is created by `fedjax_core.atomic` and appended to without following links:
    a link planted at one of these names is a one-line `ConfigError`.

    Example:
      >>> log = MetricsLog(run_dir)
      >>> log.write({"round": 1, "kind": "train", "train/loss": 2.3, "round_time_s": 0.5})
      >>> log.close()
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool = False,
                 truncate_after_round: int | None = None, restore: list[dict] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self._file: IO[str] | None = None
        self._csv: dict[str, tuple[Any, list[str]]] = {}  # kind -> (file, columns)
        self._tb = TensorBoardLog(run_dir, truncate_after_round) if tensorboard else None

        with refuse_links():
            if self.path.is_symlink():
                raise atomic.LinkRefused(self.path)
            records = None
            if self.path.exists():
                records = read_metrics(self.run_dir)
                if truncate_after_round is not None:
                    records = [r for r in records if r.get("round", 0) <= truncate_after_round]
                    if restore is not None and len(records) < len(restore):
                        # A torn last line lost records the checkpoint still holds.
                        records = records + [_from_json(r) for r in restore[len(records):]]
                    atomic.write_text(self.path, _metrics_text(records))
                else:
                    _drop_torn_tail(self.path)
            else:
                atomic.write_text(self.path, "")
            for kind in CSV_FILES:
                kept = [r for r in records or () if r.get("kind") == kind]
                csv_path = self.run_dir / CSV_FILES[kind]
                if kept:
                    cols = _columns(kept)
                    atomic.write_text(csv_path, _csv_text(
                        [cols] + [[_csv_cell(r.get(c)) for c in cols] for r in kept]))
                elif os.path.lexists(csv_path):
                    csv_path.unlink()  # a CSV without records in metrics.jsonl is stale
            self._file = atomic.open_append(self.path, encoding="utf-8")

    def write(self, record: dict) -> None:
        """Appends `record` (`round`, `kind` and metrics) to every log, flushed."""
        assert self._file is not None  # opened by __init__
        self._file.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        kind = record.get("kind")
        if kind in CSV_FILES:
            self._write_csv(kind, record)
            if self._tb is not None:
                self._tb.write(record)

    def _write_csv(self, kind: str, record: dict) -> None:
        path = self.run_dir / CSV_FILES[kind]
        if kind not in self._csv:
            cols = _read_csv_header(path)
            with refuse_links():
                f = atomic.open_append(path, newline="") if cols else None
            self._csv[kind] = (f, cols)
        f, cols = self._csv[kind]
        new = [k for k in _columns([record]) if k not in cols]
        if new:  # a new column: rewrite the file with the wider header (rare: first eval)
            if f is not None:
                f.close()
            rows = _read_csv_rows(path) if cols else []
            cols = cols + new
            atomic.write_text(path, _csv_text(
                [cols] + [row + [""] * (len(cols) - len(row)) for row in rows]))
            with refuse_links():
                f = atomic.open_append(path, newline="")
            self._csv[kind] = (f, cols)
        f.write(_csv_text([[_csv_cell(record.get(c)) for c in cols]]))
        f.flush()

    def close(self) -> None:
        """Closes every file (TensorBoard writers flush their events)."""
        if self._file is not None:
            self._file.close()
        for f, _ in self._csv.values():
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        self._csv = {}

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardLog:
    """TensorBoard event files of a run: every numeric metric of every record as a scalar
    at step = round, under `run_dir/tb/<kind>/` (needs tensorboardX, the `tensorboard`
    extra; else `ConfigError`, raised here, before anything is written).

    Args:
      run_dir: the run directory.
      truncate_after_round: when resuming from round R, TensorBoard hides the events of
        the earlier attempt from step R + 1 on (`purge_step`).

    Example:
      >>> tb = TensorBoardLog(run_dir)
      >>> tb.write({"round": 1, "kind": "train", "train/loss": 2.3})
      >>> tb.close()
    """

    def __init__(self, run_dir: Path, truncate_after_round: int | None = None):
        self.run_dir = Path(run_dir)
        self._summary_writer = _summary_writer()
        self._purge_step = None if truncate_after_round is None else truncate_after_round + 1
        self._writers: dict[str, Any] = {}

    def write(self, record: dict) -> None:
        """Adds the numeric metrics of a "train" or "eval" record (NaN too)."""
        kind = record.get("kind")
        if kind not in CSV_FILES:
            return
        writer = self._writers.get(kind)
        if writer is None:
            with refuse_links():  # the event files go into folders of the run, not a link's
                atomic.make_dir(self.run_dir / TENSORBOARD_DIR / kind, root=self.run_dir)
            # The suffix keeps a resumed run's file apart from, and sorted after, the first.
            writer = self._writers[kind] = self._summary_writer(
                logdir=str(self.run_dir / TENSORBOARD_DIR / kind), purge_step=self._purge_step,
                flush_secs=10, filename_suffix=f".{time.time_ns():020d}")
        step = int(record.get("round", 0))
        for key, value in record.items():
            if key in ("round", "kind"):
                continue
            if hasattr(value, "item"):
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):  # NaN too
                writer.add_scalar(key, float(value), global_step=step)

    def close(self) -> None:
        """Flushes and closes the event files."""
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def _summary_writer():
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError("TensorBoard logging needs the tensorboard extra: "
                          "pip install 'fedjax-sim[tensorboard]'") from None
    return SummaryWriter


@contextlib.contextmanager
def refuse_links() -> Iterator[None]:
    """Turns `fedjax_core.atomic.LinkRefused` (a link planted in the run directory) into a
    one-line `ConfigError`."""
    try:
        yield
    except atomic.LinkRefused as e:
        raise ConfigError(str(e)) from None


def _drop_torn_tail(path: Path) -> None:
    """Ends the file cleanly before appending: a last line without its newline is cut
    when it does not parse (a crash mid-write), else completed, as `read_metrics` reads it."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        try:
            whole = isinstance(json.loads(data[start:]), dict)
        except ValueError:
            whole = False
        if whole:
            f.write(b"\n")
        else:
            f.truncate(start)


def _read_csv_header(path: Path) -> list[str]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _read_csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of a run's `metrics.jsonl`, NaN/inf as floats.

    A last line that does not parse (a crash mid-write) is ignored; a bad line before it,
    or a missing file, is a `ConfigError` naming the file (and line).
    """
    path = Path(run_dir) / METRICS_FILE
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"no {METRICS_FILE} in {str(run_dir)!r}: not a fedjax run "
                          "directory (give the --out of a `fedjax run`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {str(path)!r}: {getattr(e, 'strerror', None) or e}"
                          ) from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = []
    for pos, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if pos == len(numbered) - 1:
                break  # torn by a crash mid-write
            raise ConfigError(f"{str(path)!r} line {lineno} is not a JSON record "
                              f"({getattr(e, 'msg', e)}); fix or delete that line") from None
        records.append(_from_json(record))
    return records


# --- one owner, and no run mixed into another ------------------------------------------------

LOCK_FILE = ".lock"
"""The run directory's lock file: `RunDirLock` holds an `fcntl.flock` on it and writes its
process id into it."""

STATUS_STARTING, STATUS_STARTED = "starting", "started"
"""config.json's "status": "starting" from when it is written until the first round's record
is logged, "started" afterwards. An --out holding a config.json (and no records or
checkpoints) is taken for a new run only when it says "starting"."""


class RunDirLock:
    """The owner of a run directory: an exclusive `fcntl.flock` on `RUN_DIR/.lock` (created
    without following a link), held from `acquire` to `release`, with the owner's process id
    in the file. A second owner, in this process or another, gets a one-line `ConfigError`:
    `RUN_DIR is in use by process N; ...`. The lock dies with its process (even on SIGKILL),
    so a stale `.lock` file never blocks a resume. A no-op where `fcntl` is missing.

    Example:
      >>> lock = RunDirLock("runs/x").acquire()
      >>> ...                                  # write the run
      >>> lock.release()
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        """Takes the lock (creating the run directory); `ConfigError` if another holds it."""
        if fcntl is None or self._fd is not None:
            return self
        check_writable_dir(self.run_dir)
        try:
            fd = atomic.open_lock(self.path)
        except OSError as e:
            raise ConfigError(str(e) if isinstance(e, atomic.LinkRefused) else
                              f"cannot create {str(self.path)!r} ({e.strerror or e}); "
                              "choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise ConfigError(in_use(self.run_dir, holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the lock file and releases the lock (once; later calls do nothing)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            os.close(fd)  # closing releases the flock

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def in_use(run_dir: Path, holder: int | None) -> str:
    """The one line that says another process owns `run_dir`."""
    who = f"process {holder}" if holder else "another process"
    return (f"{run_dir} is in use by {who}; wait for it to finish (or stop it) or choose "
            "another --out")


def _lock_holder(fd: int, tries: int = 20) -> int | None:
    """The process id written in a held lock file (waiting up to a second for the owner,
    who writes it right after taking the lock), or None."""
    for _ in range(tries):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    return None


def check_not_in_use(run_dir: Path) -> None:
    """`ConfigError` (`in_use`) when a live process holds `run_dir`'s lock, or when its lock
    file, `checkpoints/` or `tb/` is a link (planted: the run would refuse it later);
    writes nothing."""
    path = Path(run_dir) / LOCK_FILE
    for planted in (path, Path(run_dir) / "checkpoints", Path(run_dir) / TENSORBOARD_DIR):
        if planted.is_symlink():  # refused now, before any work, rather than mid-run
            raise ConfigError(str(atomic.LinkRefused(planted)))
    if fcntl is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return  # no lock file
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(in_use(Path(run_dir), _lock_holder(fd))) from None
    finally:
        os.close(fd)  # releases the probe's shared lock


def check_out(out: str | Path, *, new_run: bool = True, owned: bool = False,
              holds: tuple[str, ...] = ()) -> None:
    """`ConfigError` unless `out` may take the run: a directory name (not ''), no other
    process owns it (unless `owned`: this one holds its lock), and for a `new_run` it
    holds no `metrics.jsonl`, no checkpoint, and no `config.json` but one whose "status"
    is "starting" (a run that never trained a round) nor any of the files `holds`.
    Writes nothing.

    Example:
      >>> check_out(Path("runs/x"))          # before a new run writes into runs/x
    """
    from fedjax_api import checkpoint  # it imports this module

    if not str(out).strip():  # before Path(""), which is "."
        raise ConfigError("the output directory is empty (--out ''); give a directory name")
    out = Path(out)
    if not owned:
        check_not_in_use(out)
    if not new_run:
        return
    if (out / METRICS_FILE).exists():
        raise ConfigError(f"{str(out)!r} already holds a run ({METRICS_FILE}); "
                          "choose a new --out")
    if checkpoint.list_checkpoints(out):
        raise ConfigError(f"{str(out)!r} already holds a run ({checkpoint.CHECKPOINT_DIR}/); "
                          "choose a new --out")
    for name in holds:
        if os.path.lexists(out / name):
            raise ConfigError(f"{str(out)!r} already holds a run ({name}); choose a new --out")
    config = out / CONFIG_FILE
    if os.path.lexists(config) and _status(config) != STATUS_STARTING:
        raise ConfigError(f"{str(out)!r} holds a {CONFIG_FILE} that is not of a run that never "
                          f"started; choose a new --out (or delete {CONFIG_FILE})")


def _status(config: Path) -> str | None:
    """config.json's "status", or None (unreadable, a link, not a fedjax config)."""
    if config.is_symlink():
        return None
    try:
        saved = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved.get("status") if isinstance(saved, dict) else None
