#!/usr/bin/env bash
# GPU CI: the gpu-marked tests and a short benchmark smoke, with the packages already on the
# CUDA machine (the Hopper image has jax 0.11.2 + CUDA 13 plugin, flax, numpy, pytest).
# Usage: bash scripts/gpu_ci.sh [OUT_DIR]      (exits non-zero on any failure)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/nsa_jax_gpu_ci}}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
"$PY" - <<'PY'
import jax
assert jax.default_backend() == "gpu", f"gpu_ci.sh needs a CUDA GPU, jax sees {jax.devices()}"
print("jax", jax.__version__, jax.devices())
PY
set -o pipefail
# -v prints each test's verdict as it finishes, so a run cut short still says which failed;
# tests run in parallel when pytest-xdist is there (about 3x faster on one GPU), with
# XLA_PYTHON_CLIENT_PREALLOCATE=false so that the workers share the GPU's memory.
PAR=()
if "$PY" -c "import xdist" 2>/dev/null; then PAR=(-n "${GPU_CI_WORKERS:-6}"); fi
XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -m pytest -m gpu -p no:cacheprovider -v -rA \
  ${PAR[@]+"${PAR[@]}"} tests 2>&1 | tee "$OUT/gpu_tests.log"
for b in benchmarks/bench_*.py; do
  [ -e "$b" ] || continue
  "$PY" "$b" --smoke --out "$OUT" 2>&1 | tee -a "$OUT/bench_smoke.log"
done
echo "gpu_ci: OK"
