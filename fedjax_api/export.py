"""Model export: a run's global params as safetensors, an Orbax checkpoint or `.npz`, with a
JSON sidecar (`fedjax export RUN_DIR --format safetensors OUT`).

`export(run_dir, out, format)` reads the final checkpoint of `run_dir` (or, with `best`,
the kept checkpoint whose evaluation has the best value of a metric), rebuilding the
run's task, model and algorithm from its config.json to read the checkpoint, and writes
the params to `out` and `out + ".json"` (the sidecar: model, task, algorithm, round, that
round's metrics, and each leaf's key path, shape and dtype). `load(out)` gives them back.

The leaves are named by their key path joined with `/` (`dense/w`); a model whose params
are nested dicts (every built-in one) comes back in its own structure, any other (a tuple,
an Equinox module) with `load(out, template=model.init(key))`.

Formats (each its extra, imported only when used):
  safetensors  one file, `safetensors.numpy` (the sidecar is also in its metadata)
  orbax        a folder, `orbax.checkpoint.StandardCheckpointer` (the `orbax` extra, or flax)
  npz          one file, `np.savez` (read back with allow_pickle=False)

The data and the sidecar are written to temporary names and renamed, the sidecar last:
nothing half-written is left under OUT, and `load` refuses data without its sidecar.

Example:
  >>> export.export("runs/a", "model.safetensors", "safetensors")
  >>> params, info = export.load("model.safetensors")
  >>> info["round"], info["metrics"]["test/accuracy"]
"""

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import jax
import numpy as np

from fedjax_api import checkpoint, rundir
from fedjax_api.errors import ConfigError
from fedjax_api.versions import versions
from fedjax_core import atomic

__all__ = ["FORMATS", "SIDECAR_FORMAT", "best_round", "export", "flatten", "load",
           "unflatten"]

FORMATS = {"safetensors": "safetensors", "orbax": "orbax", "npz": None}
"""Export format -> the package (and extra) it needs (npz: none)."""

SIDECAR_FORMAT = "fedjax-sim export"
_LOWER_IS_BETTER = ("loss", "error", "perplexity", "time")


def _key_name(entry: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey / FlattenedIndexKey, GetAttrKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten(params: Any) -> dict[str, np.ndarray]:
    """`{"dense": {"w": w, "b": b}}` -> `{"dense/b": b, "dense/w": w}` (numpy, leaf order).

    Example:
      >>> list(flatten({"a": {"w": np.zeros(2)}}))
      ['a/w']
    """
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(_key_name(e) for e in path) or "params"
        if name in out:
            raise ValueError(f"two leaves of the params are both named {name!r}")
        out[name] = np.asarray(leaf)
    return out


def unflatten(arrays: dict[str, np.ndarray], template: Any = None) -> Any:
    """The inverse of `flatten`: nested dicts of `arrays` by their `/` paths, or, given a
    `template` (a pytree of the params' structure), that structure.

    Raises:
      ConfigError: the names do not match the template's.
    """
    if template is None:
        tree: dict[str, Any] = {}
        for name, array in arrays.items():
            *parents, last = name.split("/")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = array
        return tree
    names = list(flatten(jax.tree.map(lambda x: np.zeros((), getattr(x, "dtype", None)),
                                      template)))
    if sorted(names) != sorted(arrays):
        raise ConfigError(f"the exported params ({', '.join(sorted(arrays))}) do not match "
                          f"the template's ({', '.join(sorted(names))})")
    return jax.tree.unflatten(jax.tree.structure(template), [arrays[n] for n in names])


def _require(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of: "
                          f"{', '.join(FORMATS)}")
    package = FORMATS[fmt]
    if package is not None:
        try:
            __import__(package)
        except ImportError:
            raise ConfigError(f"--format {fmt} needs the {fmt} extra: pip install "
                              f"'fedjax-sim[{fmt}]'") from None


def _sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def best_round(history: Sequence[dict], rounds: Sequence[int], metric: str) -> int:
    """The round among `rounds` (the kept checkpoints') whose "eval" record has the best
    `metric` (`test/accuracy`; a bare name means `test/NAME`): the lowest for names with
    loss, error, perplexity or time in them, else the highest.

    Raises:
      ConfigError: no kept checkpoint is at a round evaluated with `metric`.
    """
    key = metric if "/" in metric else f"test/{metric}"
    values = {r["round"]: r[key] for r in history
              if r.get("kind") == "eval" and isinstance(r.get(key), (int, float))}
    kept = [r for r in rounds if r in values]
    if not kept:
        raise ConfigError(
            f"no kept checkpoint (rounds {', '.join(map(str, rounds)) or 'none'}) is at a round "
            f"evaluated with {key} (rounds {', '.join(map(str, sorted(values))) or 'none'}); "
            "evaluate and checkpoint at the same rounds (--eval-every N --checkpoint-every N "
            "--keep-checkpoints K), or export the final params")
    lower = any(word in key for word in _LOWER_IS_BETTER)
    return (min if lower else max)(kept, key=lambda r: (values[r], -r) if lower
                                   else (values[r], -r))


def _params_of(run_dir: Path, best: str | None) -> tuple[Any, dict[str, Any]]:
    """The params of the final (or best) checkpoint of `run_dir`, and the sidecar's facts."""
    from fedjax_api.experiment import Experiment  # the facade, to rebuild the run
    from fedjax_api.resume import resume_config
    from fedjax_api.server import Server

    if not (run_dir / rundir.CONFIG_FILE).is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no "
                          f"{rundir.CONFIG_FILE})")
    found = checkpoint.list_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"{str(run_dir)!r} has no checkpoint to export; train it with "
                          "`fedjax run` (every run writes one after its last round)")
    cfg = resume_config(run_dir)
    exp = Experiment.from_config(attrs.evolve(cfg, out=None, track=()))  # reads only
    server = Server.create(exp.algorithm, exp.task.model, seed=exp.seed)
    manifests = dict(found)
    if best is None:
        done, state, meta = checkpoint.load(run_dir, template=server.state)
    else:
        newest = json.loads(found[-1][1].read_text()).get("meta", {})
        chosen = best_round(newest.get("history", []), [r for r, _ in found], best)
        done, state, meta = checkpoint.load(manifests[chosen], template=server.state)
    history = meta.get("history", [])
    evals = [r for r in history if r.get("kind") == "eval" and r.get("round", -1) <= done]
    trains = [r for r in history if r.get("kind") == "train" and r.get("round") == done]
    metrics = {k: v for r in (trains[-1:] + evals[-1:]) for k, v in r.items()
               if k not in ("round", "kind")}
    init = exp.task.model.init
    model = f"{init.__module__}.{init.__qualname__.split('.<locals>')[0]}"
    info = {"format": SIDECAR_FORMAT, "version": 1, "model": model, "task": cfg.task,
            "algorithm": cfg.algorithm, "round": done, "selected_by": best or "final",
            "metrics": metrics, "metrics_round": evals[-1]["round"] if evals else None,
            "run_dir": str(run_dir), "versions": versions()}
    return jax.device_get(state.params), info


