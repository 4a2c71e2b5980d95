#!/usr/bin/env bash
# Accelerator smoke test: under 10 minutes on one H100. Each step prints PASS, FAIL or SKIP
# with its expected outcome; on a CPU-only machine the GPU steps print SKIP (and the rest
# run small). Run from the repository root:  bash benchmarks/accelerator_smoke.sh
# Expected results: docs/scaling.md ("Accelerator smoke test").
set -u
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} XLA_PYTHON_CLIENT_PREALLOCATE=false
FAILS=0
step() { echo; echo "== $1"; }
check() {  # check NAME EXPECTED COMMAND...: PASS if the command exits 0
  local name=$1 expected=$2; shift 2
  if "$@" > /tmp/fedjax_smoke.log 2>&1; then echo "PASS $name (expected: $expected)"
  else echo "FAIL $name (expected: $expected)"; tail -15 /tmp/fedjax_smoke.log; FAILS=$((FAILS + 1)); fi
}
checks() {  # the Python checks print their own PASS/FAIL/SKIP lines
  $PY -m benchmarks.accelerator_checks "$@" || FAILS=$((FAILS + 1))
}

step "1. backend and devices"
BACKEND=$($PY -c "import jax; print(jax.default_backend())" 2>/dev/null)
$PY -c "import jax; print(jax.__version__, jax.default_backend(), jax.devices())"
if [ "$BACKEND" = "gpu" ] || [ "$BACKEND" = "tpu" ]; then
  echo "PASS backend $BACKEND (expected: gpu on an H100)"; GPU=1; QUICK=""
else
  echo "SKIP backend $BACKEND: no accelerator; GPU steps skip, the others run small (expected: gpu on an H100)"
  GPU=0; QUICK="--quick"
fi

step "2. core numerics tests, default precision then highest"
if [ $GPU = 1 ]; then
  check "gpu-marked numerics at default precision" "pass (TF32 within the stated tolerances)" \
    $PY -m pytest -q -m gpu tests/fedjax_core/test_accelerator_numerics.py
  check "gpu-marked numerics at highest precision" "pass" \
    env JAX_DEFAULT_MATMUL_PRECISION=highest $PY -m pytest -q -m gpu tests/fedjax_core/test_accelerator_numerics.py
  check "aggregation HLO is HIGHEST" "pass" $PY -m pytest -q tests/fedjax_core/aggregate/test_precision.py
else
  echo "SKIP gpu-marked numerics (expected: pass on a GPU; deselected on CPU)"
fi

step "3. resume and device-data tests (CPU-pinned suite, 8 CPU devices)"
if [ $GPU = 1 ]; then
  check "resume and device-data tests" "pass (the suite pins itself to CPU)" \
    $PY -m pytest -q tests/fedjax_api/test_resume.py tests/fedjax_api/test_device_data.py
else
  echo "SKIP resume and device-data tests: part of the CPU suite here (expected: pass)"
fi

step "4. FedAvg and SCAFFOLD: 1-device mesh vs no mesh"
checks mesh

step "5. fedjax bench: CNN and LSTM, chunk 1 vs 8 vs 32"
if [ $GPU = 1 ]; then
  check "bench emnist-cnn, shakespeare-lstm at chunks 1,8,32" \
    "runs; chunk 8 or 32 fastest; peak MB is device memory" \
    $PY -c "from cli.main import main; main()" bench emnist-cnn shakespeare-lstm --chunk-sizes 1,8,32 --rounds 5 \
    --warmup 1 --select-rounds 2 --no-baseline --out /tmp/fedjax_smoke_bench
  cat /tmp/fedjax_smoke.log | tail -12
else
  echo "SKIP fedjax bench at chunks 1,8,32 (expected on GPU: chunk 8 or 32 fastest)"
fi

step "6. determinism on and off, Stack Overflow LSTM"
if [ $GPU = 1 ]; then
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" checks determinism $QUICK
  checks determinism $QUICK
else
  checks determinism $QUICK
  echo "SKIP determinism off on GPU (expected: the 'on' round at most ~1.3x the 'off' one)"
fi

step "7. peak device memory, 256-client round, FedAvg vs SCAFFOLD"
checks memory $QUICK

step "8. im2col vs lax.conv under vmap"
checks conv $QUICK

echo
if [ $FAILS = 0 ]; then echo "smoke: all steps passed or skipped"; else echo "smoke: $FAILS step(s) FAILED"; fi
exit $((FAILS > 0))
