"""Paged-decode logits: every kernel variant (``PagedConfig``) by kernel time, beside DeepGEMM.

Usage (H200, from the project root):
  PYTHONPATH=. python3 benchmarks/bench_paged_variants.py --out $OUT [--peers $OUT/anchors.json]
      [--budget 200] [--shapes 64x16K,64x32Kx2] [--variants grid,pers_c2_s4]
  PYTHONPATH=. python3 benchmarks/bench_paged_variants.py --smoke   # CPU: interpret-mode checks

H = 64, D = 128, pages of 64 tokens in shuffled order, contexts 0.7-1.3x the average (B = 1:
exactly the average), ``max_context_len`` the largest context in whole pages, clean logits.
Per shape, every variant's output is first checked against the default's (``grid``: what
``nsa_jax.paged_mqa_logits`` runs today, every next_n in one launch): the same -inf pattern and calc_diff < 5e-6 (the default itself against the
float32 reference on the smaller shapes). Then the kernel time per call (``common.
kernel_ms_per_call``: every GPU kernel of a call summed from the torch profiler, L2 flushed
before each call, as DeepGEMM is timed). A persistent variant needs a plan (``paged_plan``,
a few XLA ops once per decode step, shared by every layer): ``plan_ms`` is its kernel time
alone, ``kernel_ms`` the logits kernel given the plan, ``ms`` their sum; ``GB/s`` counts 132
bytes per cached token (128 fp8 key bytes + a float32 scale) over ``ms``, ``GB/s_kernel`` over
``kernel_ms`` (DeepGEMM's own figure leaves its metadata kernel out). ``--peers`` reads the
anchors' JSON (``.anchors/run.sh --out``, same device call) and prints ours / DeepGEMM's GB/s.

One row per (shape, variant), each in its own try/except; the JSON (``--out``/
``paged_variants.json``) is rewritten after every row, and the run stops starting new rows when
``--budget`` seconds have passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.bench_paged_mqa_logits import context_lens, shuffled_tables  # noqa: E402
from kernels_pallas import paged_mqa_logits as kernel  # noqa: E402
from nsa_jax import ops, reference  # noqa: E402
from nsa_jax.cache import IndexKCache  # noqa: E402

H, D, PAGE = 64, 128, 64
BYTES_PER_TOKEN = D + 4
# The targets first: a budget cut keeps them.
SHAPES = [(64, 16384, 1), (32, 65536, 1), (64, 65536, 1), (128, 32768, 1), (8, 32768, 1),
          (64, 32768, 2), (64, 32768, 3), (64, 32768, 4), (1, 4096, 1), (1, 32768, 1),
          (1, 131072, 1), (64, 4096, 1)]
SMOKE_SHAPES = [(3, 200, 1), (2, 150, 2), (2, 130, 3), (1, 70, 4)]


def variants(num_sms: int) -> dict[str, kernel.PagedConfig | None]:
  """name -> config; None is the default path (ops' dispatch with the default config); a
  dict replaces fields of the shape's default config (``default_config(B, L)``)."""
  P = kernel.PagedConfig
  v = {"grid": None, "grid_rows64": dict(group_rows=64), "grid_st2": dict(num_stages=2),
       "grid_st8": dict(num_stages=8), "grid_p2x": "p2x", "grid_p_half": "p_half",
       "grid_t12": "t12", "grid_t8": "t8", "grid_st3": dict(num_stages=3),
       "grid_w_smem": dict(hoist_weights=False),
       "grid_w_smem_st2": dict(hoist_weights=False, num_stages=2),
       "grid_w_smem_st3": dict(hoist_weights=False, num_stages=3),
       "grid_smem_store": dict(direct_store=False),
       "grid_st6": dict(num_stages=6),
       "grid_fence": dict(release="fence"),
       "grid_fence_st5": dict(release="fence", num_stages=5),
       "grid_arrive": dict(release="arrive"),
       "grid_arrive_st5": dict(release="arrive", num_stages=5)}
  for c, s in [(1, 8), (1, 16), (2, 4), (2, 8), (4, 4)]:
    v[f"pers_c{c}_s{s}"] = P(schedule="persistent", ctas_per_sm=c, num_stages=s,
                             num_sms=num_sms)
  return v


def make_problem(B: int, avg: int, n: int, seed: int = 0):
  ctx = context_lens(B, avg, seed=B + avg)
  tables, P = shuffled_tables(ctx, seed)
  kk, ks, kq, kw = jax.random.split(jax.random.key(seed + 7), 4)
  k8 = jax.random.normal(kk, (P, PAGE, D), jnp.bfloat16).astype(jnp.float8_e4m3fn)
  scale = jax.random.uniform(ks, (P, PAGE), jnp.float32, 0.5, 2.0)
  q8 = jax.random.normal(kq, (B, n, H, D), jnp.bfloat16).astype(jnp.float8_e4m3fn)
  w = jax.random.normal(kw, (B * n, H), jnp.float32) * (H * D) ** -0.5
  L = tables.shape[1] * PAGE
  return dict(q8=q8, cache=IndexKCache(k8, scale), w=w, ctx=jnp.asarray(ctx),
              tables=jnp.asarray(tables), L=L, tokens=int(ctx.sum()))


def resolve(cfg, B: int, L: int):
  """A variant's config for this shape (None and PagedConfig pass through)."""
  if isinstance(cfg, str) and cfg.startswith("t"):  # another CTAs-per-SM target
    return kernel.default_config(B, L, ctas_per_sm=int(cfg[1:]))
  if isinstance(cfg, (dict, str)):
    base = kernel.default_config(B, L)
    if cfg == "p2x":
      cfg = dict(pages_per_split=min(2 * base.pages_per_split, 128))
    elif cfg == "p_half":
      cfg = dict(pages_per_split=max(base.pages_per_split // 2, 1))
    return dataclasses.replace(base, **cfg)
  return cfg


def make_call(cfg, n: int, L: int, interpret):
  """(logits fn(q8, cache, w, ctx, tables[, plan]), plan fn(ctx) or None)."""
  if cfg is None:  # the library's dispatch

    def f(q8, cache, w, ctx, tables):
      return ops._paged_pallas(q8, cache, w, ctx, tables, max_context_len=L,
                               clean_logits=True, interpret=interpret)
    return jax.jit(f), None

  def g(q8, cache, w, ctx, tables, plan=None):
    return kernel.paged_mqa_logits(q8, cache.k_fp8, cache.k_scale, w, ctx, tables, plan,
                                   max_context_len=L, interpret=interpret, config=cfg)
  if cfg is None or cfg.schedule != "persistent":
    return jax.jit(g), None
  return jax.jit(g), jax.jit(lambda ctx: kernel.paged_plan(ctx, L, cfg.num_ctas))


def calc_diff(x, y) -> float:
  x = np.where(np.isneginf(x), 0.0, np.asarray(x, np.float64))
  y = np.where(np.isneginf(y), 0.0, np.asarray(y, np.float64))
  denom = (x * x + y * y).sum()
  return float(1.0 - 2.0 * (x * y).sum() / denom) if denom > 0 else 0.0


def compare(out, ref, what: str) -> float:
  """Same -inf pattern and finite elsewhere, else AssertionError; returns calc_diff."""
  x, y = np.asarray(out), np.asarray(ref)
  if x.shape != y.shape:
    raise AssertionError(f"{what}: shape {x.shape} vs {y.shape}")
  bad = np.isneginf(x) != np.isneginf(y)
  if bad.any():
    raise AssertionError(f"{what}: -inf pattern differs at {np.argwhere(bad)[:5].tolist()}")
  if not np.isfinite(x[~np.isneginf(x)]).all():
    raise AssertionError(f"{what}: non-finite values outside the -inf pattern")
  d = calc_diff(x, y)
  if not d < 5e-6:
    raise AssertionError(f"{what}: calc_diff {d:.2e} >= 5e-6")
  return d


def peers_table(path: str | None) -> dict:
  """(B, ctx, next_n) -> DeepGEMM's paged row from the anchors' JSON."""
  return {(r["B"], r["ctx"], r.get("next_n", 1)): r
          for r in common.anchor_rows(path, "paged", "bench_paged_variants")
          if r.get("cache_gbs")}


def fits(cfg, n: int) -> str | None:
  """Why this config cannot run as meant (None if it can)."""
  if cfg is None:
    return None
  need = kernel.smem_bytes(n, H, cfg)
  if need * cfg.ctas_per_sm > 227 * 1024:
    return f"{cfg.ctas_per_sm} CTAs x {need} B of SMEM do not fit one SM"
  return None


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=None, help="directory for paged_variants.json")
  ap.add_argument("--peers", default=None, help="the anchors' anchors.json (same run)")
  ap.add_argument("--budget", type=float, default=200.0, help="seconds; then stop early")
  ap.add_argument("--shapes", default="", help="BxCTX[xNEXT_N] list, K suffix ok: 64x32Kx2")
  ap.add_argument("--variants", default="", help="comma list of variant names (default all)")
  ap.add_argument("--calls", type=int, default=10, help="profiled calls per timing")
  ap.add_argument("--smoke", action="store_true",
                  help="tiny shapes; on a CPU, interpret-mode checks only (no timing)")
  args = ap.parse_args(argv)
  t_start = time.monotonic()
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not args.smoke:
    sys.exit("bench_paged_variants: no GPU; run with --smoke for interpret-mode checks")
  interpret = False if on_gpu else True
  num_sms = int(getattr(jax.devices()[0], "core_count", 0) or 132) if on_gpu else 2
  vs = variants(num_sms)
  if args.variants:
    vs = {k: vs[k] for k in args.variants.split(",")}
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  if args.shapes:
    shapes = []
    for e in args.shapes.split(","):
      parts = [int(p[:-1]) * 1024 if p.upper().endswith("K") else int(p)
               for p in e.lower().split("x")]
      shapes.append((parts[0], parts[1], parts[2] if len(parts) > 2 else 1))
  peers = peers_table(args.peers)
  rows = []
  meta = dict(benchmark="paged_variants", card=common.card(), jax=jax.__version__,
              num_sms=num_sms, H=H, D=D,
              variants={k: (str(v) if v is not None else "ops default") for k, v in vs.items()})

  def write():
    if not args.out:
      return
    os.makedirs(args.out, exist_ok=True)
    payload = dict(meta, date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), rows=rows)
    with open(os.path.join(args.out, "paged_variants.json"), "w") as f:
      json.dump(payload, f, indent=1)

  stopped = False
  for B, avg, n in shapes:
    if stopped:
      break
    tag = f"{B}x{avg}" + (f"x{n}" if n > 1 else "")
    try:
      p = make_problem(B, avg, n)
    except Exception as e:  # noqa: BLE001 - report the shape, go on
      rows.append(dict(shape=tag, B=B, ctx=avg, next_n=n, error=f"{type(e).__name__}: {e}"[:300]))
      print(f"{tag}: problem failed: {rows[-1]['error']}", flush=True)
      continue
    a = (p["q8"], p["cache"], p["w"], p["ctx"], p["tables"])
    default_out = None
    peer = peers.get((B, avg, n))
    for name, cfg in vs.items():
      if time.monotonic() - t_start > args.budget:
        print(f"budget of {args.budget:.0f} s spent: stopping before {tag} {name}", flush=True)
        stopped = True
        break
      row = dict(shape=tag, B=B, ctx=avg, next_n=n, variant=name, L=p["L"],
                 tokens=p["tokens"], cache_MB=p["tokens"] * BYTES_PER_TOKEN / 1e6)
      try:
        cfg = resolve(cfg, B, p["L"])
        why = fits(cfg, n)
        if why:
          row["skipped"] = why
          rows.append(row)
          continue
        fn, plan_fn = make_call(cfg, n, p["L"], interpret)
        plan = plan_fn(p["ctx"]) if plan_fn else None
        out = fn(*a, plan) if plan_fn else fn(*a)
        out = np.asarray(out)
        if default_out is None:
          if name != "grid":
            raise RuntimeError("the default variant 'grid' must run first")
          if B * avg <= 64 * 16384 or args.smoke:
            ref = jax.jit(lambda *x: reference.paged_mqa_logits(*x, max_context_len=p["L"]))(
                p["q8"], p["cache"].k_fp8, p["cache"].k_scale, p["w"], p["ctx"], p["tables"])
            row["calc_diff_ref"] = compare(out, ref, f"{tag} grid vs reference")
          default_out = out
        else:
          row["calc_diff_default"] = compare(out, default_out, f"{tag} {name} vs grid")
        if on_gpu:
          if plan_fn:
            row["kernel_ms"] = common.kernel_ms_per_call(fn, (*a, plan), calls=args.calls)
            row["plan_ms"] = common.kernel_ms_per_call(plan_fn, (p["ctx"],), calls=args.calls)
            row["ms"] = row["kernel_ms"] + row["plan_ms"]
          else:
            row["kernel_ms"] = row["ms"] = common.kernel_ms_per_call(fn, a, calls=args.calls)
            row["plan_ms"] = 0.0
          tb = p["tokens"] * BYTES_PER_TOKEN
          row["GB/s"] = tb / (row["ms"] * 1e-3) / 1e9
          row["GB/s_kernel"] = tb / (row["kernel_ms"] * 1e-3) / 1e9
          if peer:
            row["dg_kineto_ms"] = peer.get("kineto_ms")
            row["dg_GB/s"] = peer["cache_gbs"]
            row["vs_dg"] = row["GB/s"] / peer["cache_gbs"]
            row["vs_dg_kernel"] = row["GB/s_kernel"] / peer["cache_gbs"]
      except Exception as e:  # noqa: BLE001 - one row failing must not stop the others
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      rows.append(row)
      shown = {k: row[k] for k in ("ms", "kernel_ms", "plan_ms", "GB/s", "vs_dg", "error",
                                   "skipped") if k in row}
      print(f"{tag} {name}: {shown}", flush=True)
      write()
  write()
  cols = ["shape", "variant", "ms", "kernel_ms", "plan_ms", "GB/s", "GB/s_kernel", "dg_GB/s",
          "vs_dg", "vs_dg_kernel", "calc_diff_default", "error", "skipped"]
  print(f"\npaged variants on {common.card()}, jax {jax.__version__}, {num_sms} SMs, H={H}; "
        f"{time.monotonic() - t_start:.0f} s" + ("" if on_gpu else " (interpret mode: checks only)"))
  common.print_table(rows, cols)
  best = {}
  for r in rows:
    if r.get("GB/s"):
      if r["shape"] not in best or r["GB/s"] > best[r["shape"]]["GB/s"]:
        best[r["shape"]] = r
  if best:
    print("\nbest variant per shape (GB/s incl. plan; vs DeepGEMM):")
    for s, r in best.items():
      vs_dg = f"{r['vs_dg']:.2f}x" if r.get("vs_dg") else "-"
      print(f"  {s}: {r['variant']} {r['GB/s']:.0f} GB/s ({vs_dg})")
  if any(r.get("error") for r in rows):
    print("\nsome rows failed (see the error column)")


if __name__ == "__main__":
  main()
