"""Resuming a run directory: the saved config, what may change, and the experiment to continue.

A run directory holds `config.json` (the resolved config the run started with) and
`checkpoints/` (each manifest records the config it was written under). Resuming rebuilds
the experiment from that config, so every later round samples the same clients, batches and
keys as a run that never stopped. A change (a longer `--rounds`, or an edit of config.json)
is refused unless `allow_changes` names every changed option; only the options declared
resumable (`fedjax_api.options.option`) may change.
"""

import json
import warnings
from pathlib import Path
from typing import Any

from fedjax_api import checkpoint, rundir
from fedjax_api.config import OPTIONS, ExperimentConfig
from fedjax_api.errors import ConfigError, unknown
from fedjax_api.options import Schema
from fedjax_api.versions import versions

COMPARED_VERSIONS = ("fedjax_sim", "jax", "jaxlib", "optax", "numpy")
"""The libraries whose versions a resume compares with config.json's (the git commit of a
clone is not: it changes with every edit)."""


class VersionWarning(UserWarning):
    """A run resumes under other library versions than it started with."""


def version_changes(saved: object, current: dict | None = None) -> str:
    """`"jax 0.4.30 -> 0.4.31, numpy ..."`: the libraries of `COMPARED_VERSIONS` whose
    version in `saved` (config.json's "versions") differs from `current` (default:
    `versions()`), or "" when none does (or `saved` records none).

    Example:
      >>> version_changes({"jax": "0.4.30"}, {"jax": "0.4.31"})
      'jax 0.4.30 -> 0.4.31'
    """
    if not isinstance(saved, dict):
        return ""
    current = versions() if current is None else current
    return ", ".join(f"{name} {saved[name]} -> {current.get(name)}" for name in COMPARED_VERSIONS
                     if name in saved and name in current and saved[name] != current[name])

NOT_CONFIG = ("versions", "resolved", "status")
"""Keys of config.json that record facts of the run rather than options."""


def _options(saved: dict) -> dict[str, Any]:
    return {k: v for k, v in saved.items() if k not in NOT_CONFIG}


def _with_calibrated_noise(options: dict[str, Any], calibrated: float | None) -> dict[str, Any]:
    """A private run's options with its `--dp-epsilon` target replaced by the noise
    multiplier it was calibrated to (config.json's "resolved"): a resumed run keeps that
    noise (a longer run spends more epsilon), and its checkpoints record it so; comparing
    in this form lets every later resume find the same config."""
    if options.get("dp_epsilon") is None or calibrated is None:
        return options
    return {**options, "dp_epsilon": None, "noise_multiplier": calibrated}


def _checkpoint_config(run_dir: Path) -> dict | None:
    """The config recorded by the newest checkpoint whose manifest parses."""
    for _, manifest in reversed(checkpoint.list_checkpoints(run_dir)):
        try:
            meta = json.loads(Path(manifest).read_text()).get("meta", {})
        except (OSError, ValueError):
            continue
        if isinstance(meta.get("config"), dict):
            return _options(meta["config"])
    return None


def _refuse_unresumable(refused: list[str], base: dict, new: dict, path: Path,
                        schema: Schema) -> None:
    """Refuses the changes that `--allow-changes` cannot accept, so that it is suggested only
    for those it can: a key of config.json that is no option, or a non-resumable option."""
    strange = [k for k in refused if k not in schema.by_field]
    if strange and strange[0] in new:
        raise ConfigError(f"{path} holds {', '.join(map(repr, strange))}, not an option of "
                          f"{schema.config_class.__name__}; remove it from the file (or restore "
                          "the file) to resume")
    if strange:
        raise ConfigError(f"the checkpoint's config holds {', '.join(map(repr, strange))}, not "
                          f"an option of this version of {schema.config_class.__name__}; resume "
                          "with the version that wrote it, or start a new run")
    fixed = [k for k in refused if not schema.by_field[k].resumable]
    if fixed:
        what = ", ".join(f"{k} {base.get(k)!r} -> {new.get(k)!r}" for k in fixed)
        raise ConfigError(f"the config differs from the checkpoint's in {what}, which cannot "
                          f"change when a run resumes; restore {path.name}, or start a new "
                          f"run: fedjax run --config {path.parent / 'config.toml'} --out NEW_DIR")


def resume_config(run_dir: Path, overrides: dict[str, Any] | None = None,
                  allow_changes: tuple[str, ...] = (),
                  schema: Schema = OPTIONS) -> ExperimentConfig:
    """The config to continue `run_dir` with.

    Args:
      run_dir: a run directory written by `Experiment` (config.json and checkpoints/).
      overrides: options to change, e.g. `{"rounds": 200}` to train longer.
      allow_changes: option names whose change is accepted (resumable ones).
      schema: the options (of `ExperimentConfig`, or of a config class of one's own).

    Returns:
      The `ExperimentConfig`, with `out` set to `run_dir`.

    Raises:
      ConfigError: not a run directory, no checkpoint, an unknown option, or a change
        (from `overrides` or an edited config.json) that `allow_changes` does not name.

    Example:
      >>> cfg = resume_config(Path("runs/x"), {"rounds": 200}, allow_changes=("rounds",))
    """
    run_dir = Path(run_dir)
    path = run_dir / rundir.CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
        saved = _options(raw)
    except FileNotFoundError:
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no {rundir.CONFIG_FILE})"
                          ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not checkpoint.list_checkpoints(run_dir):
        raise ConfigError(f"{str(run_dir)!r} has no checkpoint to resume from; start it again "
                          "with `fedjax run`")
    for key in list(overrides or {}) + list(allow_changes):
        if key not in schema.by_field:
            raise unknown("option", key, schema.by_field)
        if not schema.by_field[key].resumable:
            raise ConfigError(f"{key} cannot change when a run resumes (its checkpoint and "
                              f"records depend on it); start a new run instead: fedjax run "
                              f"--config {run_dir / 'config.toml'} --out NEW_DIR")
    calibrated = (raw.get("resolved") or {}).get("noise_multiplier")
    base = _with_calibrated_noise(_checkpoint_config(run_dir) or saved, calibrated)
    new = _with_calibrated_noise({**saved, **(overrides or {}), "out": str(run_dir)}, calibrated)
    changed = sorted(k for k in set(new) | set(base)
                     if k != "out" and new.get(k) != base.get(k))
    refused = [k for k in changed if k not in allow_changes]
    _refuse_unresumable(refused, base, new, path, schema)
    if refused:
        what = ", ".join(f"{k} {base.get(k)!r} -> {new.get(k)!r}" for k in refused)
        raise ConfigError(f"the config differs from the checkpoint's ({what}); pass "
                          f"--allow-changes {','.join(refused)} to resume anyway")
    changed_versions = version_changes(raw.get("versions"))
    if changed_versions:
        warnings.warn(VersionWarning(
            f"resuming {run_dir} under other versions than it started with "
            f"({changed_versions}); later rounds may differ from an uninterrupted run"),
            stacklevel=2)
    try:
        return schema.config_class(**new)
    except TypeError as e:
        raise ConfigError(f"{path} does not hold a valid config ({e})") from None
