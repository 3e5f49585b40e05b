"""Budgeted prefill top-k: a 64K-token single-sequence causal prefill under the memory budget.

Usage: python benchmarks/bench_prefill_topk.py [--smoke] [--out DIR] [--no-unchunked]
                                               [--mem-fraction-static F] [--budget-bytes N]

Rows:
- ``budgeted``: ``prefill_topk`` with the cached budget (primed once, before tracing): time,
  peak device memory (``memory_stats()["peak_bytes_in_use"]``, cumulative, so this row runs
  first), compiled temp memory (``memory_analysis``), budget, chunks.
- ``unchunked``: the same call with an unlimited budget (16 GiB of logits at 64K), for the
  memory comparison; it runs after ``budgeted`` because the device's peak only grows.
- ``query/call``: a variant that re-reads free memory on every call (sglang before PR #25299:
  ``torch.cuda.mem_get_info`` per prefill), against the cached budget; per-call host time and
  end-to-end time, on the 64K shape and on a serving-sized 4K x 16K chunk.
Writes JSON to --out and (unless --smoke) benchmarks/results/prefill_topk.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import nsa_jax  # noqa: E402
from nsa_jax import budget  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GiB = 2 ** 30


def problem(T, S, H, D, seed=0):
  """Causal single-sequence prefill: the last T of S tokens are the queries.

  q is made in blocks of 4096 rows so that making it does not set the device's peak memory
  (``peak_bytes_in_use`` only grows, and the budgeted run is measured after this)."""
  key = jax.random.key(seed)
  kq, kk, kw = jax.random.split(key, 3)
  quant = jax.jit(lambda x: nsa_jax.act_quant(x))
  q8s, qss = [], []
  for i, r in enumerate(range(0, T, 4096)):
    n = min(4096, T - r)
    q8, qs = quant(jax.random.normal(jax.random.fold_in(kq, i), (n, H, D), jnp.bfloat16))
    q8s.append(q8)
    qss.append(qs[..., 0])
  q8, qs = jnp.concatenate(q8s), jnp.concatenate(qss)
  del q8s, qss
  k8, ksc = quant(jax.random.normal(kk, (S, D), jnp.bfloat16))
  w = jax.random.normal(kw, (T, H), jnp.float32) * H ** -0.5 * qs * D ** -0.5
  ks = jnp.zeros((T,), jnp.int32)
  ke = jnp.arange(T, dtype=jnp.int32) + (S - T + 1)
  args = (q8, k8, ksc[:, 0], w, ks, ke)
  jax.block_until_ready(args)
  return args


def timed(fn, *args, warmup, iters):
  """(median seconds end to end, median seconds until the call returns on the host)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  total, host = [], []
  for _ in range(iters):
    t0 = time.perf_counter()
    out = fn(*args)
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    total.append(time.perf_counter() - t0)
    host.append(t1 - t0)
  return statistics.median(total), statistics.median(host)


def mem(dev, key):
  stats = dev.memory_stats()
  return None if not stats else stats.get(key)


def gib(x):
  return None if x is None else x / GiB


