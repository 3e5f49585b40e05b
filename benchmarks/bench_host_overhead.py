"""Host overhead of one ``IndexerSteps.decode`` / ``.prefill`` call: wall time minus device time.

Usage: PYTHONPATH=. python benchmarks/bench_host_overhead.py [--smoke] [--out DIR] [--iters N]
                                       [--cases decode,extend,prefill] [--only 1x4K,64x32K]

An engine calls the jitted step once per layer per token, so whatever the host spends per call
(argument flattening, dispatch, donation, the output's pytree) is paid 61 times a token on
V3.2. For each case (V3.2 shapes; --smoke: a narrow layer, small sizes, runs on CPU):

- ``wall_ms``: wall time of one standalone call, ``steps.decode(x, qr, inputs, cache)`` then
  ``block_until_ready``, with every argument already on the device and the cache threaded
  through (donated) as an engine does. The previous call's output is still alive during the
  call (as ``out, cache = steps.decode(...)`` in a loop leaves it).
- ``return_ms``: the part of it until the call returns (host-side work before the device runs).
- ``device_ms``: the GPU's busy span of one standalone call: first kernel start to last
  kernel end, from the kernel timestamps CUPTI records (torch profiler; the graph's gaps
  between kernels count, as the device is running the step then). ``kernel_ms``: the sum of
  those kernels alone. Under the profiler XLA runs the step op by op instead of as command
  buffers; on the H200 the span came within 2% of the kernel sum (no idle gaps), so it is
  the step's kernel time either way. ``rdiff_ms``: the difference of R-call jits of the pure step
  (``benchmarks/common.time_per_call``), the method without a profiler: noisy at these sizes.
- ``overhead_ms = wall_ms - device_ms``: the host's share; the goal is <= 0.1 ms on an H200.
  Without a GPU profiler (CPU), ``device_ms`` falls back to ``rdiff_ms``.
- ``floor_ms``: the wall time of a jit of the same arguments that does (almost) nothing (one
  tiny op, cache donated and returned): what jax itself costs for this argument list;
  ``vs_floor_ms = overhead_ms - floor_ms`` is what the step adds on top of it.
- ``free_out_ms``: ``wall_ms`` when the previous output is deleted before each call, so that
  the allocator hands the program the same output address every time. XLA runs the step's
  kernels as a CUDA graph (a command buffer) and updates the graph's kernel arguments when a
  buffer address changes; ``wall_ms - free_out_ms`` is that update.
- ``out_ms``, ``out_return_ms``: as ``wall_ms`` / ``return_ms`` with the previous output
  handed back, ``out, cache = steps.decode(..., cache, out=out)``: it is donated and the new
  indices take its buffer, so every buffer of the step keeps its address and XLA launches the
  CUDA graph as recorded; ``out_overhead_ms = out_ms - device_ms``.
- ``spin_ms``: ``out_ms`` when the host waits by polling ``out.is_ready()`` rather than
  sleeping in ``block_until_ready``: the part of the wall that is the host thread waking up.
- ``vs_ladder_ms``: ``out_overhead_ms`` minus jax's own wall-minus-device for a plain
  program of the same device time (``floor_ladder``, interpolated in device time, clamped at
  its ends): what the step adds over jax for a call of its length (None without the ladder).
- ``graph_ladder`` (in the JSON; skipped with ``--no-floors``): wall minus device time of
  jits of a chain of n small fusions (n kernels in the CUDA graph) and of one fusion over n
  arguments, nothing of nsa_jax: what one more kernel or argument costs a standalone call.
- ``pipelined_ms``: per call, ``--iters`` such calls (``out=``) issued back to back with one
  wait at the end: the larger of the host's time per call and the device's (the graph's
  launch and gaps included), i.e. what the step costs when the host runs ahead.
- ``layers_ms``: ``wall_ms`` when the calls cycle over ``LAYERS`` layers of the same config
  (their own parameters and caches, one shared program), as an engine calls a step once per
  layer: every call sees other addresses.
- ``kernels``: GPU kernels one call launches (torch profiler, when torch is installed and the
  backend is a GPU; else None).
- ``in_jit_ms``: wall time per layer when ``R_BIG`` layers run in one jit (the README's
  "every layer in one jit"): what the dispatch costs once it is amortized;
  ``step_device_ms``: the device span of that jit (profiler) divided by ``R_BIG``: the
  device time of one decode step when steps run back to back (issue 16's table).

Every standalone figure is the lowest of ``ROUNDS`` medians of ``--iters`` calls: the first
seconds after a process starts are often slower on the host (seen on the H200 machines here),
and a round caught there would measure that, not the call.

Writes JSON to --out and (unless --smoke) benchmarks/results/host_overhead.json, after every
case (a run cut short keeps the cases measured so far).
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
ROUNDS = 3
LAYERS = 4


def _bf16(rng, shape):
  return jax.device_put(rng.standard_normal(shape, np.float32).astype(ml_dtypes.bfloat16))


def _random_cache(rng, num_pages, D):
  """A cache of random fp8 keys (zeros would make every logit tie), made on the host from
  random bytes (fast enough for 128K-token contexts): clearing bit 6 keeps every e4m3 code
  finite (|k| < 2, no NaN code)."""
  k = rng.integers(0, 256, (num_pages, 64, D), dtype=np.uint8) & np.uint8(0xBF)
  return jax.device_put(nsa_jax.IndexKCache(
      k.view(ml_dtypes.float8_e4m3fn), np.full((num_pages, 64), 1 / 64, np.float32)))


def _spin(out):
  """Wait for ``out`` by polling instead of sleeping in ``block_until_ready``."""
  while not out.is_ready():
    pass


def _standalone(call, cache, iters, warmup=5, free_out=False, give_out=False,
                wait=jax.block_until_ready, rounds=None):
  """(wall s, until-return s, cache) of ``call(cache) -> (out, cache)``: the round with the
  lowest median wall of ``ROUNDS`` rounds of ``iters`` calls. ``free_out``: delete each
  output before the next call (the program gets the same output address every time);
  ``give_out``: ``call(cache, out)`` gets the previous output (for ``out=``); ``wait``: how
  the host waits for the output; ``rounds``: None for ``ROUNDS``."""
  out = None
  run = (lambda c, o: call(c, o)) if give_out else (lambda c, o: call(c))  # noqa: E731
  for _ in range(warmup):
    out, cache = run(cache, out)
    jax.block_until_ready(out)
  best = None
  for _ in range(rounds or ROUNDS):
    walls, rets = [], []
    for _ in range(iters):
      if free_out:
        out.delete()
      t0 = time.perf_counter()
      out, cache = run(cache, out)
      t1 = time.perf_counter()
      wait(out)
      t2 = time.perf_counter()
      walls.append(t2 - t0)
      rets.append(t1 - t0)
    r = (statistics.median(walls), statistics.median(rets))
    best = r if best is None or r[0] < best[0] else best
  return best[0], best[1], cache


def _pipelined(call, cache, iters, rounds=None):
  """Seconds per call of ``iters`` calls ``call(cache, out)`` issued back to back (one wait
  at the end), the lowest of ``ROUNDS`` rounds; and the cache."""
  out, cache = call(cache, None)
  jax.block_until_ready(out)
  best = None
  for _ in range(rounds or ROUNDS):
    t0 = time.perf_counter()
    for _ in range(iters):
      out, cache = call(cache, out)
    jax.block_until_ready(out)
    t = (time.perf_counter() - t0) / iters
    best = t if best is None else min(best, t)
  return best, cache


def floor_ladder(iters, counts=(1, 4, 16)):
  """jax's own wall-minus-device for programs of growing length, nothing of nsa_jax in them:
  a straight-line jit of n bf16 matmuls [4096, 4096] x [4096, 1024] (about 0.05 ms each on
  an H200, no loop, so no host round trip inside). Rows of (n, wall, spin, return,
  pipelined) ms; pipelined = the program's device time when calls run back to back."""
  a = jnp.ones((4096, 4096), jnp.bfloat16)
  rows = []
  for n in counts:
    @jax.jit
    def prog(a):
      c = a[:, :1024]
      for _ in range(n):
        c = jnp.tanh(a @ c * 1e-3)
      return c
    call = lambda s, o: (prog(a), s)  # noqa: E731
    wall, ret, _ = _standalone(call, None, iters, give_out=True)
    spin, _, _ = _standalone(call, None, iters, give_out=True, wait=_spin)
    piped, _ = _pipelined(call, None, iters)
    ms = 1e3
    rows.append(dict(matmuls=n, wall_ms=wall * ms, spin_ms=spin * ms, return_ms=ret * ms,
                     pipelined_ms=piped * ms, wall_minus_device_ms=(wall - piped) * ms))
    print(f"  floor of {n:2d} matmuls: wall {wall * ms:.3f} ms, device {piped * ms:.3f}, "
          f"wall - device {(wall - piped) * ms:.3f} (spinning {(spin - piped) * ms:.3f})",
          flush=True)
  return rows


