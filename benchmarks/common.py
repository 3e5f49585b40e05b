"""Shared benchmark plumbing: timing, ceilings, result tables and JSON."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
COPY_CEILING_TBS = 2.94      # device-to-device copy, measured on our H100 (reference run)
FP8_CEILING_TFLOPS = 1518.0  # fp8 8192^3 XLA matmul, measured on our H100 (reference run)


def card() -> str:
  return jax.devices()[0].device_kind


def time_fn(fn, *args, warmup: int = 3, iters: int = 20) -> float:
  """Median wall time in seconds of ``fn(*args)`` (blocking on the result each call)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def time_per_call(make, *, r_small: int = 1, r_big: int = 5, iters: int = 15,
                  warmup: int = 3) -> tuple[float, float, float]:
  """Per-call times of an op, in seconds: (wall at ``r_small`` calls a jit, wall at ``r_big``
  calls a jit, device).

  ``make(R)`` returns ``(fn, args)``: a jitted function running the op R times on R distinct
  inputs (so that XLA cannot merge the calls) and its arguments. Wall time per call includes
  host dispatch and launch latency (~0.1-0.3 ms here, measured), spread over the R calls;
  the device time per call is the difference of the medians at ``r_big`` and ``r_small``,
  divided by ``r_big - r_small``, which cancels that fixed cost (the CUDA-event time of the
  kernels, without a profiler in the loop).
  """
  t = {}
  for r in (r_small, r_big):
    fn, args = make(r)
    t[r] = time_fn(fn, *args, warmup=warmup, iters=iters)
  return (t[r_small] / r_small, t[r_big] / r_big,
          (t[r_big] - t[r_small]) / (r_big - r_small))


def kernel_ms_per_call(fn, args, *, calls: int = 10, flush_mb: int = 256) -> float | None:
  """Kernel time per call in ms, as the peers are timed (the reference run's kineto figure): the sum
  of the GPU kernels one call of ``fn(*args)`` launches, from the torch profiler (CUPTI sees
  every kernel of the process, JAX's included), with L2 flushed before each call by a
  ``flush_mb`` MB memset (excluded from the sum). None when torch is not installed.
  """
  try:
    import torch
    from torch.profiler import ProfilerActivity, profile
  except ImportError:
    return None
  flush = torch.empty(flush_mb << 20, dtype=torch.uint8, device="cuda")
  jax.block_until_ready(fn(*args))
  with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(calls):
      flush.zero_()
      torch.cuda.synchronize()
      jax.block_until_ready(fn(*args))
  total_us = 0.0
  for e in prof.events():
    if e.device_type == torch.autograd.DeviceType.CUDA and "at::native" not in e.name \
        and "memset" not in e.name.lower() and "memcpy" not in e.name.lower():
      total_us += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
  return total_us / calls / 1e3


def replace_fields(cfg, items):
  """A frozen config dataclass with fields replaced from ``"name=value"`` strings: integers,
  0/1 for the boolean fields, strings as written (``["num_stages=5", "release=arrive"]``)."""
  types = {f.name: f.type for f in dataclasses.fields(cfg)}
  kw = {}
  for item in items:
    key, _, value = item.partition("=")
    if key not in types:
      raise ValueError(f"replace_fields: {type(cfg).__name__} has no field {key!r}")
    if types[key] in (bool, "bool"):
      kw[key] = bool(int(value))
    else:
      kw[key] = value if types[key] in (str, "str") else int(value)
  return dataclasses.replace(cfg, **kw)


def anchor_rows(path: str | None, part: str, who: str) -> list[dict]:
  """The rows of ``part`` ("prefill", "paged", ...) in the peers' results (the anchors.json
  that ``.anchors/run.sh --out`` writes in the same device call), error rows left out; []
  when no path is given, or (with one line naming ``who``) when the file cannot be read."""
  if not path:
    return []
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    print(f"{who}: no peers from {path} ({type(e).__name__}: {e})")
    return []
  return [r for r in data.get(part, []) if not r.get("error")]


def measure_fp8_ceiling(n: int = 8192) -> float:
  """TFLOP/s of an n^3 fp8 e4m3 matmul with f32 accumulation through XLA, on this card."""
  key = jax.random.key(0)
  a = jax.random.normal(key, (n, n), jnp.float32).astype(jnp.float8_e4m3fn)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(jnp.float8_e4m3fn)
  f = jax.jit(lambda x, y: jax.lax.dot_general(x, y, (((1,), (1,)), ((), ())),
                                               preferred_element_type=jnp.float32))
  return 2 * n ** 3 / time_fn(f, a, b, iters=10) / 1e12


def measure_copy_ceiling(nbytes: int = 2 << 30) -> float:
  """TB/s (read + write) of a large device-to-device copy on this card."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(lambda v: v * 1.0 + 0.0)
  return 2 * nbytes / time_fn(f, x, iters=10) / 1e12


def print_table(rows: list[dict], cols: list[str]) -> None:
  widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
  print(" | ".join(c.rjust(w) for c, w in zip(cols, widths)))
  print("-|-".join("-" * w for w in widths))
  for r in rows:
    print(" | ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)))


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
  return "-" if v is None else str(v)


def write_results(name: str, rows: list[dict], out_dir: str | None, smoke: bool, extra=None) -> None:
  payload = dict(benchmark=name, date=datetime.date.today().isoformat(), card=card(),
                 jax=jax.__version__, rows=rows, **(extra or {}))
  dirs = [d for d in (out_dir, None if smoke else RESULTS_DIR) if d]
  for d in dirs:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{name}{'_smoke' if smoke else ''}.json"), "w") as f:
      json.dump(payload, f, indent=1)
