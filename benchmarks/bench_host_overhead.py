"""Host overhead of one ``IndexerSteps.decode`` / ``.prefill`` call: wall time minus device time.

Usage: PYTHONPATH=. python benchmarks/bench_host_overhead.py [--smoke] [--out DIR] [--iters N]

An engine calls the jitted step once per layer per token, so whatever the host spends per call
(argument flattening, dispatch, donation, the output's pytree) is paid 61 times a token on
V3.2. For each case (V3.2 shapes; --smoke: a narrow layer, small sizes, runs on CPU):

- ``wall_ms``: median wall time of one standalone call, ``steps.decode(x, qr, inputs, cache)``
  then ``block_until_ready``, with every argument already on the device and the cache
  threaded through (donated) as an engine does.
- ``return_ms``: the part of it until the call returns (host-side work before the device runs).
- ``device_ms``: device time of the same step, by the difference of R-call jits of the pure
  step (``benchmarks/common.time_per_call``: R distinct inputs, fixed costs cancel).
- ``overhead_ms = wall_ms - device_ms``: the host's share; the goal is <= 0.1 ms on an H200.
- ``floor_ms``: the same measure for a jit of the same arguments that does (almost) nothing
  (one tiny op, cache donated and returned): what jax itself costs for this argument list,
  so that ``overhead_ms - floor_ms`` is what nsa_jax adds on top.
- ``in_jit_ms``: wall time per layer when ``R_BIG`` layers run in one jit (the README's
  "every layer in one jit"): what the dispatch costs once it is amortized.

Writes JSON to --out and (unless --smoke) benchmarks/results/host_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import nsa_jax  # noqa: E402
from benchmarks import common  # noqa: E402
from nsa_jax.indexer import (Indexer, IndexerConfig, allocate_block_tables,  # noqa: E402
                             decode_inputs, prefill_inputs)

FULL_CFG = IndexerConfig()
SMOKE_CFG = IndexerConfig(dim=512, q_lora_rank=256, n_heads=64, head_dim=128, topk=256)
R_SMALL, R_BIG = 1, 5


def _bf16(rng, shape):
  return jax.device_put(rng.standard_normal(shape, np.float32).astype(ml_dtypes.bfloat16))


def _random_cache(rng, num_pages, D):
  """A cache of random fp8 keys (zeros would make every logit tie), made on the host."""
  k = rng.standard_normal((num_pages, 64, D), np.float32)
  return jax.device_put(nsa_jax.IndexKCache(
      (k * 64).clip(-448, 448).astype(ml_dtypes.float8_e4m3fn),
      np.full((num_pages, 64), 1 / 64, np.float32)))


def _standalone(call, cache, iters, warmup=5):
  """(median wall s, median until-return s, cache) of ``call(cache) -> (out, cache)``."""
  for _ in range(warmup):
    out, cache = call(cache)
    jax.block_until_ready(out)
  walls, rets = [], []
  for _ in range(iters):
    t0 = time.perf_counter()
    out, cache = call(cache)
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    walls.append(t2 - t0)
    rets.append(t1 - t0)
  return statistics.median(walls), statistics.median(rets), cache


def _floor(params, x, qr, inputs, cache, iters):
  """Wall time of a jit of the same arguments doing one tiny op (cache donated, returned)."""
  f = jax.jit(lambda p, x, qr, inp, c: (x[:1, :1].astype(jnp.float32) + p[0].ravel()[0], c),
              donate_argnums=(4,))
  wall, _, cache = _standalone(lambda c: f(params, x, qr, inputs, c), cache, iters)
  return wall, cache


def _device(pure, params, xs, qrs, inputs, cache, iters):
  """(in-jit wall per layer s, device s per call) by the R-call difference."""
  def make(R):
    @jax.jit
    def run(params, xs, qrs, inputs, cache):
      outs = []
      for r in range(R):
        out, cache = pure(params, xs[r], qrs[r], inputs, cache)
        outs.append(out)
      return outs, cache
    return run, (params, xs[:R], qrs[:R], inputs, cache)

  _, wall_big, dev = common.time_per_call(make, r_small=R_SMALL, r_big=R_BIG, iters=iters)
  return wall_big, dev


def decode_case(name, module, cfg, B, ctx_len, iters, seed=0):
  rng = np.random.default_rng(seed)
  steps = nsa_jax.IndexerSteps(module)
  tables, P = allocate_block_tables([ctx_len + 1] * B, seed=seed)
  d = jax.device_put(decode_inputs([ctx_len] * B, tables, num_pages=P))
  rows = d.context_lens.shape[0]
  xs = [_bf16(rng, (rows, cfg.dim)) for _ in range(R_BIG)]
  qrs = [_bf16(rng, (rows, cfg.q_lora_rank)) for _ in range(R_BIG)]
  cache = _random_cache(rng, P, cfg.head_dim)
  wall, ret, cache = _standalone(lambda c: steps.decode(xs[0], qrs[0], d, c), cache, iters)
  floor, cache = _floor(steps.params, xs[0], qrs[0], d, cache, iters)
  in_jit, dev = _device(steps.decode_fn(), steps.params, xs, qrs, d, cache, max(5, iters // 4))
  return _row(name, "decode", B, ctx_len, wall, ret, dev, floor, in_jit)


def prefill_case(name, module, cfg, ext, pre, iters, seed=0):
  rng = np.random.default_rng(seed)
  steps = nsa_jax.IndexerSteps(module)
  tables, P = allocate_block_tables([e + p for e, p in zip(ext, pre)], seed=seed)
  batch = nsa_jax.build_ragged_batch(ext, pre)
  inp = jax.device_put(prefill_inputs(batch, tables, num_pages=P))
  xs = [_bf16(rng, (batch.T_pad, cfg.dim)) for _ in range(R_BIG)]
  qrs = [_bf16(rng, (batch.T_pad, cfg.q_lora_rank)) for _ in range(R_BIG)]
  cache = _random_cache(rng, P, cfg.head_dim)
  wall, ret, cache = _standalone(lambda c: steps.prefill(xs[0], qrs[0], inp, c), cache, iters)
  floor, cache = _floor(steps.params, xs[0], qrs[0], inp, cache, iters)
  in_jit, dev = _device(steps.prefill_fn(), steps.params, xs, qrs, inp, cache,
                        max(5, iters // 4))
  return _row(name, "prefill", batch.num_tokens, batch.num_keys, wall, ret, dev, floor, in_jit)


def _row(name, step, T, S, wall, ret, dev, floor, in_jit):
  ms = 1e3
  return dict(case=name, step=step, T=T, S=S, wall_ms=wall * ms, return_ms=ret * ms,
              device_ms=dev * ms, overhead_ms=(wall - dev) * ms, floor_ms=floor * ms,
              in_jit_ms=in_jit * ms)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--smoke", action="store_true", help="small sizes (CPU-friendly)")
  ap.add_argument("--out", default=None, help="also write the JSON here")
  ap.add_argument("--iters", type=int, default=None, help="standalone calls timed per case")
  args = ap.parse_args(argv)
  cfg = SMOKE_CFG if args.smoke else FULL_CFG
  if args.smoke:
    decode = [("decode 1x1K", 1, 1024), ("decode 8x1K", 8, 1024)]
    prefill = [("extend 1x64/512", [64], [512])]
    iters = args.iters or 30
  else:
    decode = [("decode 1x4K", 1, 4096), ("decode 1x32K", 1, 32768),
              ("decode 64x4K", 64, 4096), ("decode 64x32K", 64, 32768)]
    prefill = [("extend 1x128/4K", [128], [4096]), ("prefill 4K", [4096], [0])]
    iters = args.iters or 200
  print(f"host overhead of IndexerSteps | {common.card()} | jax {jax.__version__} | "
        f"{jax.default_backend()} | dim {cfg.dim}, H {cfg.n_heads}, D {cfg.head_dim}, "
        f"top-{cfg.topk}", flush=True)
  nsa_jax.budget.prime()
  module = Indexer(cfg, rngs=nnx.Rngs(0))
  rows = []
  for name, B, L in decode:
    rows.append(decode_case(name, module, cfg, B, L, iters))
    print(f"  {name:18s} overhead {rows[-1]['overhead_ms']:.3f} ms", flush=True)
  for name, ext, pre in prefill:
    rows.append(prefill_case(name, module, cfg, ext, pre, iters))
    print(f"  {name:18s} overhead {rows[-1]['overhead_ms']:.3f} ms", flush=True)
  print()
  common.print_table(rows, ["case", "T", "S", "wall_ms", "return_ms", "device_ms",
                            "overhead_ms", "floor_ms", "in_jit_ms"])
  common.write_results("host_overhead", rows, args.out, args.smoke,
                       extra=dict(r_small=R_SMALL, r_big=R_BIG))


if __name__ == "__main__":
  main()
