"""Does any runtime setting shorten jax's wait for a finished program? One process per setting.

Usage: PYTHONPATH=. python benchmarks/bench_host_knobs.py [--out DIR] [--smoke]
                                       [--knobs none,spinwait,...] [--iters N] [--rounds R]

A standalone jitted call on a GPU returns 0.06-0.3 ms after its program finished, growing with
the program's length (``bench_host_overhead.py``'s ladder). jax learns that a program finished
through a host function the CUDA driver runs (``cuLaunchHostFunc``), which hands over to PJRT's
callback thread, which wakes the caller (XLA's sources). The settings below act on that path
or on how deeply the waiting threads sleep; each must be in place before jax starts, so each
runs in a fresh process (this script with ``--one KNOB``):

- ``none``, ``none_again``: nothing set, first and last (their spread is the run's noise);
- ``spinwait``: ``XLA_CUDA_HOST_CALLBACK_SPINWAIT=1`` (XLA's spin-waiting host callback,
  ``cuLaunchHostFunc_v2``; only in plugins built with CUDA >= 13.2, on a 13.2 driver);
- ``sched_spin``: ``TF_CUDA_PLATFORM_GPU_DEVICE_SCHEDULE=spin`` (the CUDA context's schedule);
- ``dma_latency``: ``/dev/cpu_dma_latency`` held at 0 (the kernel's PM QoS: no deep idle
  states while held; needs root, else the row says so and measures nothing changed);
- ``busy_cores``: half the cores spinning in other processes, this one pinned to the rest;
- ``pinned``: this process pinned to half the cores, nothing else running (the control);
- ``async_dispatch``: ``PJRT_GPU_ENABLE_ASYNC_DISPATCH=1`` (PJRT launches on its own thread).

Each process times, waited for with ``block_until_ready`` and by polling ``is_ready()``:
a ladder of plain-jax programs (``mmN``: a straight-line jit of N bf16 matmuls) and the
V3.2 steps with ``out=`` (decode 1 x 4K, 1 x 32K, 64 x 32K, extend 1 x 128 over 4K, prefill
4K; ``--smoke``: a narrow layer and small sizes, for the CPU). Per row: ``wall_ms`` and
``spin_ms`` (lowest median of ``--rounds`` rounds of ``--iters`` standalone calls),
``piped_ms`` (per call, calls issued back to back: the device time where the device is the
slower side, as for the ladder and the prefill; the short decode steps are host-bound there,
so their device time is ``bench_host_overhead.py``'s CUPTI span, not this).

Writes DIR/host_knobs.json (and benchmarks/results/host_knobs.json unless --smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KNOBS = {
    "none": {},
    "spinwait": dict(env={"XLA_CUDA_HOST_CALLBACK_SPINWAIT": "1"}),
    "sched_spin": dict(env={"TF_CUDA_PLATFORM_GPU_DEVICE_SCHEDULE": "spin"}),
    "dma_latency": dict(dma=True),
    "busy_cores": dict(busy=True, pin=True),
    "pinned": dict(pin=True),
    "async_dispatch": dict(env={"PJRT_GPU_ENABLE_ASYNC_DISPATCH": "1"}),
    "none_again": {},
}


def _halves():
  cores = sorted(os.sched_getaffinity(0))
  half = max(len(cores) // 2, 1)
  return cores[:half], cores[half:]


# --------------------------------------------------------------------------- one process

def _one(knob: str, smoke: bool, iters: int, rounds: int, path: str) -> None:
  """Times the ladder and the steps under ``knob`` (already in the environment / affinity)."""
  note = ""
  hold = None
  if KNOBS[knob].get("dma"):
    try:
      hold = open("/dev/cpu_dma_latency", "wb", buffering=0)  # noqa: SIM115 (held to the end)
      hold.write(struct.pack("i", 0))
      note = "held at 0"
    except OSError as e:
      note = f"not held: {e.strerror}"
  if KNOBS[knob].get("pin"):
    os.sched_setaffinity(0, _halves()[0])
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import nsa_jax
  from benchmarks import bench_host_overhead as bh
  from nsa_jax.indexer import Indexer, allocate_block_tables, decode_inputs, prefill_inputs

  rows = []

  def measure(case, call, state=None):
    """``call(state, out) -> (out, state)``, ``out`` None on the first call."""
    wall, _, state = bh._standalone(call, state, iters, give_out=True, rounds=rounds)
    spin, _, state = bh._standalone(call, state, iters, give_out=True, wait=bh._spin,
                                    rounds=rounds)
    # After the standalone rounds: their warm-up compiled the out= program.
    piped, _ = bh._pipelined(call, state, iters, rounds=rounds)
    r = dict(knob=knob, case=case, piped_ms=piped * 1e3, wall_ms=wall * 1e3,
             spin_ms=spin * 1e3, note=note)
    rows.append(r)
    print(f"  [{knob}] {case:14s} wall {r['wall_ms']:.3f}  spin {r['spin_ms']:.3f}  "
          f"back to back {r['piped_ms']:.3f} ms", flush=True)

  n = 512 if smoke else 4096
  a = jnp.ones((n, n), jnp.bfloat16)
  for count in (1, 4, 16):
    def prog(a, count=count):
      c = a[:, : n // 4]
      for _ in range(count):
        c = jnp.tanh(a @ c * 1e-3)
      return c
    f = jax.jit(prog)
    measure(f"mm{count}", lambda st, o, f=f: (f(a), st))

  cfg = bh.SMOKE_CFG if smoke else bh.FULL_CFG
  nsa_jax.budget.prime()
  steps = nsa_jax.IndexerSteps(Indexer(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  if smoke:
    cases = [("decode 1x1K", 1, 1024, None), ("extend 1x64/512", None, [64], [512])]
  else:
    cases = [("decode 1x4K", 1, 4096, None), ("decode 1x32K", 1, 32768, None),
             ("decode 64x32K", 64, 32768, None), ("extend 1x128/4K", None, [128], [4096]),
             ("prefill 4K", None, [4096], [0])]
  for case, B, a1, a2 in cases:
    if B is not None:
      t, P = allocate_block_tables([a1 + 1] * B, seed=0)
      inp = jax.device_put(decode_inputs([a1] * B, t, num_pages=P))
      rows_n, m = inp.context_lens.shape[0], steps.decode
    else:
      t, P = allocate_block_tables([e + p for e, p in zip(a1, a2)], seed=0)
      b = nsa_jax.build_ragged_batch(a1, a2)
      inp = jax.device_put(prefill_inputs(b, t, num_pages=P))
      rows_n, m = b.T_pad, steps.prefill
    x = bh._bf16(rng, (rows_n, cfg.dim))
    qr = bh._bf16(rng, (rows_n, cfg.q_lora_rank))

    def call(cache, o, m=m, x=x, qr=qr, inp=inp):
      return m(x, qr, inp, cache) if o is None else m(x, qr, inp, cache, out=o)
    measure(case, call, bh._random_cache(rng, P, cfg.head_dim))
  with open(path, "w") as f:
    json.dump(rows, f)
  if hold is not None:
    hold.close()


# --------------------------------------------------------------------------- the driver

def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--smoke", action="store_true", help="small sizes (CPU-friendly)")
  ap.add_argument("--out", default=None, help="also write the JSON here")
  ap.add_argument("--knobs", default=",".join(KNOBS), help=f"comma list of {list(KNOBS)}")
  ap.add_argument("--iters", type=int, default=None, help="standalone calls per round")
  ap.add_argument("--rounds", type=int, default=None, help="rounds (the lowest median is kept)")
  ap.add_argument("--timeout", type=float, default=240.0, help="seconds per process")
  ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one process
  ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  iters = args.iters or (5 if args.smoke else 300)
  rounds = args.rounds or (1 if args.smoke else 5)
  if args.one:
    _one(args.one, args.smoke, iters, rounds, args.json)
    return
  knobs = [k for k in args.knobs.split(",") if k]
  bad = [k for k in knobs if k not in KNOBS]
  if bad:
    ap.error(f"--knobs: unknown {bad}; known: {list(KNOBS)}")
  from benchmarks import common
  import jax
  print(f"runtime settings against jax's wait | {common.card()} | jax {jax.__version__}",
        flush=True)
  rows, failed = [], []
  for knob in knobs:
    spec = KNOBS[knob]
    env = dict(os.environ, **spec.get("env", {}))
    busy = []
    if spec.get("busy"):
      for core in _halves()[1]:
        busy.append(subprocess.Popen(
            [sys.executable, "-c",
             f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True: pass"]))
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
      path = tmp.name
    cmd = [sys.executable, os.path.abspath(__file__), "--one", knob, "--json", path,
           "--iters", str(iters), "--rounds", str(rounds)] + (["--smoke"] if args.smoke else [])
    print(f"== {knob}: {spec or 'nothing set'}", flush=True)
    try:
      subprocess.run(cmd, env=env, timeout=args.timeout, check=True)
      with open(path) as f:
        rows += json.load(f)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError,
            json.JSONDecodeError) as e:
      failed.append(knob)
      print(f"  [{knob}] failed: {type(e).__name__}: {e}", flush=True)
    finally:
      for p in busy:
        p.kill()
        p.wait()
      if os.path.exists(path):
        os.unlink(path)
    common.write_results("host_knobs", rows, args.out, args.smoke,
                         extra=dict(iters=iters, rounds=rounds, knobs=knobs, failed=failed))
  cases = list(dict.fromkeys(r["case"] for r in rows))
  print("\nwall ms (block_until_ready); knob down, case across")
  print("knob".ljust(16) + "".join(c.rjust(16) for c in cases))
  for knob in knobs:
    got = {r["case"]: r["wall_ms"] for r in rows if r["knob"] == knob}
    if got:
      print(knob.ljust(16) + "".join(f"{got.get(c, float('nan')):16.3f}" for c in cases))
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  main()
