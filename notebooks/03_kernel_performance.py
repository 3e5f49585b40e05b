# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Kernel performance on the H100 and the H200
#
# The benchmark scripts in `benchmarks/` time the Pallas kernels against the `xla` backend on a
# GPU and write `benchmarks/results/<name>.json`. This notebook plots the committed results
# (measured on an H100 and, since 2026-12-02, an H200 beside the CUDA peers; nothing here
# needs a GPU) and, when a GPU is present, re-runs
# a small benchmark live.
#
# How to read the numbers:
#
# - **Useful TFLOP/s** (logits kernels) counts only the valid `(query, key)` pairs of the causal
#   mask: `2 * pairs * H * D / time`. Work spent on masked pairs does not count.
# - **Ceilings are measured, not datasheet**: the fp8 ceiling is an 8192³ fp8 matmul through
#   XLA on the same card (each `mqa_logits` run measures it again and stores it as
#   `fp8_ceiling_tflops`; the project's anchor from another day is 1518 TFLOP/s); the memory
#   ceiling is a device-to-device copy, 2.94 TB/s.
# - **GB/s** (top-k) counts the logits read once, `rows * keys * 4` bytes, over the kernel time;
#   the *floor* is that read at the copy rate.
#
# The tables with dates, cards and the story behind each miss are in `BENCHMARKS.md` and
# `benchmarks/NOTES.md`.

# %%
# %matplotlib inline
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = next(p for p in [pathlib.Path.cwd().resolve(), *pathlib.Path.cwd().resolve().parents]
            if (p / "pyproject.toml").exists() and (p / "benchmarks").is_dir())
sys.path.insert(0, str(ROOT))   # `benchmarks` is not an installed package

import jax
import matplotlib.pyplot as plt
import numpy as np

from benchmarks import common

# NSA_JAX_RESULTS_DIR: plot another folder of results (e.g. a GPU CI run's --out folder).
RESULTS = pathlib.Path(os.environ.get("NSA_JAX_RESULTS_DIR", ROOT / "benchmarks" / "results"))
FP8_ANCHOR = common.FP8_CEILING_TFLOPS          # TFLOP/s
COPY_CEILING_GBS = common.COPY_CEILING_TBS * 1e3  # GB/s


def load_results(folder):
  out = {}
  for path in sorted(pathlib.Path(folder).glob("*.json")):
    try:
      with open(path) as f:
        out[path.stem] = json.load(f)
    except (OSError, ValueError) as e:
      print(f"skipping {path.name}: {e}")
  return out


def show_table(rows, cols=None):
  """Prints dict rows as an aligned text table (columns: those given, else all)."""
  cols = cols or list(dict.fromkeys(c for r in rows for c in r))
  cols = [c for c in cols if any(c in r for r in rows)]
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.1e}" if 0 < abs(v) < 1e-3 else (f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}")
    return "-" if v is None else str(v)

  widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in cols]
  print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
  for r in rows:
    print("  ".join(fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)))


results = load_results(RESULTS)
print(f"{len(results)} result files in {RESULTS}:")
show_table([dict(file=f"{k}.json", card=v.get("card"), date=v.get("date"), jax=v.get("jax"),
                 rows=len(v.get("rows", []))) for k, v in results.items()])


def missing(name, script):
  if name in results:
    return False
  print(f"No {name}.json yet: it is written by `python benchmarks/{script}` on a GPU.")
  return True


def device_ms(r, key):
  """Device time per call where a result row has it (benchmarks since the third session),
  else the older wall time of one call."""
  return r.get(f"{key}_dev_ms", r.get(f"{key}_ms", np.nan))


def time_panel(ax, rows, labels, baseline, color, floor_label, rotation):
  """Baseline, Pallas and floor times per shape (log scale), the speedup above each pair."""
  x, wdt = np.arange(len(rows)), 0.28
  ax.bar(x - wdt, [device_ms(r, "xla") for r in rows], wdt, label=baseline, color="tab:orange")
  ax.bar(x, [device_ms(r, "pallas") for r in rows], wdt, label="Pallas", color=color)
  ax.bar(x + wdt, [r.get("floor_ms", np.nan) for r in rows], wdt, label=floor_label,
         color="lightgray")
  for i, r in enumerate(rows):
    sp = r.get("speedup_dev", r.get("speedup"))
    if sp is not None:
      ax.annotate(f"{sp:.1f}x", (i - wdt, device_ms(r, "xla")), ha="center", va="bottom",
                  fontsize=8)
  ax.set_yscale("log")
  ax.set_xticks(x, labels, rotation=rotation, fontsize=8 if rotation > 30 else None)
  ax.set_ylabel("ms per call on the device (log)")
  ax.set_title(f"{baseline} vs Pallas (speedup above)")
  ax.legend(fontsize=8)

