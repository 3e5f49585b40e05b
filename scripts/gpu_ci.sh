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
"$PY" -m pytest -m gpu -p no:cacheprovider -q -ra tests 2>&1 | tee "$OUT/gpu_tests.log"
for b in benchmarks/bench_*.py; do
  [ -e "$b" ] || continue
  "$PY" "$b" --smoke --out "$OUT" 2>&1 | tee -a "$OUT/bench_smoke.log"
done
echo "gpu_ci: OK"
