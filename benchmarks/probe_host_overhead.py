"""Where the host time of one IndexerSteps call goes on a GPU (a probe, not a benchmark).

Usage: PYTHONPATH=. python3 benchmarks/probe_host_overhead.py [--out DIR] [--cases decode1,decode64,extend]

Per case (V3.2 shapes): median until-return and wall times of ``steps.decode``, of its jitted
function called directly, and of the floor jit (same arguments, one tiny op); the device time by
the R-call difference; and, from the torch profiler (CUPTI sees JAX's kernels too), the kernels,
graph launches and runtime/driver API calls one standalone call makes. Run it under different
``XLA_FLAGS`` to compare (e.g. ``--xla_gpu_enable_command_buffer=``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import nsa_jax  # noqa: E402
from benchmarks.bench_host_overhead import (FULL_CFG, _bf16, _device,  # noqa: E402
                                            _random_cache)
from nsa_jax.indexer import (Indexer, allocate_block_tables, decode_inputs,  # noqa: E402
                             prefill_inputs)


def timed(call, cache, iters=300, warmup=10):
  for _ in range(warmup):
    out, cache = call(cache)
    jax.block_until_ready(out)
  rets, walls = [], []
  for _ in range(iters):
    t0 = time.perf_counter()
    out, cache = call(cache)
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    rets.append(t1 - t0)
    walls.append(t2 - t0)
  return statistics.median(rets) * 1e3, statistics.median(walls) * 1e3, cache


def trace(call, cache, out_path, calls=20):
  """Per-call counts of kernels / API calls seen by CUPTI over ``calls`` standalone calls."""
  try:
    import torch
    from torch.profiler import ProfilerActivity, profile
  except ImportError:
    return None, cache
  out, cache = call(cache)
  jax.block_until_ready(out)
  torch.cuda.synchronize()
  with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    for _ in range(calls):
      out, cache = call(cache)
      jax.block_until_ready(out)
  prof.export_chrome_trace(out_path)
  with open(out_path) as f:
    ev = json.load(f)["traceEvents"]
  cats = collections.Counter()
  names = collections.defaultdict(collections.Counter)
  kdur = 0.0
  for e in ev:
    c = e.get("cat")
    if c in ("kernel", "cuda_runtime", "cuda_driver", "gpu_memcpy", "gpu_memset"):
      cats[c] += 1
      names[c][e.get("name", "?")[:90]] += 1
      if c == "kernel":
        kdur += e.get("dur", 0.0)
  res = dict(per_call={c: n / calls for c, n in cats.items()},
             kernel_us_per_call=kdur / calls,
             names={c: {k: v / calls for k, v in cnt.most_common(25)} for c, cnt in names.items()})
  return res, cache


def hlo_stats(jitted, args):
  txt = jitted.lower(*args).compile().as_text()
  entry = txt[txt.find("ENTRY"):]
  return dict(custom_calls=txt.count("custom-call("), fusions_in_entry=entry.count(" fusion("),
              command_buffer=txt.count("command_buffer"), while_loops=txt.count(" while("),
              entry_lines=entry.count("\n"))


def run_case(name, steps, x, qr, inp, cache, kind, out_dir, xs, qrs):
  jitted = steps._get(kind, "slots")[1]
  pure = steps._get(kind, "slots")[0]
  method = steps.decode if kind == "decode" else steps.prefill
  floor = jax.jit(lambda p, x, qr, i, c: (x[:1, :1].astype(jnp.float32) + p[0].ravel()[0], c),
                  donate_argnums=(4,))
  row = dict(case=name)
  for label, call in (("steps", lambda c: method(x, qr, inp, c)),
                      ("jitted", lambda c: jitted(steps.params, x, qr, inp, c)),
                      ("floor", lambda c: floor(steps.params, x, qr, inp, c))):
    r, w, cache = timed(call, cache)
    row[f"{label}_return_ms"], row[f"{label}_wall_ms"] = r, w
  _, dev = _device(pure, steps.params, xs, qrs, inp, cache, 10)
  row["device_ms"] = dev * 1e3
  row["overhead_ms"] = row["steps_wall_ms"] - row["device_ms"]
  row["hlo"] = hlo_stats(jitted, (steps.params, x, qr, inp, cache))
  tag = os.environ.get("PROBE_TAG", "default")
  row["trace"], cache = trace(lambda c: method(x, qr, inp, c), cache,
                              os.path.join(out_dir, f"trace_{tag}_{name}.json"))
  row["floor_trace"], cache = trace(lambda c: floor(steps.params, x, qr, inp, c), cache,
                                    os.path.join(out_dir, f"trace_{tag}_{name}_floor.json"))
  return row


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="/tmp")
  ap.add_argument("--cases", default="decode1,decode64,extend")
  args = ap.parse_args()
  cfg = FULL_CFG
  nsa_jax.budget.prime()
  module = Indexer(cfg, rngs=nnx.Rngs(0))
  steps = nsa_jax.IndexerSteps(module)
  rng = np.random.default_rng(0)
  rows = []
  for case in args.cases.split(","):
    if case.startswith("decode"):
      B, L = int(case[6:]), 4096
      tables, P = allocate_block_tables([L + 1] * B, seed=0)
      inp = jax.device_put(decode_inputs([L] * B, tables, num_pages=P))
      n = inp.context_lens.shape[0]
      kind = "decode"
    else:
      tables, P = allocate_block_tables([128 + 4096], seed=0)
      batch = nsa_jax.build_ragged_batch([128], [4096])
      inp = jax.device_put(prefill_inputs(batch, tables, num_pages=P))
      n = batch.T_pad
      kind = "prefill"
    xs = [_bf16(rng, (n, cfg.dim)) for _ in range(5)]
    qrs = [_bf16(rng, (n, cfg.q_lora_rank)) for _ in range(5)]
    cache = _random_cache(rng, P, cfg.head_dim)
    row = run_case(case, steps, xs[0], qrs[0], inp, cache, kind, args.out, xs, qrs)
    rows.append(row)
    print(json.dumps(row, indent=1), flush=True)
  tag = os.environ.get("PROBE_TAG", "default")
  with open(os.path.join(args.out, f"probe_{tag}.json"), "w") as f:
    json.dump(dict(jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""), rows=rows),
              f, indent=1)


if __name__ == "__main__":
  main()
