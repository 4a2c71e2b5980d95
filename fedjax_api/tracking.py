"""Experiment trackers: MLflow and Weights & Biases as callbacks of the round loop
(`--track mlflow[:URI]`, `--track wandb[:PROJECT]`, `Experiment(track=...)`).

Each tracker logs the run's config (as parameters), every record of every round (the
"train" record, and each "eval" record, whose `train/...` metrics of a sample of training
clients are named `eval/train/...`) with step = its round, the final table (the
metrics of the last evaluation, as `final/...` values and a `final_metrics.json`
artifact), and, when the run ends, the plot and report files of the run directory (its
top-level `.png .svg .pdf .html .md .csv .json .jsonl .toml` files). Both work offline:
MLflow writes a local store (default `./mlruns`), W&B writes its offline files under
`RUN_DIR/wandb/` unless `WANDB_MODE` says otherwise.

A tracked run's id is kept in `RUN_DIR/tracking.json`; `fedjax resume RUN_DIR` continues
the same tracked run. Rounds that a resumed run trains again (those after the checkpoint
it resumes from, which the stopped process had already logged) are not logged twice, so
the metric history stays continuous.

The packages are imported only when a tracker is used; `require` turns a missing one into
a one-line `ConfigError` naming the extra to install.

Example:
  >>> exp = Experiment.from_config(config.resolve("synthetic", rounds=5,
  ...                              track=("mlflow:./mlruns",), out="runs/a"))
  >>> exp.run()                    # one MLflow run in ./mlruns; `fedjax resume runs/a` continues it
"""

import importlib.util
import json
import math
import os
import re
import secrets
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from fedjax_api import rundir
from fedjax_api.errors import ConfigError
from fedjax_api.loop import Callback, Loop, final_metrics

__all__ = ["ARTIFACT_SUFFIXES", "STATE_FILE", "TRACKERS", "MLflowTracker", "WandbTracker",
           "callbacks", "parse", "read_state", "require"]

TRACKERS = {"mlflow": "mlflow", "wandb": "wandb"}
"""Tracker name -> the package it needs (and the extra of that name)."""

STATE_FILE = "tracking.json"
"""The file of the run directory that keeps each tracker's run id (and where it logs)."""

ARTIFACT_SUFFIXES = (".png", ".svg", ".pdf", ".html", ".md", ".csv", ".json", ".jsonl",
                     ".toml")
"""The files of the run directory (top level) uploaded when the run ends."""