def graph_ladder(iters, chains=(1, 8, 24, 48), arg_counts=(1, 4, 12, 24)):
  """What a kernel of the CUDA graph and an argument cost a standalone call: jits of a chain
  of n small fusions (optimization barriers keep them apart) and of one small fusion over n
  arguments. Rows of (program, n, kernels, device, wall, wall - device) ms; device is the
  CUPTI busy span (None without a GPU profiler: then wall - device is None too)."""
  x0 = jnp.ones((4096,), jnp.float32)
  progs = []
  for n in chains:
    def chain(x, n=n):
      for _ in range(n):
        x = jax.lax.optimization_barrier(jnp.sin(x) * 0.5 + 1.0)
      return x
    f = jax.jit(chain)
    progs.append(("chain", n, lambda f=f: f(x0)))
  for n in arg_counts:
    args = [jnp.full((16,), i, jnp.float32) for i in range(n)]
    f = jax.jit(lambda *a: sum(a))
    progs.append(("args", n, lambda f=f, args=args: f(*args)))
  rows = []
  for kind, n, run in progs:
    call = lambda s, o, run=run: (run(), s)  # noqa: E731
    wall, _, _ = _standalone(call, None, iters, give_out=True)
    prof = _profile(lambda run=run: jax.block_until_ready(run()))
    dev = prof[2] * 1e3 if prof else None
    ms = 1e3
    rows.append(dict(program=kind, n=n, kernels=prof[0] if prof else None, device_ms=dev,
                     wall_ms=wall * ms, wall_minus_device_ms=None if dev is None else wall * ms - dev))
    print(f"  {kind} {n:2d}: wall {wall * ms:.3f} ms"
          + (f", {prof[0]} kernels, device {dev:.3f}, wall - device {wall * ms - dev:.3f}"
             if prof else ""), flush=True)
  return rows


