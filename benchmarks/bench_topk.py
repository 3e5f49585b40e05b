"""Top-k per row (k = 2048): the Mosaic GPU radix-select kernel, beside ``lax.top_k`` and the
peers (FlashInfer, sgl-kernel) timed in the same device call by ``.anchors/run.sh``.

Usage: python benchmarks/bench_topk.py [--smoke] [--out DIR] [--peers anchors.json]
                                       [--shapes 8192x32768,8192x32768c,1x131072]
                                       [--no-xla] [--no-prefill] [--ascending] [--ab MODULE]

- Rows x keys (``c``: causal rows, row i of R keys ``[0, S - R + i + 1)``), float32 N(0, 1)
  logits; by default the peers' table: 8192 x 8K / 32K / 32K causal / 64K / 128K,
  4096 x 32K and the decode-like 1 x 32K, 1 x 128K, 64 x 32K.
- Times per call: ``dev_ms``, the device time (``common.time_per_call``: 5 calls in one jit
  minus 1, over 4; host dispatch cancels; consecutive calls rotate over 5 input sets);
  ``kernel_ms``, the kernels' own time with L2 flushed before each call, from the torch
  profiler (the peers' ``kineto_ms``, same method); ``wall_ms``, one blocking call.
  ``vs_peer`` = best peer kineto_ms / our kernel_ms (> 1: faster than the best peer).
  GB/s counts the logits read once over kernel_ms; ``floor_ms`` is that read at the copy rate.
- ``--ab MODULE``: also time another top-k module with the same ``topk_indices`` signature
  (an older kernel kept outside the package) in the same run.
- Prefill split (T = S = 32768, causal, H = 64, D = 128): the Pallas logits alone, the top-k
  of those logits, and ``prefill_topk`` end to end (wall time of one call, as before).
On CPU only ``--smoke`` does anything: interpret mode on tiny rows, no timings.
Writes JSON to --out and (unless --smoke) benchmarks/results/topk.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import nsa_jax  # noqa: E402
from benchmarks import common  # noqa: E402
from kernels_pallas import topk as kernel  # noqa: E402

K = 2048
FULL = ["8192x8192", "4096x32768", "8192x32768", "8192x32768c", "8192x65536", "8192x131072",
        "1x32768", "1x131072", "64x32768"]
SMOKE_GPU = ["512x8192", "256x32768", "8x131072", "1x32768"]
SMOKE_CPU = ["4x3000", "2x3000c"]
COPY_TBS = 4.25   # H200 device-to-device copy measured through torch (read + write)


def parse_shape(s):
  causal = s.endswith("c")
  T, S = (int(v) for v in s.rstrip("c").split("x"))
  return T, S, causal


def logits_case(T, S, causal, seed=0):
  x = jax.random.normal(jax.random.key(seed), (T, S), jnp.float32)
  ks = jnp.zeros((T,), jnp.int32)
  ke = jnp.full((T,), S, jnp.int32)
  if causal:
    ke = jnp.arange(T, dtype=jnp.int32) + S - T + 1
  return x, ks, ke


def load_peers(path):
  """{shape: {impl: kineto_ms}} from an ``.anchors`` results file (anchors.json)."""
  if not path or not os.path.exists(path):
    return {}
  with open(path) as f:
    data = json.load(f)
  out = {}
  for r in data.get("topk", data.get("results", [])) if isinstance(data, dict) else data:
    if not isinstance(r, dict) or "impl" not in r:
      continue
    shape = r.get("shape") or f"{r.get('rows')}x{r.get('keys')}{'c' if r.get('causal') else ''}"
    if r.get("kineto_ms") is not None:
      out.setdefault(shape, {})[r["impl"]] = r["kineto_ms"]
  return out


def same_sets(out, x, ks, ke, rows=64):
  """Our sets equal lax.top_k's on up to ``rows`` rows (N(0, 1) values: no ties)."""
  T = x.shape[0]
  pick = np.unique(np.linspace(0, T - 1, min(rows, T)).astype(np.int64))
  xs = np.asarray(x[pick])
  ke_n = np.asarray(ke)[pick]
  col = np.arange(x.shape[1])[None, :]
  xs = np.where(col < ke_n[:, None], xs, -np.inf)
  ref = np.asarray(jax.lax.top_k(jnp.asarray(xs), K)[1])
  ref = np.where(np.take_along_axis(xs, ref, 1) == -np.inf, -1, ref)
  return bool((np.sort(np.asarray(out)[pick], 1) == np.sort(ref, 1)).all())


