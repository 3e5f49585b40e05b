"""Paged-decode MQA logits: Pallas kernel vs the xla backend, H=64, D=128, pages of 64 tokens.

Usage: python benchmarks/bench_paged_mqa_logits.py [--smoke] [--out DIR] [--no-xla]
                                                   [--no-check] [--sweep | --sweep-only]
Contexts are drawn 0.7x..1.3x of the average (B=1: exactly the average); max_context_len is
the block table's width in tokens (whole pages), as sglang passes it (``max_seq_len =
block_tables.shape[1] * page_size``); ``--unaligned`` uses the largest context instead, which
costs one copy of the logits to slice off the page padding. Bandwidth counts cache bytes
read: 132 bytes per context token (128 fp8 key bytes + a float32 scale), as DeepGEMM reports
it; the logits written (4 bytes per output element) are listed separately. Each timed call
runs R kernels back to back inside one jit (R query sets, and several caches when one fits in
L2) so that small problems are not served from L2; ``pallas_ms`` is the wall time of such a
call over R (R = 8), ``pallas_dev_ms`` the device time per kernel (the difference of R = 8 and
R = 2, over 6: host dispatch and launch latency cancel); GB/s and the ratios use the latter.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import nsa_jax  # noqa: E402
from benchmarks import common  # noqa: E402
from kernels_pallas import paged_mqa_logits as kernel  # noqa: E402
from nsa_jax import reference  # noqa: E402
from nsa_jax.cache import IndexKCache  # noqa: E402

H, D, PAGE = 64, 128, 64
BYTES_PER_TOKEN = D + 4
L2_BYTES = 50 << 20
FULL = [(B, avg, n) for B in (1, 64, 128) for avg in (4096, 16384, 65536) for n in (1, 2)]
SMOKE = [(1, 4096, 1), (64, 4096, 2)]
CPU_SMOKE = [(2, 300, 2)]  # interpret mode: correctness only


def context_lens(B: int, avg: int, seed: int = 0) -> np.ndarray:
  if B == 1:
    return np.array([avg], np.int32)
  rng = np.random.default_rng(seed)
  return np.maximum(1, (avg * rng.uniform(0.7, 1.3, B)).astype(np.int32))


def shuffled_tables(ctx: np.ndarray, seed: int = 0) -> tuple[np.ndarray, int]:
  """(int32 [B, max pages] block tables, -1 padded; P pages in all): every request's pages
  distinct and in shuffled order, as a long-running server's allocator leaves them."""
  B = len(ctx)
  pages_per = -(-ctx // PAGE)
  P = int(pages_per.sum())
  perm = np.random.default_rng(seed).permutation(P).astype(np.int32)
  tables = np.full((B, int(pages_per.max())), -1, np.int32)
  starts = np.concatenate([[0], np.cumsum(pages_per)])
  for b in range(B):
    tables[b, :pages_per[b]] = perm[starts[b]:starts[b + 1]]
  return tables, P


def make_caches(ctx: np.ndarray, copies: int, seed: int = 0):
  """``copies`` caches (shuffled pages, built on the device) and one block table."""
  tables, P = shuffled_tables(ctx, seed)
  caches = []
  for c in range(copies):
    kk, ks = jax.random.split(jax.random.key(100 + c))
    k8 = jax.random.normal(kk, (P, PAGE, D), jnp.bfloat16).astype(jnp.float8_e4m3fn)
    scale = jax.random.uniform(ks, (P, PAGE), jnp.float32, 0.5, 2.0)
    caches.append(IndexKCache(k8, scale))
  return caches, jnp.asarray(tables)


def make_queries(B: int, n: int, copies: int):
  out = []
  for c in range(copies):
    kq, kw = jax.random.split(jax.random.key(200 + c))
    q8 = jax.random.normal(kq, (B, n, H, D), jnp.bfloat16).astype(jnp.float8_e4m3fn)
    w = jax.random.normal(kw, (B * n, H), jnp.float32) * (H * D) ** -0.5
    out.append((q8, w))
  return out


def repeated(call, R: int, n_caches: int):
  """One jit running ``call`` R times on rotating inputs (distinct queries: no CSE)."""
  def f(queries, caches, ctx, tables):
    return [call(queries[r][0], caches[r % n_caches], queries[r][1], ctx, tables)
            for r in range(R)]
  return jax.jit(f)


def check(out, q8, cache, w, ctx, tables, L) -> float:
  """-inf pattern must match the reference exactly; returns calc_diff (float64 on the host)."""
  ref = jax.jit(lambda *a: reference.paged_mqa_logits(*a, max_context_len=L))(
      q8, cache.k_fp8, cache.k_scale, w, ctx, tables)
  x = np.asarray(out, np.float64)
  y = np.asarray(ref, np.float64)
  xi, yi = np.isneginf(x), np.isneginf(y)
  if (xi != yi).any():
    raise AssertionError(f"-inf pattern differs at {np.argwhere(xi != yi)[:5].tolist()}")
  if not np.isfinite(x[~xi]).all():
    raise AssertionError("non-finite values outside the -inf pattern")
  x[xi] = 0.0
  y[yi] = 0.0
  denom = (x * x + y * y).sum()
  return float(1.0 - 2.0 * (x * y).sum() / denom) if denom > 0 else 0.0


def bench_one(B, avg, n, *, iters, do_xla, do_check, config=None, interpret=False,
              unaligned=False):
  ctx_np = context_lens(B, avg, seed=B + avg)
  L = int(ctx_np.max()) if unaligned else int(-(-ctx_np.max() // PAGE)) * PAGE
  cache_bytes = int(ctx_np.sum()) * BYTES_PER_TOKEN
  alloc_bytes = int((-(-ctx_np // PAGE)).sum()) * PAGE * BYTES_PER_TOKEN
  n_caches = 1 if alloc_bytes >= 2 * L2_BYTES else min(8, math.ceil(4 * L2_BYTES / alloc_bytes))
  R_SMALL, R = 2, 8
  caches, tables = make_caches(ctx_np, n_caches)
  queries = make_queries(B, n, R)
  ctx = jnp.asarray(ctx_np)
  row = dict(B=B, avg_ctx=avg, next_n=n, max_ctx=L, cache_MB=cache_bytes / 1e6,
             out_MB=B * n * L * 4 / 1e6)

  def pallas(q8, cache, w, c, t):
    if config is not None or interpret:
      return kernel.paged_mqa_logits(q8, cache.k_fp8, cache.k_scale, w, c, t,
                                     max_context_len=L, interpret=interpret, config=config)
    return nsa_jax.paged_mqa_logits(q8, cache, w, c, t, max_context_len=L, backend="pallas")

  if do_check:
    q8, w = queries[0]
    row["calc_diff"] = check(pallas(q8, caches[0], w, ctx, tables), q8, caches[0], w, ctx,
                             tables, L)
    if row["calc_diff"] >= 5e-6:
      raise AssertionError(f"B={B} avg={avg} n={n}: calc_diff {row['calc_diff']:.2e} >= 5e-6")
  if interpret:
    return row

  def per_call(call, iters, warmup=3):
    """(wall s per kernel at R calls a jit, device s per kernel from R vs R_SMALL)."""
    _, wall, dev = common.time_per_call(
        lambda r: (repeated(call, r, n_caches), (queries[:r], caches, ctx, tables)),
        r_small=R_SMALL, r_big=R, iters=iters, warmup=warmup)
    return wall, dev

  t_p, d_p = per_call(pallas, iters)
  row.update(L=L, pallas_ms=t_p * 1e3, pallas_dev_ms=d_p * 1e3,
             cache_GBps=cache_bytes / d_p / 1e9,
             pct_2p94=100 * cache_bytes / d_p / (common.COPY_CEILING_TBS * 1e12),
             floor_ms=(cache_bytes + B * n * L * 4) / (common.COPY_CEILING_TBS * 1e12) * 1e3)
  if do_xla:
    xla = lambda q8, cache, w, c, t: nsa_jax.paged_mqa_logits(q8, cache, w, c, t,
                                                              max_context_len=L, backend="xla")
    t_x, d_x = per_call(xla, 3 if cache_bytes > 100e6 else iters, warmup=1)
    row.update(xla_ms=t_x * 1e3, xla_dev_ms=d_x * 1e3, speedup=d_x / d_p)
  return row


COLS = ["B", "avg_ctx", "next_n", "L", "cache_MB", "pallas_ms", "pallas_dev_ms", "floor_ms",
        "cache_GBps", "pct_2p94", "xla_ms", "xla_dev_ms", "speedup", "calc_diff"]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--smoke", action="store_true", help="a couple of small sizes, quick")
  ap.add_argument("--out", default=None, help="also write the results JSON here")
  ap.add_argument("--no-xla", action="store_true", help="skip the xla baseline")
  ap.add_argument("--no-check", action="store_true", help="skip the correctness check")
  ap.add_argument("--sweep", action="store_true",
                  help="also time kernel configs (pages_per_split x num_stages) at a few sizes")
  ap.add_argument("--sweep-only", action="store_true", help="only the config sweep")
  ap.add_argument("--unaligned", action="store_true",
                  help="max_context_len = the largest context (not whole pages): adds a slice")
  ap.add_argument("--shapes", default="", help="B x avg x next_n list, e.g. 64x65536x1")
  args = ap.parse_args(argv)
  if jax.default_backend() != "gpu":
    if not args.smoke:
      print("bench_paged_mqa_logits: no GPU; the Pallas kernel needs a Hopper GPU. Run with "
            "--smoke for an interpret-mode correctness check.")
      return
    rows = [bench_one(*s, iters=1, do_xla=False, do_check=True, interpret=True)
            for s in CPU_SMOKE]
    print("bench_paged_mqa_logits --smoke on CPU: interpret mode, correctness only "
          "(no timings)")
    common.print_table(rows, ["B", "avg_ctx", "next_n", "max_ctx", "calc_diff"])
    return
  iters = 5 if args.smoke else 20
  if args.sweep_only:
    sweep(args.out, iters)
    return
  copy_tbs = common.measure_copy_ceiling()
  shapes = SMOKE if args.smoke else FULL
  if args.shapes:
    shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
  rows, failed = [], False
  for s in shapes:
    try:
      r = bench_one(*s, iters=iters, do_xla=not args.no_xla, do_check=not args.no_check,
                    unaligned=args.unaligned)
      r["pct_measured_copy"] = 100 * r["cache_GBps"] / (copy_tbs * 1e3)
    except Exception as e:  # report every size, then fail
      failed = True
      r = dict(B=s[0], avg_ctx=s[1], next_n=s[2], error=f"{type(e).__name__}: {str(e)[:200]}")
      print(f"B={s[0]} avg={s[1]} next_n={s[2]}: {r['error']}", flush=True)
    rows.append(r)
  print(f"\npaged_mqa_logits (H={H}, D={D}, page {PAGE}, contexts 0.7-1.3x avg, clean, "
        f"L = {'largest context' if args.unaligned else 'whole pages'}) on "
        f"{common.card()}, jax {jax.__version__}; copy ceiling 2.94 TB/s (reference run), measured "
        f"now {copy_tbs:.2f} TB/s")
  common.print_table(rows, COLS + ["pct_measured_copy", "error"])
  common.write_results("paged_mqa_logits", rows, args.out, args.smoke,
                       extra=dict(copy_ceiling_tbs_measured=copy_tbs))
  if args.sweep:
    sweep(args.out, iters)
  if failed:
    sys.exit("bench_paged_mqa_logits: some sizes failed (see the error column)")


def sweep(out_dir, iters):
  """Tuning table: every (pages_per_split, num_stages) at a few sizes (next_n = 1 unless said)."""
  rows = []
  for B, avg, n in [(64, 65536, 1), (64, 65536, 2), (128, 16384, 1), (64, 4096, 1)]:
    for pps in (4, 8, 16, 32, 64):
      for st in (2, 4, 8):
        cfg = kernel.PagedConfig(pages_per_split=pps, num_stages=st)
        try:
          r = bench_one(B, avg, n, iters=iters, do_xla=False, do_check=False, config=cfg)
        except Exception as e:  # e.g. too much shared memory: report and go on
          r = dict(B=B, avg_ctx=avg, next_n=n, error=f"{type(e).__name__}: {str(e)[:80]}")
        r.update(pages_per_split=pps, num_stages=st)
        rows.append(r)
  print(f"\npaged_mqa_logits kernel configs on {common.card()}, jax {jax.__version__} "
        f"(default: {kernel.default_config(64, 85_000)} at B=64, 64K)")
  common.print_table(rows, ["B", "avg_ctx", "next_n", "pages_per_split", "num_stages",
                            "pallas_ms", "pallas_dev_ms", "cache_GBps", "pct_2p94", "error"])
  common.write_results("paged_mqa_logits_sweep", rows, out_dir, True)


if __name__ == "__main__":
  main()