# %% [markdown]
# ## Prefill logits: `mqa_logits`
#
# The fp8 `[T, S]` logits of a causal prefill with H = 64, D = 128 (V3.2's shapes): the last T
# of S tokens are the queries. Left: useful TFLOP/s of the Pallas kernel (Mosaic GPU, fp8
# `wgmma`) against the fp8 ceiling measured in the same run. Right: time against the `xla`
# backend, the memory-bounded jnp reference (an fp8 einsum over chunks of query rows, ReLU,
# weighted head sum, mask).

# %%
if not missing("mqa_logits", "bench_mqa_logits.py"):
  res = results["mqa_logits"]
  rows = res["rows"]
  labels = [f"{r['T']}x{r['S']}" for r in rows]
  x = np.arange(len(rows))
  ceiling = res.get("fp8_ceiling_tflops")
  fig, axes = plt.subplots(1, 2, figsize=(13, 4))
  bars = axes[0].bar(x, [r["tflops"] for r in rows], color="tab:blue", label="Pallas kernel")
  if ceiling:
    axes[0].axhline(ceiling, color="k", ls="--", lw=1,
                    label=f"fp8 ceiling, same run ({ceiling:.0f})")
    for b, r in zip(bars, rows):
      axes[0].annotate(f"{100 * r['tflops'] / ceiling:.0f}%", (b.get_x() + b.get_width() / 2,
                       b.get_height()), ha="center", va="bottom", fontsize=8)
  axes[0].axhline(FP8_ANCHOR, color="gray", ls=":", lw=1, label=f"fp8 anchor ({FP8_ANCHOR:.0f})")
  axes[0].set_xticks(x, labels, rotation=30)
  axes[0].set_ylabel("useful TFLOP/s")
  axes[0].set_title(f"mqa_logits on {res.get('card')}")
  axes[0].legend(fontsize=8, loc="lower right")
  if any("xla_ms" in r for r in rows):
    wdt = 0.4
    axes[1].bar(x - wdt / 2, [r.get("xla_ms", np.nan) for r in rows], wdt, label="xla backend",
                color="tab:orange")
    axes[1].bar(x + wdt / 2, [r["pallas_ms"] for r in rows], wdt, label="Pallas", color="tab:blue")
    for i, r in enumerate(rows):
      if "speedup" in r:
        axes[1].annotate(f"{r['speedup']:.0f}x", (i, r["xla_ms"]), ha="center", va="bottom",
                         fontsize=8)
    axes[1].set_yscale("log")
    axes[1].set_xticks(x, labels, rotation=30)
    axes[1].set_ylabel("ms (log)")
    axes[1].set_title("xla vs Pallas (speedup above the bars)")
    axes[1].legend(fontsize=8)
  else:
    axes[1].set_axis_off()
    axes[1].text(0.5, 0.5, "no xla column in this run\n(it was run with --no-xla)",
                 ha="center", va="center")
  fig.tight_layout()
  plt.show()
  show_table(rows, ["T", "S", "pairs_M", "pallas_ms", "tflops", "pct_ceiling", "xla_ms", "speedup"])

# %% [markdown]
# Long rows come closest to the ceiling: every CTA pays a fixed prologue (loading its queries,
# filling the pipeline) that long rows amortize over more key tiles.
#
# ### Kernel variants
#
# `bench_mqa_logits.py --variants` times explicit kernel configurations on the same shapes:
# queries per block (`block_q`, times H = 64 gives the wgmma N), keys per tile (`block_kv`),
# pipeline stages, and whether the longest rows are launched first.