def ladder_floor(ladder, device_ms):
  """jax's wall-minus-device (ms) for a plain program of ``device_ms``, from the ladder."""
  pts = sorted((r["pipelined_ms"], r["wall_minus_device_ms"]) for r in ladder)
  return float(np.interp(device_ms, [p[0] for p in pts], [p[1] for p in pts]))


def _layers(steps_list, kind, x, qr, inputs, caches, iters):
  """Wall s per call when the calls cycle over the layers (each its own params and cache)."""
  state = dict(i=0)

  def call(_):
    i = state["i"] = (state["i"] + 1) % len(steps_list)
    out, caches[i] = getattr(steps_list[i], kind)(x, qr, inputs, caches[i])
    return out, None

  wall, _, _ = _standalone(call, None, iters)
  return wall


def _floor(params, x, qr, inputs, cache, iters):
  """Wall time of a jit of the same arguments doing one tiny op (cache donated, returned)."""
  f = jax.jit(lambda p, x, qr, inp, c: (x[:1, :1].astype(jnp.float32) + p[0].ravel()[0], c),
              donate_argnums=(4,))
  wall, _, cache = _standalone(lambda c: f(params, x, qr, inputs, c), cache, iters)
  return wall, cache


def _profile(run, calls=10):
  """Per call of ``run()`` (which blocks): (kernels, kernel-sum s, busy-span s) medians from
  the GPU kernels CUPTI records (torch profiler), or None without a GPU profiler. Calls are
  separated by a host sync, so the i-th run of ``kernels`` consecutive kernels is call i."""
  if jax.default_backend() != "gpu":
    return None
  try:
    import torch
    from torch.profiler import ProfilerActivity, profile
  except ImportError:
    return None
  run()
  try:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
      for _ in range(calls):
        run()
    events = prof.events()
  except RuntimeError as e:  # a profiler that cannot start must not cost the timings
    print(f"  (no profile: {e})", flush=True)
    return None
  ks = sorted((e.time_range.start, e.time_range.end) for e in events
              if e.device_type == torch.autograd.DeviceType.CUDA
              and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())
  if not ks or len(ks) % calls:
    print(f"  (profile: {len(ks)} kernels over {calls} calls: not a whole number each)")
    return None
  k = len(ks) // calls
  per = [ks[i * k:(i + 1) * k] for i in range(calls)]
  busy = statistics.median(c[-1][1] - c[0][0] for c in per) * 1e-6
  ksum = statistics.median(sum(e - s for s, e in c) for c in per) * 1e-6
  return k, ksum, busy