def export(run_dir: str | os.PathLike, out: str | os.PathLike, format: str, *,
           best: str | None = None, force: bool = False) -> dict[str, Any]:
    """Writes the final (or `best`) global params of `run_dir` to `out` in `format`.

    Args:
      run_dir: a run directory of `fedjax run` (config.json and a checkpoint).
      out: the file (safetensors, npz) or folder (orbax) to write; the sidecar is
        `out + ".json"`.
      format: "safetensors", "orbax" or "npz".
      best: a metric (`test/accuracy`, `loss`): export the kept checkpoint whose
        evaluation has the best value of it (see `best_round`) instead of the newest.
      force: replace an existing `out` (and its sidecar).

    Returns:
      The sidecar's content (`model`, `task`, `algorithm`, `round`, `metrics`, `keys`, ...).

    Raises:
      ConfigError: an unknown format or its package missing, `out` exists (without
        `force`), no run directory or no checkpoint, or no evaluated checkpoint for `best`.
    """
    _require(format)
    run_dir, out = Path(run_dir), Path(out)
    if not force and (out.exists() or _sidecar(out).exists()):
        raise ConfigError(f"{str(out)!r} exists; choose another name or pass --force to "
                          "replace it")
    params, info = _params_of(run_dir, best)
    arrays = flatten(params)
    info = {**info, "export_format": format, "file": out.name,
            "keys": [{"name": k, "shape": list(a.shape), "dtype": str(a.dtype)}
                     for k, a in arrays.items()]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.temp_path(out)
    try:
        if format == "safetensors":
            from safetensors.numpy import save  # the safetensors extra

            atomic.write_bytes(tmp, save({k: np.ascontiguousarray(a) for k, a in arrays.items()},
                                         metadata={"fedjax": json.dumps(info)}))
        elif format == "npz":
            with atomic.create(tmp) as f:
                np.savez(f, allow_pickle=False, **arrays)
                f.flush()
                os.fsync(f.fileno())
        else:
            import orbax.checkpoint as ocp  # the orbax extra (or flax's)

            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(tmp.resolve() / "params", unflatten(arrays))
                ckptr.wait_until_finished()
        _replace(tmp, out)
    finally:
        _remove(tmp)
    rundir.write_json_atomic(_sidecar(out), info)  # last: it commits the export
    return info


def _replace(tmp: Path, out: Path) -> None:
    """Renames `tmp` over `out` (a folder over a folder too: the old one is set aside
    first and removed after)."""
    if out.is_dir() and not out.is_symlink():
        old = atomic.temp_path(out)
        os.replace(out, old)
        os.replace(tmp, out)
        _remove(old)
    else:
        os.replace(tmp, out)
    atomic.fsync_dir(out.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def load(path: str | os.PathLike, template: Any = None) -> tuple[Any, dict[str, Any]]:
    """Reads an export back: `(params, info)`, `info` its sidecar.

    Args:
      path: the OUT of `export` (its sidecar `path + ".json"` beside it).
      template: a pytree of the params' structure (e.g. `model.init(key)`); None: nested
        dicts by key path (the structure of every built-in model's params).

    Returns:
      The params (numpy arrays) and the sidecar (`model`, `task`, `round`, `metrics`, ...).

    Raises:
      ConfigError: no sidecar (not an export, or one interrupted), or unreadable data.

    Example:
      >>> params, info = load("model.safetensors")
      >>> task.model.apply(params, batch)
    """
    path = Path(path)
    try:
        info = json.loads(_sidecar(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{str(path)!r} has no sidecar {_sidecar(path).name}: not a fedjax "
                          "export, or its export was interrupted; export it again") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {_sidecar(path)}: {e}") from None
    fmt = info.get("export_format") if isinstance(info, dict) else None
    if not isinstance(info, dict) or info.get("format") != SIDECAR_FORMAT or fmt not in FORMATS:
        raise ConfigError(f"{_sidecar(path)} is not a fedjax export sidecar")
    _require(fmt)
    names = [k["name"] for k in info["keys"]]
    if fmt == "safetensors":
        from safetensors.numpy import load_file

        loaded = load_file(str(path))
    elif fmt == "npz":
        with np.load(path, allow_pickle=False) as f:
            loaded = {k: f[k] for k in f.files}
    else:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            loaded = flatten(ckptr.restore(path.resolve() / "params"))
    arrays = {n: np.asarray(loaded[n]) for n in names}
    return unflatten(arrays, template), info