def topk_rows(args, on_gpu):
  shapes = (SMOKE_GPU if on_gpu else SMOKE_CPU) if args.smoke else FULL
  if args.shapes:
    shapes = args.shapes.split(",")
  peers = load_peers(args.peers)
  impls = [("mosaic", kernel)]
  if args.ab:
    impls.append((args.ab.rsplit(".", 1)[-1], importlib.import_module(args.ab)))
  rows = []
  for shape in shapes:
    T, S, causal = parse_shape(shape)
    x, ks, ke = logits_case(T, S, causal)
    row = dict(shape=shape, k=K, levels="+".join(
        (f"stream/{c.segment}c/{c.warpgroups}wg" if c.stream
         else f"{-(-n // c.segment)}x{c.segment}/{c.warpgroups}wg")
        for n, c in kernel.plan(T, S, K)))
    for name, mod in impls:
      fn = lambda a, b, c, mod=mod: mod.topk_indices(a, b, c, k=K, interpret=not on_gpu,
                                                     ascending=args.ascending)
      out = jax.jit(fn)(x, ks, ke)
      row[f"{name}_same_sets"] = same_sets(out, x, ks, ke)
      if not on_gpu:
        continue
      nrep = 5 if T * S <= 2 ** 30 else 3
      sets = [(x + jnp.float32(r), ks, ke) for r in range(nrep)]

      def make(R, fn=fn, sets=sets):
        return jax.jit(lambda s: [fn(*a) for a in s]), (sets[:R],)

      wall, _, dev = common.time_per_call(make, r_big=nrep, iters=10)
      kern = common.kernel_ms_per_call(jax.jit(fn), (x, ks, ke))
      row.update({f"{name}_wall_ms": wall * 1e3, f"{name}_dev_ms": dev * 1e3,
                  f"{name}_kernel_ms": kern})
      del sets
    if on_gpu:
      kern = row.get("mosaic_kernel_ms")
      row["floor_ms"] = T * S * 4 / (COPY_TBS * 1e12) * 1e3   # one read at the copy rate
      if kern:
        row["gbs"] = T * S * 4 / kern / 1e6
      p = peers.get(shape, {})
      for impl, key in (("flashinfer.top_k_ragged_transform", "fi_ms"),
                        ("sgl.fast_topk_v2", "sgl_ms")):
        if impl in p:
          row[key] = p[impl]
      best = min([v for k_, v in row.items() if k_ in ("fi_ms", "sgl_ms")], default=None)
      if best and kern:
        row["vs_peer"] = best / kern
      if not args.no_xla and T * S <= 2 ** 28:
        xla = jax.jit(lambda a, b, c: nsa_jax.topk_indices(a, b, c, k=K, backend="xla"))
        row["xla_kernel_ms"] = common.kernel_ms_per_call(xla, (x, ks, ke), calls=3)
    rows.append(row)
    print(row, flush=True)
    if args.out:   # a run cut short still leaves the shapes it measured
      common.write_results("topk_partial", rows, args.out, smoke=True)
    del x, ks, ke
  return rows


def prefill_split(args):
  """T = S = 32768 causal prefill: logits, top-k, and prefill_topk end to end."""
  T = S = 2048 if args.smoke else 32768
  H, D = 64, 128
  rng = np.random.default_rng(0)
  q8, qs = nsa_jax.act_quant(jnp.asarray(rng.standard_normal((T, H, D)), jnp.bfloat16))
  k8, ksc = nsa_jax.act_quant(jnp.asarray(rng.standard_normal((S, D)), jnp.bfloat16))
  w = jnp.asarray(rng.standard_normal((T, H)), jnp.float32) * H ** -0.5 * qs[..., 0] * D ** -0.5
  ks = jnp.zeros((T,), jnp.int32)
  ke = jnp.arange(T, dtype=jnp.int32) + 1
  a = (q8, k8, ksc[:, 0], w, ks, ke)
  iters = 5 if args.smoke else 10
  logits_fn = jax.jit(lambda *x: nsa_jax.mqa_logits(*x, backend="pallas"))
  t_logits = common.time_fn(logits_fn, *a, iters=iters)
  logits = logits_fn(*a)
  tk_p = jax.jit(lambda l, s, e: nsa_jax.topk_indices(l, s, e, k=K, backend="pallas"))
  t_tp = common.time_fn(tk_p, logits, ks, ke, iters=iters)
  k_tp = common.kernel_ms_per_call(tk_p, (logits, ks, ke), calls=5)
  del logits
  nsa_jax.budget.prime()
  e2e = jax.jit(lambda *x: nsa_jax.prefill_topk(*x, k=K, backend="pallas"))
  t_e2e = common.time_fn(e2e, *a, iters=iters)
  row = dict(T=T, S=S, logits_ms=t_logits * 1e3, topk_ms=t_tp * 1e3, topk_kernel_ms=k_tp,
             prefill_topk_ms=t_e2e * 1e3, topk_share=t_tp / (t_logits + t_tp))
  print(row, flush=True)
  return [row]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--out", default=None)
  ap.add_argument("--peers", default=None, help="anchors.json of .anchors/run.sh, same run")
  ap.add_argument("--shapes", default="", help="e.g. 4096x32768,8192x32768c,1x131072")
  ap.add_argument("--no-xla", action="store_true", help="skip the lax.top_k baseline")
  ap.add_argument("--no-prefill", action="store_true", help="skip the T=S=32K prefill split")
  ap.add_argument("--ascending", action="store_true", help="ascending indices (one sort)")
  ap.add_argument("--ab", default="", help="another top-k module to time beside ours")
  args = ap.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not args.smoke:
    print("bench_topk: no GPU. Use --smoke for an interpret-mode check on CPU.")
    return
  rows = topk_rows(args, on_gpu)
  print(f"\ntop-k (k={K}) on {common.card()}, jax {jax.__version__}; kernel_ms: kernels only, "
        "L2 flushed (the peers' kineto method); dev_ms: device time per call (5-call jit minus "
        "1-call jit); vs_peer = best peer / kernel_ms")
  cols = ["shape", "levels", "mosaic_kernel_ms", "mosaic_dev_ms", "mosaic_wall_ms", "fi_ms",
          "sgl_ms", "vs_peer", "gbs", "floor_ms", "xla_kernel_ms", "mosaic_same_sets"]
  if args.ab:
    name = args.ab.rsplit(".", 1)[-1]
    cols += [f"{name}_kernel_ms", f"{name}_dev_ms", f"{name}_same_sets"]
  common.print_table(rows, [c for c in cols if any(c in r for r in rows)])
  extra = {}
  if on_gpu and not args.no_prefill:
    split = prefill_split(args)
    common.print_table(split, list(split[0]))
    extra["prefill_split"] = split
  common.write_results("topk", rows, args.out, args.smoke, extra=extra)
  if not all(r["mosaic_same_sets"] for r in rows):
    raise SystemExit("bench_topk: the kernel and lax.top_k chose different sets")


if __name__ == "__main__":
  main()
