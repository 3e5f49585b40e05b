"""The whole DeepSeek-V3.2 indexer layer (``IndexerSteps``): backend auto (Pallas on a GPU) vs xla.

Usage: python benchmarks/bench_indexer.py [--smoke] [--out DIR] [--no-xla]

Cases (V3.2 shapes: dim 7168, q_lora_rank 1536, H 64, D 128, top-2048, ue8m0, Hadamard):
- ``prefill 32K``: one request, 32768 new tokens, empty cache: projections, rope, fp8, cache
  write, the budgeted ``prefill_topk`` (logits + top-k), slots out. The issue's headline.
- ``extend 4x4K/8K``: four requests extending by 4096 tokens onto 4096 cached ones (ragged).
- ``decode 32x32K``: 32 requests, one new token each, 32K-token contexts in a shuffled paged
  cache.
- ``project 32K``: the per-token part alone (projections, rope, Hadamard, act_quant), to show
  how much of the prefill is not logits/top-k.
Each step is jitted with the cache donated; times are medians over steady-state calls (the
cache is threaded through). Useful TFLOP/s counts the logits' valid (query, key) pairs only:
2 * pairs * H * D / layer time. --smoke: a narrow layer and small sizes (runs on CPU).
Writes JSON to --out and (unless --smoke) benchmarks/results/indexer.json.
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
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import nsa_jax  # noqa: E402
from benchmarks import common  # noqa: E402
from nsa_jax.indexer import (Indexer, IndexerConfig, IndexerSteps, allocate_block_tables,  # noqa: E402
                             decode_inputs, prefill_inputs)

FULL_CFG = IndexerConfig()
SMOKE_CFG = IndexerConfig(dim=512, q_lora_rank=256, n_heads=64, head_dim=128, topk=256)


def activations(key, rows, cfg):
  kx, kq = jax.random.split(key)
  x = jax.random.normal(kx, (rows, cfg.dim), jnp.bfloat16)
  qr = jax.random.normal(kq, (rows, cfg.q_lora_rank), jnp.bfloat16)
  return jax.block_until_ready((x, qr))


def random_cache(key, num_pages, D):
  """A cache full of random fp8 keys (zeros would make every logit tie)."""
  @jax.jit
  def make(key):
    k = jax.random.normal(key, (num_pages * 64, D), jnp.bfloat16)
    k8, s = nsa_jax.act_quant(k, scale_fmt="ue8m0")
    return nsa_jax.IndexKCache(k8.reshape(num_pages, 64, D), s.reshape(num_pages, 64))
  return jax.block_until_ready(make(key))


def timed_steps(step, cache, *, warmup, iters):
  """(first call s, median steady s, cache): ``step(cache) -> (out, cache)``, cache threaded."""
  t0 = time.perf_counter()
  out, cache = step(cache)
  jax.block_until_ready(out)
  first = time.perf_counter() - t0
  for _ in range(warmup):
    out, cache = step(cache)
    jax.block_until_ready(out)
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    out, cache = step(cache)
    jax.block_until_ready(out)
    ts.append(time.perf_counter() - t0)
  return first, statistics.median(ts), cache


def kernel_name(backend):
  if backend == "xla":
    return "xla"
  return "pallas" if jax.default_backend() == "gpu" else "xla (auto, no GPU)"


def prefill_case(name, module, cfg, ext, pre, backend, iters, seed=0):
  steps = IndexerSteps(module, backend=backend)
  tables, P = allocate_block_tables([e + p for e, p in zip(ext, pre)], seed=seed)
  batch = nsa_jax.build_ragged_batch(ext, pre)
  inp = prefill_inputs(batch, tables, num_pages=P)
  plan = steps.plan(inp)
  key = jax.random.key(seed)
  cache = random_cache(key, P, cfg.head_dim)   # prefix keys (for the extend case) are random
  x, qr = activations(jax.random.fold_in(key, 1), batch.T_pad, cfg)
  first, t, cache = timed_steps(lambda c: steps.prefill(x, qr, inp, c), cache,
                                warmup=1, iters=iters)
  pairs = int(np.clip(batch.ke - batch.ks, 0, None).sum())
  del cache, x, qr
  return dict(case=name, backend=backend, kernels=kernel_name(backend), T=batch.num_tokens,
              S=batch.num_keys, ms=t * 1e3, tokens_per_s=batch.num_tokens / t,
              tflops=2 * pairs * cfg.n_heads * cfg.head_dim / t / 1e12,
              chunks=plan.num_chunks, budget_gib=steps.budget_bytes / 2 ** 30,
              compile_s=max(first - t, 0.0))


def decode_case(name, module, cfg, B, ctx_len, backend, iters, seed=0):
  steps = IndexerSteps(module, backend=backend)
  tables, P = allocate_block_tables([ctx_len + 1] * B, seed=seed)
  key = jax.random.key(seed)
  cache = random_cache(key, P, cfg.head_dim)
  d = decode_inputs([ctx_len] * B, tables, num_pages=P)
  x, qr = activations(jax.random.fold_in(key, 2), d.context_lens.shape[0], cfg)
  first, t, cache = timed_steps(lambda c: steps.decode(x, qr, d, c), cache,
                                warmup=2, iters=iters)
  pairs = B * ctx_len
  del cache
  return dict(case=name, backend=backend, kernels=kernel_name(backend), T=B, S=ctx_len,
              ms=t * 1e3, tokens_per_s=B / t,
              tflops=2 * pairs * cfg.n_heads * cfg.head_dim / t / 1e12, chunks=None,
              budget_gib=None, compile_s=max(first - t, 0.0))


def project_case(name, module, cfg, T, iters):
  graphdef, params = nnx.split(module)
  f = jax.jit(lambda p, *a: nnx.merge(graphdef, p).project(*a))
  x, qr = activations(jax.random.key(3), T, cfg)
  pos = jnp.arange(T, dtype=jnp.int32)
  t = common.time_fn(f, params, x, qr, pos, warmup=2, iters=iters)
  return dict(case=name, backend="-", kernels="xla", T=T, S=None, ms=t * 1e3,
              tokens_per_s=T / t, tflops=None, chunks=None, budget_gib=None, compile_s=None)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--smoke", action="store_true", help="small sizes (CPU-friendly)")
  ap.add_argument("--out", default=None, help="also write the JSON here")
  ap.add_argument("--no-xla", action="store_true", help="skip the xla-backend baseline rows")
  args = ap.parse_args(argv)

  cfg = SMOKE_CFG if args.smoke else FULL_CFG
  if args.smoke:
    prefill = [("prefill 512", [512], [0]), ("extend 2x128/256", [128, 128], [256, 256])]
    decode = [("decode 4x1K", 4, 1024)]
    proj_T, iters = 512, 3
  else:
    prefill = [("prefill 32K", [32768], [0]), ("extend 4x4K/8K", [4096] * 4, [4096] * 4)]
    decode = [("decode 32x32K", 32, 32768)]
    proj_T, iters = 32768, 10
  print(f"indexer layer benchmark | {common.card()} | jax {jax.__version__} | "
        f"{jax.default_backend()} | dim {cfg.dim}, q_lora_rank {cfg.q_lora_rank}, "
        f"H {cfg.n_heads}, D {cfg.head_dim}, top-{cfg.topk}")
  nsa_jax.budget.prime()
  module = Indexer(cfg, rngs=nnx.Rngs(0))
  backends = ["auto"] + ([] if args.no_xla else ["xla"])
  rows = []
  for name, ext, pre in prefill:
    for be in backends:
      rows.append(prefill_case(name, module, cfg, ext, pre, be,
                               iters if be == "auto" else max(2, iters // 3)))
      print(f"  {name:18s} {be:5s} {rows[-1]['ms']:10.2f} ms", flush=True)
  for name, B, L in decode:
    for be in backends:
      rows.append(decode_case(name, module, cfg, B, L, be, iters * 2))
      print(f"  {name:18s} {be:5s} {rows[-1]['ms']:10.2f} ms", flush=True)
  rows.append(project_case(f"project {proj_T // 1024}K" if proj_T >= 1024 else
                           f"project {proj_T}", module, cfg, proj_T, iters))
  base = {(r["case"]): r["ms"] for r in rows if r["backend"] == "xla"}
  for r in rows:
    r["speedup_vs_xla"] = (base[r["case"]] / r["ms"]
                           if r["backend"] == "auto" and r["case"] in base else None)
  print()
  common.print_table(rows, ["case", "backend", "kernels", "T", "S", "ms", "tokens_per_s",
                            "tflops", "speedup_vs_xla", "chunks", "compile_s"])
  common.write_results("indexer", rows, args.out, args.smoke,
                       extra=dict(config=dict(dim=cfg.dim, q_lora_rank=cfg.q_lora_rank,
                                              n_heads=cfg.n_heads, head_dim=cfg.head_dim,
                                              topk=cfg.topk, scale_fmt=cfg.scale_fmt)))


if __name__ == "__main__":
  main()