def temp_bytes(fn, *args):
  try:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
  except Exception:  # memory_analysis is not on every backend
    return None


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU-friendly)")
  ap.add_argument("--out", default=None, help="also write the JSON into this folder")
  ap.add_argument("--no-unchunked", action="store_true", help="skip the unchunked comparison")
  ap.add_argument("--mem-fraction-static", type=float, default=0.85,
                  help="share of device memory reserved for weights and KV cache (sglang's "
                       "--mem-fraction-static); the budget is what is left (default 0.85)")
  ap.add_argument("--budget-bytes", type=int, default=None,
                  help="explicit budget instead of the primed one")
  ap.add_argument("--k", type=int, default=2048)
  args = ap.parse_args(argv)

  dev = jax.devices()[0]
  on_gpu = dev.platform == "gpu"
  if args.smoke:
    # 2048 x 4096 = 8.4M logits: just above sglang's 8M skip, so the chunked path runs.
    T, S = 2048, 4096
    H, D = (64, 128) if on_gpu else (4, 128)
    warmup, iters, serve = 1, 3, None
  else:
    T = S = 65536
    H, D = 64, 128
    warmup, iters, serve = 1, 3, (4096, 16384)
  k = args.k

  budget.configure(mem_fraction_static=args.mem_fraction_static)
  primed = budget.prime(dev)                   # the one memory query, before any tracing
  # A smoke budget of a quarter of the logits, so the chunked path runs whatever the device.
  b = args.budget_bytes or (T * S * 4 // 4 if args.smoke else primed)
  plan = nsa_jax.plan_chunks(T, S, b)
  xs = problem(T, S, H, D)
  in_use = mem(dev, "bytes_in_use")
  card = dev.device_kind
  meta = dict(card=card, jax=jax.__version__, backend=jax.default_backend(),
              date=datetime.date.today().isoformat(), mem_fraction_static=args.mem_fraction_static,
              primed_budget_bytes=primed, query=budget.query_device_memory(dev))
  rows = []

  budgeted = jax.jit(lambda *a: nsa_jax.prefill_topk(*a, k=k, budget_bytes=b))
  t, _ = timed(budgeted, *xs, warmup=warmup, iters=iters)
  rows.append(dict(variant="budgeted", T=T, S=S, H=H, time_ms=t * 1e3,
                   peak_GiB=gib(mem(dev, "peak_bytes_in_use")), inputs_GiB=gib(in_use),
                   temp_GiB=gib(temp_bytes(budgeted, *xs)), budget_GiB=gib(b),
                   chunks=plan.num_chunks, rows=plan.rows, card=card, jax=jax.__version__))
  ref_out = budgeted(*xs)

  if not args.no_unchunked:
    full = jax.jit(lambda *a: nsa_jax.prefill_topk(*a, k=k, budget_bytes=2 ** 62))
    row = dict(variant="unchunked", T=T, S=S, H=H, budget_GiB=None, chunks=1, rows=T,
               card=card, jax=jax.__version__)
    try:
      t, _ = timed(full, *xs, warmup=warmup, iters=iters)
      out = full(*xs)
      same = float(np.mean(np.sort(np.asarray(out), 1) == np.sort(np.asarray(ref_out), 1)))
      row.update(time_ms=t * 1e3, peak_GiB=gib(mem(dev, "peak_bytes_in_use")),
                 temp_GiB=gib(temp_bytes(full, *xs)), same_as_budgeted=same)
      del out
    except Exception as e:  # an OOM here is the point of the budget; report it
      row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    rows.append(row)

  # What the cache saves: the same call, re-reading free memory first every time.
  n_query = 200
  t0 = time.perf_counter()
  for _ in range(n_query):
    budget.query_device_memory(dev)
  query_us = (time.perf_counter() - t0) / n_query * 1e6

  def per_call_query(*a):
    budget.reset(dev)
    bb = budget.prime(dev)
    return nsa_jax.prefill_topk(*a, k=k, budget_bytes=bb if not args.smoke else b)

  def cached(*a):
    return nsa_jax.prefill_topk(*a, k=k, budget_bytes=budget.budget_bytes(dev) if not args.smoke
                                else b)

  shapes = [(T, S, xs)] + ([(serve[0], serve[1], problem(*serve, H, D, seed=1))] if serve else [])
  for Tq, Sq, a in shapes:
    q_iters = iters if args.smoke else (5 if Tq * Sq > 2 ** 30 else 20)
    budget.reset(dev)
    budget.prime(dev)
    t_c, h_c = timed(cached, *a, warmup=warmup, iters=q_iters)
    t_q, h_q = timed(per_call_query, *a, warmup=warmup, iters=q_iters)
    rows.append(dict(variant="query/call", T=Tq, S=Sq, H=H, time_ms=t_q * 1e3,
                     cached_ms=t_c * 1e3, host_ms=h_q * 1e3, cached_host_ms=h_c * 1e3,
                     query_us=query_us, card=card, jax=jax.__version__))

  cols = ["variant", "T", "S", "time_ms", "cached_ms", "host_ms", "cached_host_ms", "query_us",
          "peak_GiB", "temp_GiB", "budget_GiB", "chunks", "rows", "card", "jax"]
  print_table(rows, cols)
  print(f"plan: {plan}; primed budget {primed / GiB:.2f} GiB; memory query "
        f"{meta['query']}")
  payload = dict(benchmark="prefill_topk", smoke=args.smoke, rows=rows, **meta)
  dirs = [d for d in (args.out, None if args.smoke else RESULTS) if d]
  for d in dirs:
    os.makedirs(d, exist_ok=True)
    name = "prefill_topk_smoke.json" if args.smoke else "prefill_topk.json"
    with open(os.path.join(d, name), "w") as f:
      json.dump(payload, f, indent=1, default=str)
  return payload


def print_table(rows, cols):
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return "-" if v is None else str(v)
  cols = [c for c in cols if any(c in r for r in rows)]
  widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in cols]
  print(" | ".join(c.rjust(w) for c, w in zip(cols, widths)))
  print("-|-".join("-" * w for w in widths))
  for r in rows:
    print(" | ".join(fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)))
  for r in rows:
    if "error" in r:
      print(f"{r['variant']}: {r['error']}")


if __name__ == "__main__":
  main()