# %%
if "mqa_logits_variants" in results:
  vrows = results["mqa_logits_variants"]["rows"]
  shapes = list(dict.fromkeys((r["T"], r["S"]) for r in vrows))
  configs = list(dict.fromkeys((r["block_q"], r["block_kv"], r["stages"], r["heavy_first"])
                               for r in vrows))
  fig, ax = plt.subplots(figsize=(8, 4))
  for cfg_ in configs:
    by_shape = {(r["T"], r["S"]): r["tflops"] for r in vrows
                if (r["block_q"], r["block_kv"], r["stages"], r["heavy_first"]) == cfg_}
    ax.plot(range(len(shapes)), [by_shape.get(s, np.nan) for s in shapes], "o-", ms=4,
            label=f"block_q {cfg_[0]}, block_kv {cfg_[1]}, {cfg_[2]} stages"
                  f"{', heavy first' if cfg_[3] else ''}")
  ax.set_xticks(range(len(shapes)), [f"{t}x{s}" for t, s in shapes], rotation=30)
  ax.set_ylabel("useful TFLOP/s")
  ax.set_title("mqa_logits kernel variants")
  ax.legend(fontsize=7)
  fig.tight_layout()
  plt.show()
else:
  print("No mqa_logits_variants.json (bench_mqa_logits.py --variants ... writes it).")

# %% [markdown]
# ## Top-k: `topk_indices`
#
# Top-2048 of float32 rows, beside FlashInfer's and sgl-kernel's top-k **timed in the same
# device call** (`bench_topk.py --peers`, which reads `.anchors/run.sh`'s results): kernel time
# per call from the profiler, L2 flushed, for all three. Rows up to 32768 keys are held in one
# CTA's shared memory; longer rows are streamed through one CTA each (two reads) when there are
# many rows, or split into segments and merged when there are few (decode). Left: time relative
# to the best peer (lower is better). Right: GB/s of one read of the logits, against the copy
# ceiling.

