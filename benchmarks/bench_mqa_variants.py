"""Prefill logits kernel schedules against each other (and DeepGEMM from the same run).

Times every candidate of ``kernels_pallas.mqa_logits.variant_configs`` on causal prefill
shapes by kernel time (``common.kernel_ms_per_call``: the torch profiler's sum of the GPU
kernels of one call, L2 flushed before each call), after checking each variant's logits
against the default schedule's on the same inputs (calc_diff < 5e-6 and the same -inf
pattern; a variant that fails the check is not timed). With ``--peers`` (the anchors' JSON,
``.anchors/README.md``) it also prints DeepGEMM's kineto time for the shape and the speed
ratio DeepGEMM ms / ours (>= 1: as fast or faster).

Usage (H200):
  PYTHONPATH=. python3 benchmarks/bench_mqa_variants.py --out $OUT --peers $OUT/anchors.json
Options: --variants a,b (default: all; ``name+field=value`` replaces fields of a variant:
``default+num_stages=5``; separate with ";" when a spec holds a comma),
--shapes 2048x8192,8192x32768x32 (TxS[xH]),
--budget SECONDS (default 240: no measurement starts after it; the JSON is still written),
--calls N (profiled calls per measurement), --hang-s SECONDS (a measurement taking longer is
taken for a hung kernel: the JSON is written and the process exits with status 3).

Order: the problems and the default schedule's logits for all shapes first, then one variant
after the other over all shapes (``ORDER``: DeepGEMM's layout first), then the default once
more (the card's drift over the run). Every measurement runs in its own try/except, so a failure costs only its row;
``DIR/mqa_variants.json`` is rewritten after every row, so a run cut short keeps what it
measured. ``--interpret`` runs the kernels in interpret mode on the CPU (checks this script).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.bench_mqa_logits import problem  # noqa: E402
from kernels_pallas import mqa_logits as kernel  # noqa: E402

SHAPES = [(2048, 8192, 64), (4096, 16384, 64), (8192, 8192, 64), (8192, 16384, 64),
          (8192, 32768, 64), (8192, 65536, 64), (8192, 32768, 32)]
MAX_CALC_DIFF = 5e-6
# Measurement order (a run cut short by --budget keeps the first): DeepGEMM's layout first.
ORDER = ["default", "round_robin", "balanced", "release_arrive", "release_fence", "two_wg",
         "direct", "nc4_split_n", "nc4_split", "split_n", "ob2_fill2", "nc3_split",
         "launch_order", "nc4_alt"]


def parse_shapes(spec: str):
  out = []
  for item in spec.split(","):
    parts = [int(x.upper().replace("K", "")) * (1024 if "K" in x.upper() else 1)
             for x in item.split("x")]
    out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else 64))
  return out


def load_peers(path: str | None) -> dict:
  """{(T, S, H): DeepGEMM prefill record} from the anchors' JSON; {} when absent."""
  return {(r["T"], r["S"], r.get("H", 64)): r
          for r in common.anchor_rows(path, "prefill", "bench_mqa_variants")
          if r.get("T") and r.get("S")}


def _calc_diff(x, y) -> float:
  x = jnp.where(jnp.isneginf(x), 0.0, x)
  y = jnp.where(jnp.isneginf(y), 0.0, y)
  return float(1.0 - 2.0 * jnp.sum(x * y) / jnp.sum(x * x + y * y))


def _time_ms(fn, args, calls: int, interpret: bool) -> tuple[float, str]:
  ms = None if interpret else common.kernel_ms_per_call(fn, args, calls=calls)
  if ms is not None:
    return ms, "kineto"
  # No torch: wall time of one blocking call (includes dispatch; coarse).
  return common.time_fn(fn, *args, iters=calls) * 1e3, "wall"