def _kernels(call, cache, calls=10):
  """((kernels, kernel-sum s, busy span s) per standalone call or None, cache)."""
  state = dict(cache=cache)

  def run():
    out, state["cache"] = call(state["cache"])
    jax.block_until_ready(out)
  return _profile(run, calls), state["cache"]


def _device(pure, params, xs, qrs, inputs, cache, iters):
  """(in-jit wall per layer s, device s per call by the R-call difference, device span s
  per step of the R_BIG-step jit or None)."""
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
  fn, args = make(R_BIG)
  prof = _profile(lambda: jax.block_until_ready(fn(*args)), calls=5)
  return wall_big, dev, (prof[2] / R_BIG if prof else None)


def _case(name, kind, steps_list, cfg, rows, P, inputs, iters, T, S, seed):
  rng = np.random.default_rng(seed)
  steps = steps_list[0]
  method = getattr(steps, kind)
  xs = [_bf16(rng, (rows, cfg.dim)) for _ in range(R_BIG)]
  qrs = [_bf16(rng, (rows, cfg.q_lora_rank)) for _ in range(R_BIG)]
  cache = _random_cache(rng, P, cfg.head_dim)
  call = lambda c: method(xs[0], qrs[0], inputs, c)  # noqa: E731
  wall, ret, cache = _standalone(call, cache, iters)
  free, _, cache = _standalone(call, cache, iters, free_out=True)
  call_out = lambda c, o: (method(xs[0], qrs[0], inputs, c) if o is None  # noqa: E731
                           else method(xs[0], qrs[0], inputs, c, out=o))
  out_wall, out_ret, cache = _standalone(call_out, cache, iters, give_out=True)
  spin, _, cache = _standalone(call_out, cache, iters, give_out=True, wait=_spin)
  piped, cache = _pipelined(call_out, cache, iters)
  floor, cache = _floor(steps.params, xs[0], qrs[0], inputs, cache, iters)
  prof, cache = _kernels(call, cache)
  caches = [cache] + [_random_cache(rng, P, cfg.head_dim) for _ in steps_list[1:]]
  layers = _layers(steps_list, kind, xs[0], qrs[0], inputs, caches, iters)
  pure = steps.decode_fn() if kind == "decode" else steps.prefill_fn()
  in_jit, rdiff, step_dev = _device(pure, steps.params, xs, qrs, inputs, caches[0],
                                    max(5, iters // 4))
  kernels, ksum, dev = prof if prof else (None, None, rdiff)
  ms = 1e3
  opt = lambda v: None if v is None else v * ms  # noqa: E731
  return dict(case=name, step=kind, T=T, S=S, wall_ms=wall * ms, return_ms=ret * ms,
              device_ms=dev * ms, kernel_ms=opt(ksum), rdiff_ms=rdiff * ms,
              overhead_ms=(wall - dev) * ms, floor_ms=floor * ms,
              vs_floor_ms=(wall - dev - floor) * ms, free_out_ms=free * ms,
              out_ms=out_wall * ms, out_return_ms=out_ret * ms,
              out_overhead_ms=(out_wall - dev) * ms, spin_ms=spin * ms, pipelined_ms=piped * ms,
              layers_ms=layers * ms, kernels=kernels, in_jit_ms=in_jit * ms,
              step_device_ms=opt(step_dev))


def decode_case(name, steps_list, cfg, B, ctx_len, iters, seed=0):
  tables, P = allocate_block_tables([ctx_len + 1] * B, seed=seed)
  d = jax.device_put(decode_inputs([ctx_len] * B, tables, num_pages=P))
  return _case(name, "decode", steps_list, cfg, d.context_lens.shape[0], P, d, iters,
               B, ctx_len, seed)


def prefill_case(name, steps_list, cfg, ext, pre, iters, seed=0):
  tables, P = allocate_block_tables([e + p for e, p in zip(ext, pre)], seed=seed)
  batch = nsa_jax.build_ragged_batch(ext, pre)
  inp = jax.device_put(prefill_inputs(batch, tables, num_pages=P))
  return _case(name, "prefill", steps_list, cfg, batch.T_pad, P, inp, iters,
               batch.num_tokens, batch.num_keys, seed)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--smoke", action="store_true", help="small sizes (CPU-friendly)")
  ap.add_argument("--out", default=None, help="also write the JSON here")
  ap.add_argument("--iters", type=int, default=None, help="standalone calls timed per case")
  ap.add_argument("--cases", default="decode,extend,prefill",
                  help="comma-separated subset of decode,extend,prefill")
  ap.add_argument("--only", default="", help="comma list of case names (e.g. '1x4K,64x32K')")
  ap.add_argument("--no-floors", action="store_true",
                  help="skip the ladders of plain-jax programs (matmuls of growing length; "
                       "chains of small kernels and growing argument lists)")
  args = ap.parse_args(argv)
  want = set(args.cases.split(","))
  cfg = SMOKE_CFG if args.smoke else FULL_CFG
  if args.smoke:
    decode = [("decode 1x1K", 1, 1024), ("decode 8x1K", 8, 1024)]
    prefill = [("extend 1x64/512", [64], [512])]
    iters = args.iters or 30
  else:
    decode = [("decode 1x4K", 1, 4096), ("decode 1x32K", 1, 32768), ("decode 1x128K", 1, 131072),
              ("decode 64x4K", 64, 4096), ("decode 64x32K", 64, 32768),
              ("decode 64x128K", 64, 131072)]
    prefill = [("extend 1x128/4K", [128], [4096]), ("prefill 4K", [4096], [0])]
    iters = args.iters or 200
  decode = decode if "decode" in want else []
  prefill = [c for c in prefill if c[0].split()[0] in want]
  if args.only:
    keep = set(args.only.split(","))
    decode = [c for c in decode if c[0].split()[1] in keep]
    prefill = [c for c in prefill if c[0].split()[1] in keep]
  print(f"host overhead of IndexerSteps | {common.card()} | jax {jax.__version__} | "
        f"{jax.default_backend()} | dim {cfg.dim}, H {cfg.n_heads}, D {cfg.head_dim}, "
        f"top-{cfg.topk}", flush=True)
  nsa_jax.budget.prime()
  steps_list = [nsa_jax.IndexerSteps(Indexer(cfg, rngs=nnx.Rngs(i))) for i in range(LAYERS)]
  ladder = None if args.smoke or args.no_floors else floor_ladder(iters)
  graph = None if args.no_floors else graph_ladder(iters)
  rows = []
  cols = ["case", "T", "S", "wall_ms", "return_ms", "device_ms", "kernel_ms", "rdiff_ms",
          "overhead_ms", "floor_ms", "vs_floor_ms", "free_out_ms", "out_ms", "out_return_ms",
          "out_overhead_ms", "vs_ladder_ms", "spin_ms", "pipelined_ms", "layers_ms", "kernels",
          "in_jit_ms", "step_device_ms"]
  jobs = ([(decode_case, name, B, L) for name, B, L in decode] +
          [(prefill_case, name, ext, pre) for name, ext, pre in prefill])
  for fn, name, a, b in jobs:
    rows.append(fn(name, steps_list, cfg, a, b, iters))
    r = rows[-1]
    r["vs_ladder_ms"] = (r["out_overhead_ms"] - ladder_floor(ladder, r["device_ms"])
                         if ladder else None)
    print(f"  {name:18s} overhead {r['overhead_ms']:.3f} ms (out= {r['out_overhead_ms']:.3f}, "
          f"floor {r['floor_ms']:.3f}, pipelined {r['pipelined_ms']:.3f}, "
          f"same output address {r['free_out_ms'] - r['device_ms']:.3f}, "
          f"{LAYERS} layers {r['layers_ms'] - r['device_ms']:.3f})", flush=True)
    common.write_results("host_overhead", rows, args.out, args.smoke,
                         extra=dict(r_small=R_SMALL, r_big=R_BIG, rounds=ROUNDS, layers=LAYERS,
                                    floor_ladder=ladder, graph_ladder=graph))
  print()
  common.print_table(rows, cols)


if __name__ == "__main__":
  main()
