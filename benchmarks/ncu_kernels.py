"""A driver for Nsight Compute: runs the Pallas logits kernels on host-made inputs, twice each.

Usage (H200, from the project root; ncu reads the counters on these machines, leave the
clocks alone as device METHOD.md asks):

  XLA_PYTHON_CLIENT_PREALLOCATE=false \\
  ncu --clock-control none -k 'regex:mosaic_gpu' --launch-count 4 \\
      --section SpeedOfLight --section LaunchStats --section Occupancy \\
      --section WarpStateStats --section SchedulerStats \\
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \\
      python3 benchmarks/ncu_kernels.py paged:64x32Kx2 mqa:8192x32768 > $OUT/ncu.txt

Without ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` jax holds 75% of the GPU's memory and ncu saves
and restores all of it for every replay pass (ncu warns "Backing up device memory in system
memory"): on 2026-12-02 five replayed launches of the logits kernel (2048 x 8192, 8192 x 8192)
filled a 330-second run, which was cut before ncu printed its report.

Cases: ``paged:BxCTX[xNEXT_N]`` (H = 64, every request at CTX tokens, shuffled pages) and
``mqa:TxS[xH]`` (causal: the last T of S tokens are the queries), each with the default
config, or with fields of it replaced after a third colon: ``paged:64x32Kx2:direct_store=1``,
``mqa:8192x32768:num_consumers=4,block_kv=256,kv_split=1``. For the SASS with execution
counts and stall samples per instruction, add ``--section SourceCounters --page source
--print-source sass --csv`` (with ``--launch-skip 1 --launch-count 1`` and one case); with
``MOSAIC_GPU_DUMP_TO=dir MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1`` jaxlib writes each
kernel's PTX, ptxas report and MLIR to ``dir`` (its own SASS dump failed to spawn ``nvdisasm``
on the H200 image, 2026-12-02). Inputs are made with
numpy and copied to the device, so the only kernels the process launches are the Mosaic GPU
ones (named ``*_mosaic_gpu_kernel``) and whatever small XLA ops an entry runs around them
(``mqa_logits`` computes its key-tile spans with a few fusions; the regex above skips those). Each case runs twice: the first call compiles, the
second is the one to read (``--launch-skip`` the first if you profile one case).
The 2026-12-02 profiles are summarized in benchmarks/NOTES.md (not run on the H200 in this
form: the profiles there came from an equivalent scratch script of the same session).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from kernels_pallas import mqa_logits as mqa_kernel  # noqa: E402
from kernels_pallas import paged_mqa_logits as paged_kernel  # noqa: E402

D = 128


def _fp8(rng, shape):
  """Random finite e4m3 values from random bytes (bit 6 cleared: |x| < 2, no NaN code)."""
  return (rng.integers(0, 256, shape, dtype=np.uint8) & np.uint8(0xBF)).view(
      ml_dtypes.float8_e4m3fn)


def _dims(spec: str) -> list[int]:
  return [int(p[:-1]) * 1024 if p.upper().endswith("K") else int(p) for p in spec.split("x")]


def _config(base, overrides: str):
  """``base`` with the fields of ``overrides`` (comma separated ``name=value``) replaced."""
  return common.replace_fields(base, overrides.split(",")) if overrides else None


def paged(rng, B: int, L: int, n: int = 1, H: int = 64, overrides: str = ""):
  P = B * -(-L // 64)
  tables = rng.permutation(P).astype(np.int32).reshape(B, -1)
  args = [jax.device_put(a) for a in (
      _fp8(rng, (B, n, H, D)), _fp8(rng, (P, 64, D)), np.full((P, 64), 1 / 64, np.float32),
      rng.standard_normal((B * n, H)).astype(np.float32), np.full((B,), L, np.int32), tables)]
  cfg = _config(paged_kernel.default_config(B, L), overrides)
  f = jax.jit(lambda *a: paged_kernel.paged_mqa_logits(*a, max_context_len=L, config=cfg))
  return f, args


def mqa(rng, T: int, S: int, H: int = 64, overrides: str = ""):
  ke = (S - T + np.arange(T) + 1).astype(np.int32)
  args = [jax.device_put(a) for a in (
      _fp8(rng, (T, H, D)), _fp8(rng, (S, D)), np.full((S,), 1 / 64, np.float32),
      rng.standard_normal((T, H)).astype(np.float32), np.zeros(T, np.int32), ke)]
  cfg = _config(mqa_kernel.MqaLogitsConfig.for_heads(H), overrides)
  return jax.jit(lambda *a: mqa_kernel.mqa_logits(*a, config=cfg)), args


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("cases", nargs="+",
                  help="paged:BxCTX[xNEXT_N][:field=v,...] or mqa:TxS[xH][:field=v,...]")
  args = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  for case in args.cases:
    kind, _, rest = case.partition(":")
    spec, _, overrides = rest.partition(":")
    if kind not in ("paged", "mqa") or not spec:
      ap.error(f"a case is paged:BxCTX[xNEXT_N][:field=v,...] or mqa:TxS[xH][:field=v,...], "
               f"got {case!r}")
    f, a = (paged if kind == "paged" else mqa)(rng, *_dims(spec), overrides=overrides)
    for _ in range(2):
      jax.block_until_ready(f(*a))
    print(f"{case}: ran twice", flush=True)


if __name__ == "__main__":
  main()
