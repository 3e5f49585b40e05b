"""Ragged-prefill MQA logits: Pallas kernel vs the xla backend, causal prefill, H=64, D=128.

Usage: python benchmarks/bench_mqa_logits.py [--smoke] [--out DIR] [--no-xla]
Counts useful FLOPs on valid (i, j) pairs only: 2 * pairs * H * D.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import nsa_jax  # noqa: E402
from benchmarks import common  # noqa: E402
from kernels_pallas import mqa_logits as kernel  # noqa: E402

FULL = [(2048, 8192), (4096, 16384), (8192, 8192), (8192, 16384), (8192, 32768), (8192, 65536)]
SMOKE = [(300, 1000), (2048, 8192)]


def problem(T, S, H=64, D=128, seed=0):
  rng = np.random.default_rng(seed)
  q8, qs = nsa_jax.act_quant(jnp.asarray(rng.standard_normal((T, H, D)), jnp.bfloat16))
  k8, ksc = nsa_jax.act_quant(jnp.asarray(rng.standard_normal((S, D)), jnp.bfloat16))
  w = jnp.asarray(rng.standard_normal((T, H)), jnp.float32) * H ** -0.5 * qs[..., 0] * D ** -0.5
  i = jnp.arange(T, dtype=jnp.int32)
  ks = jnp.zeros((T,), jnp.int32)
  ke = i + S - T + 1                      # causal: the last T of S tokens are the queries
  pairs = int(np.sum(np.asarray(ke - ks)))
  return (q8, k8, ksc[:, 0], w, ks, ke), pairs


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--out", default=None)
  ap.add_argument("--no-xla", action="store_true", help="skip the (slow) xla baseline")
  ap.add_argument("--unclean", action="store_true", help="also time clean_logits=False")
  ap.add_argument("--variants", default="",
                  help="kernel configs to compare, 'block_q,block_kv,stages,heavy_first[,num_ctas];...'"
                       " (num_ctas 0 = SM count; >= query blocks = one block per CTA)")
  args = ap.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu:
    print("bench_mqa_logits: no GPU; the Pallas kernel needs a Hopper GPU. Nothing to time.")
    return
  ceiling = common.measure_fp8_ceiling()
  rows = []
  shapes = SMOKE if args.smoke else FULL
  iters = 5 if args.smoke else 20
  for T, S in shapes:
    a, pairs = problem(T, S)
    flop = 2 * pairs * 64 * 128
    pallas = jax.jit(lambda *x: nsa_jax.mqa_logits(*x, backend="pallas"))
    t_p = common.time_fn(pallas, *a, iters=iters)
    row = dict(T=T, S=S, pairs_M=pairs / 1e6, pallas_ms=t_p * 1e3,
               tflops=flop / t_p / 1e12, pct_ceiling=100 * flop / t_p / 1e12 / ceiling)
    if args.unclean:
      unclean = jax.jit(lambda *x: nsa_jax.mqa_logits(*x, backend="pallas", clean_logits=False))
      row["unclean_ms"] = common.time_fn(unclean, *a, iters=iters) * 1e3
    if not args.no_xla:
      xla = jax.jit(lambda *x: nsa_jax.mqa_logits(*x, backend="xla"))
      t_x = common.time_fn(xla, *a, iters=3 if T * S > 2 ** 27 else iters)
      row.update(xla_ms=t_x * 1e3, speedup=t_x / t_p)
    rows.append(row)
    del a
  print(f"\nmqa_logits (causal, H=64, D=128, clean) on {common.card()}, jax {jax.__version__},"
        f" measured fp8 ceiling {ceiling:.0f} TFLOP/s")
  common.print_table(rows, ["T", "S", "pairs_M", "pallas_ms", "tflops", "pct_ceiling",
                            "unclean_ms", "xla_ms", "speedup"])
  common.write_results("mqa_logits", rows, args.out, args.smoke,
                       extra=dict(fp8_ceiling_tflops=ceiling))
  if args.variants:
    compare_variants(args.variants, shapes, iters, args.out)


def compare_variants(spec: str, shapes, iters, out_dir):
  """Times explicit kernel configs on the same shapes (tuning, not the headline table)."""
  cfgs = []
  for v in spec.split(";"):
    bq, bkv, st, hf, *ctas = (int(x) for x in v.split(","))
    cfgs.append(kernel.MqaLogitsConfig(block_q=bq, block_kv=bkv, num_stages=st,
                                       heavy_first=bool(hf), num_ctas=(ctas or [0])[0] or None))
  rows = []
  for T, S in shapes:
    a, pairs = problem(T, S)
    flop = 2 * pairs * 64 * 128
    for cfg in cfgs:
      f = jax.jit(lambda *x, cfg=cfg: kernel.mqa_logits(*x, config=cfg))
      t = common.time_fn(f, *a, iters=iters)
      rows.append(dict(T=T, S=S, block_q=cfg.block_q, block_kv=cfg.block_kv,
                       stages=cfg.num_stages, heavy_first=cfg.heavy_first,
                       ctas=cfg.num_ctas or "SMs", ms=t * 1e3,
                       tflops=flop / t / 1e12))
  print(f"\nmqa_logits kernel variants on {common.card()}, jax {jax.__version__}")
  common.print_table(rows, ["T", "S", "block_q", "block_kv", "stages", "heavy_first", "ctas", "ms",
                            "tflops"])
  common.write_results("mqa_logits_variants", rows, out_dir, True)


if __name__ == "__main__":
  main()