_NOT_ARTIFACTS = (STATE_FILE, rundir.LOCK_FILE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def parse(spec: str) -> tuple[str, str | None]:
    """`"mlflow:./mlruns"` -> `("mlflow", "./mlruns")`; `"wandb"` -> `("wandb", None)`.

    Raises:
      ConfigError: the name is not a tracker.
    """
    name, sep, target = spec.partition(":")
    if name not in TRACKERS:
        raise ConfigError(f"unknown tracker {spec!r}: use --track mlflow[:URI] or --track "
                          "wandb[:PROJECT]")
    return name, (target or None) if sep else None


def require(specs: Sequence[str]) -> None:
    """Checks that each tracker of `specs` is known and its package installed (without
    importing it).

    Raises:
      ConfigError: `--track mlflow needs the mlflow extra: pip install 'fedjax-sim[mlflow]'`.
    """
    for spec in specs:
        name, _ = parse(spec)
        if not _installed(TRACKERS[name]):
            raise ConfigError(f"--track {name} needs the {name} extra: pip install "
                              f"'fedjax-sim[{name}]'")


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken one
        return False


def callbacks(specs: Sequence[str], out_dir: Path | None, params: dict[str, Any],
              resume_round: int | None = None) -> list[Callback]:
    """The tracker callbacks of `specs` (`--track` values), in order.

    Args:
      specs: e.g. `("mlflow:./mlruns", "wandb:my-project")`.
      out_dir: the run directory (keeps `tracking.json`); None: nothing to resume.
      params: the run's config, logged as parameters (nested dicts flattened with dots).
      resume_round: the checkpoint's round when the run resumes, else None.
    """
    require(specs)
    out: list[Callback] = []
    for spec in specs:
        name, target = parse(spec)
        cls = MLflowTracker if name == "mlflow" else WandbTracker
        out.append(cls(target, out_dir=out_dir, params=params, resume_round=resume_round))
    return out


def _flat_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}, "c": None}` -> `{"a.b": "1", "c": "None"}`."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            out.update(_flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) \
                else str(value)
    return out


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """A record's metrics: its numeric values but the round (the step). An "eval" record's
    `train/...` metrics (the evaluation of a sample of training clients) become
    `eval/train/...`, apart from the training rounds' own `train/...` at the same step."""
    rename = "eval/" if record.get("kind") == "eval" else ""
    return {(rename + k if k.startswith("train/") else k): float(v)
            for k, v in record.items() if k not in ("round", "member")
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _final(history: list[dict]) -> dict[str, float]:
    """`{"final/test/accuracy": ..., "final/train/loss": ...}` of the last evaluation."""
    return {f"final/{split}/{k}": float(v)
            for split, metrics in final_metrics(history).items() for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _artifacts(out_dir: Path | None) -> list[Path]:
    if out_dir is None or not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if p.is_file() and not p.is_symlink()
                  and p.suffix in ARTIFACT_SUFFIXES and p.name not in _NOT_ARTIFACTS)


def read_state(out_dir: Path | None) -> dict[str, Any]:
    """`tracking.json` of `out_dir` (`{}` when there is none, or it is unreadable)."""
    if out_dir is None:
        return {}
    try:
        state = json.loads((Path(out_dir) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(out_dir: Path | None, name: str, entry: dict[str, Any]) -> None:
    if out_dir is None:
        return
    state = read_state(out_dir)
    state[name] = entry
    rundir.write_json_atomic(Path(out_dir) / STATE_FILE, state)


class _Tracker(Callback):
    """What both trackers share: the records to skip after a resume, and how a run ends."""

    name = ""

    def __init__(self, target: str | None, *, out_dir: Path | None, params: dict[str, Any],
                 resume_round: int | None = None):
        self.target = target
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.params = params
        self.resume_round = resume_round
        self.saved = read_state(self.out_dir).get(self.name) if resume_round is not None \
            else None
        self.logged: dict[str, int] = {}  # kind -> the last round the tracker has
        self.ended = self.interrupted = False

    def skip(self, record: dict[str, Any]) -> bool:
        """A record of a round the tracked run holds already (replayed after a resume)."""
        last = self.logged.get(record.get("kind", ""))
        return last is not None and record.get("round", 0) <= last

    def on_record(self, loop: Loop, record: dict[str, Any]) -> None:
        if not self.skip(record):
            self.log(record["round"], _numbers(record))

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_interrupt(self, loop: Loop) -> None:
        self.interrupted = True

    def on_end(self, loop: Loop) -> None:
        self.ended = True
        self.final = _final(loop.history)
        self.final_round = loop.round


class MLflowTracker(_Tracker):
    """Logs the run to MLflow (`--track mlflow[:URI]`, the `mlflow` extra).

    URI is a tracking URI (`http://host:5000`, `sqlite:///mlflow.db`, `file:/path`) or a
    folder, default `./mlruns`: a local file store (MLflow 3 refuses one unless
    `MLFLOW_ALLOW_FILE_STORE=true`; this tracker sets it for a local folder). The run goes
    to the experiment `$MLFLOW_EXPERIMENT_NAME` (default `fedjax-sim`), named after the
    run directory, with the config as parameters, tags `fedjax.task`, `fedjax.algorithm`
    and `fedjax.run_dir`, each record's metrics at step = round, `final/...` metrics and
    the artifacts `final_metrics.json` and the run directory's plot/report files.

    Args:
      target: the URI or folder, or None (`./mlruns`).
      out_dir, params, resume_round: as `callbacks` takes them.
    """

    name = "mlflow"

    def on_start(self, loop: Loop) -> None:
        from mlflow.tracking import MlflowClient  # the mlflow extra

        uri = (self.saved or {}).get("tracking_uri") or _mlflow_uri(self.target)
        if uri.startswith("file:"):  # MLflow 3 keeps its file store behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(tracking_uri=uri)
        run = None
        if self.saved and self.saved.get("run_id"):
            try:
                run = client.get_run(self.saved["run_id"])
            except Exception as e:  # deleted, or another store: start a new one
                warnings.warn(f"cannot continue MLflow run {self.saved['run_id']} ({e}); "
                              "starting a new one", stacklevel=2)
        params = _flat_params(self.params)
        if run is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "fedjax-sim"
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            tags = {"fedjax.task": str(self.params.get("task", "")),
                    "fedjax.algorithm": str(self.params.get("algorithm", "")),
                    "fedjax.run_dir": str(self.out_dir or "")}
            run = client.create_run(experiment_id, tags=tags,
                                    run_name=self.out_dir.name if self.out_dir else None)
        else:  # a resume: parameters are immutable; the changed ones (rounds) become tags
            client.update_run(run.info.run_id, status="RUNNING")
            have = run.data.params
            for key, value in params.items():
                if key in have and have[key] != value:
                    client.set_tag(run.info.run_id, f"fedjax.resumed.{key}"[:250], value[:5000])
            params = {k: v for k, v in params.items() if k not in have}
            for kind, key in (("train", "round_time_s"), ("eval", "eval_time_s")):
                steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
                if steps:
                    self.logged[kind] = max(steps)
        self.run_id = run.info.run_id
        self._log_params(params)
        _write_state(self.out_dir, self.name, {"run_id": self.run_id, "tracking_uri": uri})

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes 100 parameters a batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_mlflow_key(k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):  # MLflow takes 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def on_close(self, loop: Loop) -> None:
        if not hasattr(self, "run_id"):
            return  # on_start failed
        if self.ended:
            self.log(self.final_round, self.final)
            self.client.log_dict(self.run_id, final_metrics(loop.history),
                                 "final_metrics.json")
        for path in _artifacts(self.out_dir):
            self.client.log_artifact(self.run_id, str(path))
        status = "FINISHED" if self.ended else "KILLED" if self.interrupted else "FAILED"
        self.client.set_terminated(self.run_id, status=status)


def _mlflow_uri(target: str | None) -> str:
    """A tracking URI: `target` when it has a scheme (`http:`, `sqlite:`, `file:`,
    `databricks`), else the folder `target` (default `./mlruns`) as an absolute `file:` URI,
    so that a resume from another folder finds it."""
    if target and (_SCHEME.match(target) or target in ("databricks",)):
        if target.startswith("file:") and not target.startswith("file:/"):  # file:./x
            return Path(target[5:]).resolve().as_uri()
        return target
    return Path(target or "mlruns").resolve().as_uri()


def _mlflow_key(key: str) -> str:
    """A metric name MLflow takes (letters, digits, `_ - . / :` and spaces)."""
    return re.sub(r"[^\w\-. /:]", "_", key)


class WandbTracker(_Tracker):
    """Logs the run to Weights & Biases (`--track wandb[:PROJECT]`, the `wandb` extra).

    Offline unless `WANDB_MODE` is set (e.g. `WANDB_MODE=online` after `wandb login`): the
    run's files go to `RUN_DIR/wandb/offline-run-*`, to upload later with `wandb sync`.
    The project is PROJECT (or `ENTITY/PROJECT`), else `$WANDB_PROJECT`, else
    `fedjax-sim`. Logs the config, each record's metrics at step = round, the final
    metrics in the summary and as a table (`final_table`), and the run directory's
    plot/report files (`run.save`). A resumed run continues the same run id
    (`resume="allow"`); offline, each part is its own `offline-run-*` folder of that id.

    Args:
      target: the project, or None.
      out_dir, params, resume_round: as `callbacks` takes them.
    """

    name = "wandb"

    def __init__(self, target: str | None, **kwargs: Any):
        super().__init__(target, **kwargs)
        if self.resume_round is not None and self.out_dir is not None:
            # W&B offline cannot be asked what it holds: the records metrics.jsonl holds
            # before this resume truncates it are what the stopped run logged.
            try:
                records = rundir.read_metrics(self.out_dir)
            except ConfigError:
                records = []
            for record in records:
                kind = record.get("kind", "")
                self.logged[kind] = max(self.logged.get(kind, 0), int(record.get("round", 0)))

    def on_start(self, loop: Loop) -> None:
        import wandb  # the wandb extra

        entity, _, project = (self.target or os.environ.get("WANDB_PROJECT")
                              or "fedjax-sim").rpartition("/")
        run_id = (self.saved or {}).get("id") or secrets.token_hex(4)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True,
                                  save_code=False, disable_git=True)
        self.run = wandb.init(
            project=project, entity=entity or None, id=run_id, resume="allow",
            dir=str(self.out_dir) if self.out_dir is not None else None,
            name=self.out_dir.name if self.out_dir is not None else None,
            config=self.params, mode=cast(Any, os.environ.get("WANDB_MODE") or "offline"),
            settings=settings, reinit="create_new")
        _write_state(self.out_dir, self.name, {"id": run_id, "project": project,
                                               "entity": entity or None})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def on_close(self, loop: Loop) -> None:
        if not hasattr(self, "run"):
            return  # on_start failed
        import wandb

        if self.ended:
            self.run.summary.update(self.final)
            table = final_metrics(loop.history)
            names = sorted(set(table["train"]) | set(table["test"]))
            rows: list[Any] = [[n, table["train"].get(n, math.nan), table["test"].get(n, math.nan)]
                    for n in names]
            self.run.log({"final_table": wandb.Table(columns=["metric", "train", "test"],
                                                     data=rows)}, step=self.final_round)
        for path in _artifacts(self.out_dir):
            self.run.save(str(path), base_path=str(self.out_dir), policy="now")
        self.run.finish(exit_code=0 if self.ended or self.interrupted else 1)