def _hung(payload, write, row):
  """Watchdog: a kernel that never finishes blocks the main thread for good; record it,
  write what was measured and end the process (a hung GPU context cannot be reused)."""
  row["error"] = "hung: no result within --hang-s"
  payload["rows"].append(row)
  payload["stopped_early"] = True
  payload["hung"] = f"{row['T']}x{row['S']} H={row['H']} {row['variant']}"
  print(f"\nbench_mqa_variants: {payload['hung']} hung; wrote the rows so far", flush=True)
  write()
  os._exit(3)


def variant_config(spec: str, H: int) -> "kernel.MqaLogitsConfig":
  """A variant by name, or ``name+field=value+...`` with fields of it replaced, e.g.
  ``default+num_stages=5`` (integers; 0/1 for the boolean fields; strings as written:
  ``default+release=arrive``)."""
  name, *fields = spec.split("+")
  return common.replace_fields(kernel.variant_configs(H)[name], fields)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default=None, help="directory for mqa_variants.json")
  ap.add_argument("--peers", default=None, help="anchors.json with DeepGEMM's prefill times")
  ap.add_argument("--variants", default="", help="comma list of variant names (default: all)")
  ap.add_argument("--shapes", default="", help="comma list of TxS[xH] (default: the issue's)")
  ap.add_argument("--budget", type=float, default=240.0, help="seconds; stop starting rows after")
  ap.add_argument("--calls", type=int, default=10, help="profiled calls per measurement")
  ap.add_argument("--hang-s", type=float, default=60.0,
                  help="a measurement running longer is taken as a hung kernel: the JSON is "
                       "written and the process exits (status 3)")
  ap.add_argument("--interpret", action="store_true",
                  help="CPU check of this script: the kernels in interpret mode, wall time")
  args = ap.parse_args(argv)
  t_start = time.monotonic()
  shapes = parse_shapes(args.shapes) if args.shapes else SHAPES
  peers = load_peers(args.peers)
  rows: list[dict] = []
  payload = dict(benchmark="mqa_variants", method="kineto kernel time per call, L2 flushed "
                 "(benchmarks/common.kernel_ms_per_call); correctness vs the default schedule",
                 date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 jax=jax.__version__, rows=rows, stopped_early=False)

  def write():
    if not args.out:
      return
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mqa_variants.json"), "w") as f:
      json.dump(payload, f, indent=1)

  if jax.default_backend() != "gpu" and not args.interpret:
    print("bench_mqa_variants: no GPU; the Pallas kernel needs a Hopper GPU. Nothing to time.")
    payload["error"] = "no GPU"
    write()
    return
  payload["card"] = common.card() + (" (interpret mode)" if args.interpret else "")
  interp = True if args.interpret else False
  write()

  # Problems and the default schedule's logits for every shape first (one at a time they
  # take ~1-5 GB each on the device), then the variants one after the other over all shapes:
  # a variant that fails costs only its rows; one that hangs (the watchdog ends the run, the
  # JSON already holds every row) the measurements after it.
  probs = {}
  for T, S, H in shapes:
    try:
      a, pairs = problem(T, S, H=H)
      cfg = kernel.variant_configs(H)["default"]
      ref = jax.jit(lambda *x, cfg=cfg: kernel.mqa_logits(*x, config=cfg, interpret=interp))(*a)
      probs[(T, S, H)] = (a, 2 * pairs * H * 128, ref, jnp.isneginf(ref))
    except Exception as e:  # the whole shape is lost, the next one still runs
      print(f"{T}x{S} H={H}: setup failed: {type(e).__name__}: {e}")
      rows.append(dict(T=T, S=S, H=H, variant="*", error=f"setup: {type(e).__name__}: {e}"))
  write()
  known = kernel.variant_configs(64)
  names = [n for n in ORDER if n in known] + [n for n in known if n not in ORDER]
  if args.variants:
    wanted = [v.strip() for v in args.variants.split(";" if ";" in args.variants else ",")
              if v.strip()]
    names = ["default"] + [v for v in wanted
                           if (v in names or v.split("+")[0] in names) and v != "default"]
  default_ms: dict = {}

  def measure(name, T, S, H, label=None):
    a, flop, ref, ref_inf = probs[(T, S, H)]
    cfg = variant_config(name, H)
    row = dict(T=T, S=S, H=H, variant=label or name, config=str(cfg))
    t0 = time.monotonic()
    watchdog = threading.Timer(args.hang_s, _hung, (payload, write, row))
    watchdog.start()
    try:
      f = jax.jit(lambda *x: kernel.mqa_logits(*x, config=cfg, interpret=interp))
      out = f(*a)
      row["same_inf_pattern"] = bool(jnp.array_equal(jnp.isneginf(out), ref_inf))
      row["calc_diff_vs_default"] = _calc_diff(out, ref)
      row["bitwise_equal_default"] = bool(jnp.array_equal(out, ref))
      del out
      if not (row["same_inf_pattern"] and row["calc_diff_vs_default"] < MAX_CALC_DIFF):
        row["error"] = "output differs from the default schedule's"
      else:
        ms, how = _time_ms(f, a, args.calls, interp)
        row.update(ms=ms, timing=how, tflops=flop / (ms * 1e-3) / 1e12)
        if name == "default" and label is None:
          default_ms[(T, S, H)] = ms
        if default_ms.get((T, S, H)):
          row["speedup_vs_default"] = default_ms[(T, S, H)] / ms
        peer = peers.get((T, S, H))
        if peer and peer.get("kineto_ms"):
          row["deepgemm_ms"] = peer["kineto_ms"]
          row["vs_deepgemm"] = peer["kineto_ms"] / ms
    except Exception as e:
      row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
      traceback.print_exc(limit=3)
    finally:
      watchdog.cancel()
    row["wall_s"] = time.monotonic() - t0
    rows.append(row)
    print(f"{T}x{S} H={H} {row['variant']}: "
          + (f"{row['ms']:.3f} ms" if "ms" in row else row["error"])
          + (f", {row['vs_deepgemm']:.2f}x DeepGEMM" if "vs_deepgemm" in row else ""), flush=True)
    write()

  # The default once more at the end: the drift of the card over the run.
  plan = [(n, k, None) for n in names for k in probs]
  if len(names) > 1:
    plan += [("default", k, "default(again)") for k in probs]
  for name, (T, S, H), label in plan:
    if time.monotonic() - t_start > args.budget:
      payload["stopped_early"] = True
      print(f"budget of {args.budget:.0f} s spent: stopping before {T}x{S} H={H} {name}")
      break
    measure(name, T, S, H, label)
  probs.clear()

  print(f"\nmqa_logits schedules (causal, D=128, clean) on {payload['card']}, "
        f"jax {jax.__version__};"
        " ms = kernel time per call; vs_deepgemm = DeepGEMM kineto ms / ours")
  shown = [dict(r, calc_diff_vs_default=None if r.get("calc_diff_vs_default") is None
                else f"{r['calc_diff_vs_default']:.1e}") for r in rows]
  common.print_table(shown, ["T", "S", "H", "variant", "ms", "tflops", "speedup_vs_default",
                             "deepgemm_ms", "vs_deepgemm", "calc_diff_vs_default", "error"])
  best = {}
  for r in rows:
    if "ms" in r and r["variant"] != "default(again)":
      k = (r["T"], r["S"], r["H"])
      if k not in best or r["ms"] < best[k]["ms"]:
        best[k] = r
  if best:
    print("\nfastest per shape:")
    common.print_table(list(best.values()), ["T", "S", "H", "variant", "ms",
                                             "speedup_vs_default", "vs_deepgemm"])
  payload["fastest"] = [dict(T=r["T"], S=r["S"], H=r["H"], variant=r["variant"], ms=r["ms"])
                        for r in best.values()]
  payload["elapsed_s"] = time.monotonic() - t_start
  write()
  if args.out:
    print(f"\nwrote {os.path.join(args.out, 'mqa_variants.json')}")


if __name__ == "__main__":
  main()
