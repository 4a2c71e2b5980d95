#!/usr/bin/env bash
# Builds the sdist and the wheel (`python -m build`), checks what each holds, installs each
# into a fresh virtual environment and smoke-tests the install: the three packages import
# from the install, `fedjax --help`, `fedjax algorithms` and a 2-round `fedjax run synthetic`.
# Also checks that building and `pip install -e` print no setuptools deprecation warning.
#
# Usage: scripts/check_dist.sh   (or `make dist-check`). Needs git and Python >= 3.11 as
# $PYTHON (default python3); pip fetches `build` and the dependencies from the package index.
# Works on a copy of the tracked and untracked-but-not-ignored files, in a temporary
# directory that is removed at the end (KEEP=1 keeps it); writes nothing in the checkout.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fedjax-dist.XXXXXX")
if [[ "${KEEP:-0}" == 1 ]]; then
  echo "keeping $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi
START=$SECONDS

step() { printf '== %s (at %d s)\n' "$*" $((SECONDS - START)); }
fail() { echo "check_dist: $*" >&2; exit 1; }

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || fail "$PYTHON is older than Python 3.11; run with PYTHON=python3.11 (or newer)"
git -C "$ROOT" rev-parse --git-dir > /dev/null 2>&1 \
  || fail "$ROOT is not a git checkout; run this from a clone"

step "copying the source tree (what git tracks, plus untracked files it does not ignore)"
mkdir "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard) \
  | (cd "$ROOT" && while IFS= read -r -d '' f; do [[ -f "$f" ]] && printf '%s\0' "$f"; done) \
  | (cd "$ROOT" && xargs -0 cp --parents -t "$WORK/src")

step "building the sdist, then the wheel from the sdist"
"$PYTHON" -m venv "$WORK/build-venv"
"$WORK/build-venv/bin/python" -m pip install --quiet --upgrade pip build
"$WORK/build-venv/bin/python" -m build --outdir "$WORK/dist" "$WORK/src" > "$WORK/build.log" 2>&1 \
  || { cat "$WORK/build.log"; fail "python -m build failed"; }
if grep -in "deprecat" "$WORK/build.log"; then
  fail "the build printed the deprecation warnings above"
fi
SDIST=$(ls "$WORK"/dist/*.tar.gz)
WHEEL=$(ls "$WORK"/dist/*.whl)
ls -l "$WORK/dist"

step "checking what the sdist and the wheel hold"
"$WORK/build-venv/bin/python" - "$SDIST" "$WHEEL" <<'PY'
import re
import sys
import tarfile
import zipfile

sdist, wheel = sys.argv[1:]
with tarfile.open(sdist) as t:
    names = [n.split("/", 1)[1] for n in t.getnames() if "/" in n]
with zipfile.ZipFile(wheel) as z:
    wheel_names = z.namelist()
    metadata = next(z.read(n).decode() for n in wheel_names if n.endswith(".dist-info/METADATA"))

need = ["README.md", "LICENSE", "pyproject.toml", "PKG-INFO", "cli/main.py",
        "fedjax_core/__init__.py", "fedjax_api/__init__.py", "benchmarks/run.py"]
junk = re.compile(r"(^|/)(tests|docs|\.ci|scripts|__pycache__)/|^benchmarks/results/|\.pyc$")
errors = [f"sdist lacks {n}" for n in need if n not in names]
errors += [f"sdist holds {n}" for n in names if junk.search(n)]
errors += [f"wheel holds {n}" for n in wheel_names if junk.search(n)]
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel_names):
    errors.append("wheel lacks its LICENSE")
for line in ("License-Expression: Apache-2.0", "License-File: LICENSE"):
    if line not in metadata.splitlines():
        errors.append(f"wheel METADATA lacks {line!r}")
if errors:
    sys.exit("\n".join(errors))
print(f"sdist: {len(names)} entries; wheel: {len(wheel_names)} files; "
      "README, LICENSE and the packages present; no tests, docs or benchmark results")
PY

step "pip install -e prints no deprecation warning"
"$WORK/build-venv/bin/python" -m pip install --verbose --no-deps -e "$WORK/src" \
  > "$WORK/editable.log" 2>&1 || { tail -40 "$WORK/editable.log"; fail "pip install -e failed"; }
if grep -in "SetuptoolsDeprecationWarning\|is deprecated" "$WORK/editable.log"; then
  fail "pip install -e printed the deprecation warnings above"
fi

smoke() {  # smoke NAME ARTIFACT: a fresh venv, the artifact installed, the smoke test
  local name=$1 artifact=$2 venv="$WORK/venv-$1" run="$WORK/smoke-$1"
  step "$name: installing $(basename "$artifact") into a fresh venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "$artifact"
  mkdir "$run"
  step "$name: smoke test"
  (
    cd "$run"  # away from the checkout, so the imports come from the install
    "$venv/bin/python" - "$venv" <<'PY'
import importlib.metadata
import sys
from pathlib import Path

import cli
import fedjax_api
import fedjax_core

venv = Path(sys.argv[1]).resolve()
for module in (fedjax_core, fedjax_api, cli):
    where = Path(module.__file__).resolve()
    assert venv in where.parents, f"{module.__name__} imported from {where}, not the install"
meta = importlib.metadata.metadata("fedjax-sim")
assert meta["License-Expression"] == "Apache-2.0", meta["License-Expression"]
print(f"fedjax-sim {meta['Version']}: fedjax_core, fedjax_api and cli import from {venv}")
PY
    "$venv/bin/fedjax" --help > help.txt
    grep -q "run" help.txt || fail "$name: fedjax --help does not list run"
    "$venv/bin/fedjax" algorithms > algorithms.txt
    grep -q "fedavg" algorithms.txt || fail "$name: fedjax algorithms does not list fedavg"
    "$venv/bin/fedjax" run synthetic --rounds 2 --out "$run/run" > run.txt 2>&1 \
      || { cat run.txt; fail "$name: fedjax run synthetic failed"; }
    "$venv/bin/python" - "$run/run" <<'PY'
import json
import sys
from pathlib import Path

run = Path(sys.argv[1])
config = json.loads((run / "config.json").read_text())
records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
train = [r["round"] for r in records if r["kind"] == "train"]
final = [r for r in records if r["kind"] == "eval" and r["round"] == 2]
assert config["task"] == "synthetic" and config["rounds"] == 2, config
assert train == [1, 2], train
assert final and 0 <= final[0]["test/accuracy"] <= 1, final
loss = [r["train/loss"] for r in records if r["kind"] == "train"][-1]
print(f"2-round run: train/loss {loss:.4f}, "
      f"test/accuracy {final[0]['test/accuracy']:.4f}")
PY
  )
}

smoke wheel "$WHEEL"
smoke sdist "$SDIST"
step "dist check passed"