# %%
if not missing("topk", "bench_topk.py"):
  res = results["topk"]
  rows = [r for r in res["rows"] if r.get("mosaic_kernel_ms") and r.get("fi_ms")]
  if not rows:
    print("topk.json has no kernel times beside the peers (a CPU smoke run?)")
  else:
    labels = [r["shape"] for r in rows]
    best = np.array([min(r["fi_ms"], r["sgl_ms"]) for r in rows])
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4))
    for i, (name, key, color) in enumerate([("nsa_jax (Mosaic GPU)", "mosaic_kernel_ms", "tab:green"),
                                            ("FlashInfer", "fi_ms", "tab:blue"),
                                            ("sgl-kernel", "sgl_ms", "tab:orange")]):
      axes[0].bar(x + (i - 1) * 0.27, np.array([r[key] for r in rows]) / best, 0.27,
                  color=color, label=name)
    axes[0].axhline(1.0, color="k", lw=1, ls="--")
    axes[0].set_xticks(x, labels, rotation=30)
    axes[0].set_ylabel("kernel time / best peer's (lower is better)")
    axes[0].set_title(f"top-2048 on {res.get('card')}, {res.get('date')}, same call")
    axes[0].legend(fontsize=8)
    axes[1].bar(x, [r["gbs"] for r in rows], color="tab:green", label="nsa_jax")
    axes[1].bar(x + 0.3, [4 * int(r["shape"].split("x")[0]) * int(r["shape"].split("x")[1].rstrip("c"))
                          / r["fi_ms"] / 1e6 for r in rows], 0.3, color="tab:blue",
                label="FlashInfer")
    axes[1].axhline(COPY_CEILING_GBS, color="k", ls="--", lw=1,
                    label=f"copy ceiling ({COPY_CEILING_GBS:.0f} GB/s)")
    axes[1].set_xticks(x + 0.15, labels, rotation=30)
    axes[1].set_ylabel("GB/s (logits read once)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    plt.show()
    show_table(rows, ["shape", "levels", "mosaic_kernel_ms", "fi_ms", "sgl_ms", "vs_peer",
                      "floor_ms", "mosaic_same_sets"])

# %% [markdown]
# Where the time of a whole prefill goes (`T = S = 32768`, causal, H = 64): the logits, then the
# top-k, and `prefill_topk` end to end (chunked under the memory budget).

# %%
split = results.get("topk", {}).get("prefill_split") or []
if not split:
  print("No prefill split in topk.json (bench_topk.py writes it on a GPU unless --no-prefill).")
else:
  s = split[0]
  fig, ax = plt.subplots(figsize=(7, 2.6))
  ax.barh(["logits + top-k"], [s["logits_ms"]], color="tab:blue", label="logits (Pallas)")
  ax.barh(["logits + top-k"], [s["topk_ms"]], left=[s["logits_ms"]], color="tab:green",
          label="top-k (Mosaic GPU)")
  ax.barh(["prefill_topk, measured"], [s["prefill_topk_ms"]], color="tab:purple")
  ax.set_xlabel("ms")
  ax.set_title(f"T = S = {s['T']} causal: prefill_topk {s['prefill_topk_ms']:.1f} ms, "
               f"top-k {100 * s['topk_share']:.0f}% of the pair")
  ax.invert_yaxis()
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  plt.show()

# %% [markdown]
# ## Decode logits: `paged_mqa_logits`
#
# One decode step of `B` requests (`next_n` new tokens each) against their paged fp8 K caches
# (contexts between 0.7x and 1.3x the average). Decode is memory-bound: the work per cached key
# is tiny, so the measure is the cache bytes read per second (`cache_GBps`) against the copy
# ceiling; the floor also counts writing the `[B * next_n, max_ctx]` logits.

# %%
if not missing("paged_mqa_logits", "bench_paged_mqa_logits.py"):
  res = results["paged_mqa_logits"]
  rows = [r for r in res["rows"] if "pallas_ms" in r]
  if not rows:
    print("paged_mqa_logits.json has no timings")
  else:
    labels = [f"B{r['B']} ctx{r['avg_ctx']} n{r['next_n']}" for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    axes[0].bar(x, [r["cache_GBps"] for r in rows], color="tab:cyan", label="Pallas kernel")
    axes[0].axhline(COPY_CEILING_GBS, color="k", ls="--", lw=1,
                    label=f"copy ceiling, anchor ({COPY_CEILING_GBS:.0f} GB/s)")
    measured = res.get("copy_ceiling_tbs_measured")
    if measured:
      axes[0].axhline(measured * 1e3, color="gray", ls=":", lw=1,
                      label=f"copy ceiling, same run ({measured * 1e3:.0f} GB/s)")
    axes[0].set_xticks(x, labels, rotation=40, fontsize=8)
    axes[0].set_ylabel("GB/s of K cache read")
    axes[0].set_title(f"paged_mqa_logits on {res.get('card')}")
    axes[0].legend(fontsize=8, loc="lower right")
    time_panel(axes[1], rows, labels, "xla backend", "tab:cyan",
               "floor (read cache + write logits)", 40)
    fig.tight_layout()
    plt.show()
    show_table(rows, ["B", "avg_ctx", "next_n", "cache_MB", "pallas_ms", "pallas_dev_ms",
                      "floor_ms", "cache_GBps", "pct_2p94", "xla_ms", "xla_dev_ms", "speedup",
                      "calc_diff"])

# %% [markdown]
# ### Both logits kernels beside DeepGEMM (same device call)
#
# `.anchors/run.sh` times DeepGEMM's `fp8_mqa_logits` and `fp8_paged_mqa_logits` in the same
# device call as `bench_mqa_variants.py` / `bench_paged_variants.py`, all by kernel time from the
# profiler with L2 flushed. Left: prefill logits (causal, D = 128), our default schedule and our
# best variant, as a fraction of DeepGEMM's speed. Right: paged decode logits, the cache GB/s of
# our default kernel and of DeepGEMM (132 bytes per cached token; each side's own random
# contexts). Above 1.0 (left) or the peer's bar (right) is faster than DeepGEMM.

# %%
# The latest same-call prefill figures: the eighth session's schedule comparison, else the
# library default of the sixth session's final code, else the earlier schedule comparison.
mv = (results.get("mqa_variants_loopfree_h200") or results.get("mqa_default_h200_call3")
      or results.get("mqa_variants_h200"))


def default_schedule(rows, T, S, H):
  """The row of the schedule the library's default takes at (T, S, H): in a comparison of
  both schedules, the one ``BALANCE_MIN_TILES`` picks today; else the run's "default" row."""
  names = {r["variant"] for r in rows}
  if {"balanced", "round_robin"} <= names:
    from kernels_pallas.mqa_logits import BALANCE_MIN_TILES, MqaLogitsConfig
    tiles = -(-S // MqaLogitsConfig.for_heads(H).block_kv)
    want = "balanced" if tiles >= BALANCE_MIN_TILES else "round_robin"
  else:
    want = "default"
  return next(r for r in rows if r["variant"] == want)


pv, pa = (results.get(k) for k in ("paged_variants", "anchors_paged_h200"))
if not (mv or (pv and pa)):
  print("No same-call logits results (bench_mqa_variants.py / bench_paged_variants.py with "
        ".anchors/run.sh write them on a GPU).")
else:
  fig, axes = plt.subplots(1, 2, figsize=(14, 4))
  if mv:
    shapes = list(dict.fromkeys((r["T"], r["S"], r["H"]) for r in mv["rows"]
                                if r.get("deepgemm_ms")))
    default, best = [], []
    for sh in shapes:
      rs = [r for r in mv["rows"] if (r["T"], r["S"], r["H"]) == sh and r.get("ms")]
      d = default_schedule(rs, *sh)
      default.append(d["deepgemm_ms"] / d["ms"])
      best.append(max(r["deepgemm_ms"] / r["ms"] for r in rs))
    x = np.arange(len(shapes))
    axes[0].bar(x - 0.2, default, 0.4, color="tab:blue", label="nsa_jax default")
    axes[0].bar(x + 0.2, best, 0.4, color="tab:cyan", label="nsa_jax best variant")
    axes[0].axhline(1.0, color="k", ls="--", lw=1, label="DeepGEMM")
    axes[0].set_xticks(x, [f"{t}x{s_} H{h}" for t, s_, h in shapes], rotation=20)
    axes[0].set_ylabel("DeepGEMM time / ours (higher is faster)")
    axes[0].set_ylim(0, 1.2)
    axes[0].set_title(f"prefill logits, {mv.get('card')}, {str(mv.get('date'))[:10]}")
    axes[0].legend(fontsize=8, loc="lower right")
  else:
    axes[0].set_axis_off()
  if pv and pa:
    dg = {(r["B"], r["ctx"], r.get("next_n", 1)): r["cache_gbs"] for r in pa.get("paged", [])
          if r.get("cache_gbs")}
    rows = [r for r in pv["rows"] if r.get("variant") == "grid" and "call" not in r
            and r.get("GB/s")]
    x = np.arange(len(rows))
    peer = [dg.get((r["B"], r["ctx"], r["next_n"]), np.nan) for r in rows]
    axes[1].bar(x - 0.2, [r["GB/s"] for r in rows], 0.4, color="tab:blue", label="nsa_jax")
    axes[1].bar(x + 0.2, peer, 0.4, color="tab:orange", label="DeepGEMM")
    for i, (r, p_) in enumerate(zip(rows, peer)):
      if np.isfinite(p_):
        axes[1].annotate(f"{r['GB/s'] / p_:.2f}x", (i - 0.2, r["GB/s"]), ha="center",
                         va="bottom", fontsize=8)
    axes[1].axhline(COPY_CEILING_GBS, color="gray", ls=":", lw=1,
                    label=f"copy ceiling ({COPY_CEILING_GBS:.0f} GB/s)")
    axes[1].set_xticks(x, [r["shape"] for r in rows], rotation=20)
    axes[1].set_ylabel("GB/s of K cache read (kernel time)")
    axes[1].set_title(f"paged decode logits, {pv.get('card')}, {str(pv.get('date'))[:10]}")
    axes[1].legend(fontsize=8, loc="lower right")
  else:
    axes[1].set_axis_off()
  fig.tight_layout()
  plt.show()

# %% [markdown]
# ## Budgeted prefill: `prefill_topk`
#
# One 65536-token prompt: 16 GiB of logits if materialized. Under the budget (notebook 02) the
# queries run in chunks, so peak memory stays near the budget; unchunked, the logits alone take
# 16 GiB. The `query/call` row re-reads free memory before every call (what sglang did before
# caching the budget).

# %%
if not missing("prefill_topk", "bench_prefill_topk.py"):
  res = results["prefill_topk"]
  rows = res["rows"]
  mem_rows = [r for r in rows if r["variant"] in ("budgeted", "unchunked") and "peak_GiB" in r]
  if mem_rows:
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    names = [f"{r['variant']}\n({r['chunks']} x {r['rows']} rows)" for r in mem_rows]
    x = np.arange(len(mem_rows))
    axes[0].bar(x - 0.2, [r["peak_GiB"] for r in mem_rows], 0.4, label="peak device memory")
    axes[0].bar(x + 0.2, [r.get("temp_GiB") or np.nan for r in mem_rows], 0.4,
                label="compiled temp memory")
    b = next((r["budget_GiB"] for r in mem_rows if r.get("budget_GiB")), None)
    if b:
      axes[0].axhline(b, color="k", ls="--", lw=1, label=f"budget ({b:.2f} GiB)")
    axes[0].set_xticks(x, names)
    axes[0].set_ylabel("GiB")
    axes[0].set_title(f"{mem_rows[0]['T']}-token prefill on {res.get('card')}")
    axes[0].legend(fontsize=8)
    axes[1].bar(x, [r["time_ms"] for r in mem_rows], color="tab:blue")
    axes[1].set_xticks(x, names)
    axes[1].set_ylabel("ms")
    axes[1].set_title("time")
    fig.tight_layout()
    plt.show()
  show_table(rows, ["variant", "T", "S", "time_ms", "cached_ms", "host_ms", "cached_host_ms",
                    "query_us", "peak_GiB", "temp_GiB", "budget_GiB", "chunks", "rows"])

# %% [markdown]
# ## Other results
#
# Any other result file (the whole `Indexer` layer, a sweep, ...) is shown as a table, with its
# useful TFLOP/s or GB/s plotted against the ceilings when it has them.

# %%
known = {"mqa_logits", "mqa_logits_variants", "topk", "paged_mqa_logits", "prefill_topk",
         "topk_variants", "topk_peers_h200", "mqa_variants_h200", "paged_variants",
         "anchors_paged_h200", "mqa_default_h200_call3", "mqa_variants_loopfree_h200"}
others = {k: v for k, v in results.items() if k not in known}
if not others:
  print("No other result files yet (e.g. indexer.json will be shown here once a benchmark "
        "script writes it).")
for name, res in others.items():
  rows = res.get("rows") or []
  print(f"\n{name}.json ({res.get('card')}, {res.get('date')}, jax {res.get('jax')}):")
  if not rows:
    print("  no rows")
    continue
  show_table(rows)
  for col, ceil, unit in [("tflops", res.get("fp8_ceiling_tflops") or FP8_ANCHOR, "TFLOP/s"),
                          ("gbs", COPY_CEILING_GBS, "GB/s"), ("cache_GBps", COPY_CEILING_GBS, "GB/s")]:
    vals = [r.get(col) for r in rows]
    if not any(isinstance(v, (int, float)) for v in vals):
      continue
    keys = [c for c in rows[0] if isinstance(rows[0][c], int) and not isinstance(rows[0][c], bool)]
    labels = ["x".join(str(r.get(c)) for c in keys) or str(i) for i, r in enumerate(rows)]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(rows)), [np.nan if v is None else v for v in vals])
    ax.axhline(ceil, color="k", ls="--", lw=1, label=f"ceiling ({ceil:.0f} {unit})")
    ax.set_xticks(range(len(rows)), labels, rotation=30, fontsize=8)
    ax.set_xlabel(" x ".join(keys))
    ax.set_ylabel(unit)
    ax.set_title(name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## Live: re-run a small benchmark (GPU only)
#
# On a machine with a Hopper GPU this runs `benchmarks/bench_mqa_logits.py --smoke` (two small
# shapes, a few seconds), writing its JSON into a temporary folder only, and plots it next to
# the committed figures. On a CPU it is skipped: the Pallas kernels need the GPU, and CPU
# timings of the `xla` backend would say nothing about the kernels.

# %%
if jax.default_backend() != "gpu":
  print(f"Skipped: jax's backend is {jax.default_backend()!r}; the live benchmark needs a GPU.")
else:
  with tempfile.TemporaryDirectory() as tmp:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_mqa_logits.py"),
                           "--smoke", "--out", tmp], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    print(proc.stdout[-3000:])
    if proc.returncode:
      print(proc.stderr[-3000:])
      raise RuntimeError(f"bench_mqa_logits.py --smoke failed with exit code {proc.returncode}")
    live = load_results(tmp).get("mqa_logits_smoke")
  committed = {(r["T"], r["S"]): r["tflops"] for r in results.get("mqa_logits", {}).get("rows", [])}
  lrows = live["rows"]
  x = np.arange(len(lrows))
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.bar(x - 0.2, [r["tflops"] for r in lrows], 0.4, label=f"live ({live['card']})")
  ax.bar(x + 0.2, [committed.get((r["T"], r["S"]), np.nan) for r in lrows], 0.4,
         label="committed (same shape)")
  ax.axhline(live["fp8_ceiling_tflops"], color="k", ls="--", lw=1,
             label=f"fp8 ceiling now ({live['fp8_ceiling_tflops']:.0f})")
  ax.set_xticks(x, [f"{r['T']}x{r['S']}" for r in lrows])
  ax.set_ylabel("useful TFLOP/s")
  ax.set_title("mqa_logits, live smoke run")
  ax.legend(fontsize=8)
  plt.show()
