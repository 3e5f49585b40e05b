"""Command line: ``python -m nsa_jax demo`` runs a DeepSeek-V3.2 indexer layer end to end.

The demo builds one V3.2-shaped indexer layer (random weights, or ``--checkpoint DIR --layer N``),
then serves a few requests the way an inference engine does: a prompt prefill, a second ragged
prefill extending every request onto its cached prefix, and decode steps, all through the
jit-compiled steps (``IndexerSteps``) with the paged fp8 K cache donated from step to step.
It prints the memory budget, each prefill's chunk plan, compile counts, timings and what the
top-k selected. On a GPU ``--backend auto`` runs the Pallas kernels; on CPU the xla backend.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import nsa_jax
from nsa_jax.config import MODELS
from nsa_jax.indexer import (Indexer, IndexerConfig, IndexerSteps, allocate_block_tables,
                             decode_inputs, prefill_inputs)
from nsa_jax.reference import PAGE_SIZE

# A layer small enough for CI (--small): V3.2's head shapes, narrow projections.
SMALL_CONFIG = IndexerConfig(dim=512, q_lora_rank=256, n_heads=64, head_dim=128, topk=256)


class _CompileCounter:
  """Counts XLA backend compiles (jax's monitoring event) from the moment it is made."""

  def __init__(self):
    self.n = 0
    self.active = True
    jax.monitoring.register_event_duration_secs_listener(self._on)

  def _on(self, event, duration, **kwargs):
    if self.active and event == "/jax/core/compile/backend_compile_duration":
      self.n += 1


def _ints(text: str, name: str) -> list[int]:
  try:
    vals = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise SystemExit(f"demo: --{name} must be comma-separated ints, got {text!r}")
  if not vals or min(vals) < 0:
    raise SystemExit(f"demo: --{name} must be non-empty ints >= 0, got {text!r}")
  return vals


def _fmt_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
    n /= 1024
  return str(n)


def _activations(rng, rows: int, cfg: IndexerConfig):
  """Random bf16 hidden states and q-lora activations (both RMS-normed in V3.2: unit scale)."""
  x = jnp.asarray(rng.standard_normal((rows, cfg.dim), np.float32), jnp.bfloat16)
  qr = jnp.asarray(rng.standard_normal((rows, cfg.q_lora_rank), np.float32), jnp.bfloat16)
  return x, qr


def _kernel_note(backend: str) -> str:
  if backend == "xla":
    return "xla (reference backend)"
  if jax.default_backend() == "gpu":
    return "pallas (Mosaic GPU kernels, xla where a kernel does not take the shape)"
  return "xla (no GPU: auto falls back to the xla backend)"


def _ladder(step: int, upto: int):
  """Bucket ladder: multiples of ``step`` (None: the builder's powers of two)."""
  return tuple(range(step, upto + step, step)) if step else None


def _prefill_round(name, steps, cfg, rng, ext, pre, tables, cache, counter, log, *, bucket):
  """One ragged prefill through the jitted step; returns (slots, batch, cache, seconds).

  The same batch runs twice: the first call's time (compile included) is printed, the second
  (steady-state) time is returned."""
  batch = nsa_jax.build_ragged_batch(ext, pre, token_buckets=_ladder(bucket, sum(ext)),
                                     key_buckets=_ladder(bucket, sum(ext) + sum(pre)))
  inp = prefill_inputs(batch, tables, num_pages=cache.num_pages)
  plan = steps.plan(inp)
  x, qr = _activations(rng, batch.T_pad, cfg)
  valid = int(np.clip(batch.ke - batch.ks, 0, None).sum())
  log(f"\n[{name}] extend {ext} onto cached {pre}: {batch.num_tokens} tokens -> T_pad "
      f"{batch.T_pad}, {batch.num_keys} keys -> S_pad {batch.S_pad}")
  chunks = (f"{plan.num_chunks} chunks of {plan.rows} rows" if plan.chunked else
            "unchunked (fits the budget" + (", below the skip threshold)"
                                            if plan.num_q * plan.num_k <
                                            nsa_jax.budget.SKIP_CHUNK_ELEMENTS else ")"))
  log(f"  chunk plan: {chunks}; peak logits {_fmt_bytes(plan.chunk_logits_bytes)} "
      f"of budget {_fmt_bytes(steps.budget_bytes)}")
  p0 = steps.cache_sizes()["prefill"]
  t0 = time.perf_counter()
  slots, cache = steps.prefill(x, qr, inp, cache)
  slots = jax.block_until_ready(slots)
  t_first = time.perf_counter() - t0
  compiles = steps.cache_sizes()["prefill"] - p0
  tag = "new bucket: compiled" if compiles else "bucket already compiled"
  # Same inputs again: rewrites the same keys into the same slots, so the cache is unchanged;
  # this is the steady-state time of a batch in an already compiled bucket.
  c1 = counter.n
  t0 = time.perf_counter()
  slots2, cache = steps.prefill(x, qr, inp, cache)
  slots2 = jax.block_until_ready(slots2)
  t_steady = time.perf_counter() - t0
  assert counter.n == c1, "a second call in the same bucket compiled"
  assert np.array_equal(np.asarray(slots), np.asarray(slots2))
  tflops = 2 * valid * cfg.n_heads * cfg.head_dim / t_steady / 1e12
  log(f"  first call {t_first * 1e3:9.1f} ms ({tag}); "
      f"steady {t_steady * 1e3:9.1f} ms = {batch.num_tokens / t_steady:,.0f} tokens/s, "
      f"{tflops:.3f} useful TFLOP/s over {valid:,} valid (query, key) pairs")
  return np.asarray(slots), batch, cache, t_steady


def _slot_owner(tables: np.ndarray, num_pages: int):
  """Host map slot -> (request, position) from the block tables (-1 where unused)."""
  req = np.full(num_pages * PAGE_SIZE, -1, np.int64)
  pos = np.full(num_pages * PAGE_SIZE, -1, np.int64)
  for b, row in enumerate(tables):
    for col, page in enumerate(row):
      if page >= 0:
        req[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = b
        pos[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = col * PAGE_SIZE + np.arange(PAGE_SIZE)
  return req, pos


def _summarize(log, title, slots_rows, requests, ctx_lens, prefix_lens, owner, topk):
  """Per request: how many keys were picked, where they lie, and that they are consistent."""
  req_of, pos_of = owner
  log(f"\n{title}")
  for b, row, ctx, pre in zip(requests, slots_rows, ctx_lens, prefix_lens):
    sel = row[row >= 0]
    ok = bool(((req_of[sel] == b) & (pos_of[sel] < ctx)).all()) and len(set(sel.tolist())) == len(sel)
    pos = np.sort(pos_of[sel])
    in_prefix = float((pos < pre).mean()) if len(pos) else 0.0
    recent = float((pos >= ctx - 64).mean()) if len(pos) else 0.0
    log(f"  request {b}: {len(sel):5d} of {ctx:6d} keys (cap {topk}); {in_prefix:5.1%} from the "
        f"cached prefix, {recent:5.1%} in the last 64; first positions {pos[:6].tolist()}; "
        f"slots {'consistent' if ok else 'INCONSISTENT'}")
    if not ok:
      raise SystemExit(f"demo: request {b}'s selected slots do not belong to it")


def demo(args, log=print) -> dict:
  """Runs the demo; returns a dict of the measured figures (tests read it)."""
  t_start = time.perf_counter()
  counter = _CompileCounter()
  if args.checkpoint:
    overrides = {"topk": args.topk} if args.topk else {}
    try:
      module = nsa_jax.load_indexer(args.checkpoint, args.layer, **overrides)
    except (ValueError, OSError) as e:  # a bad checkpoint is a user error: no traceback
      raise SystemExit(f"demo: {e}")
    cfg = module.config
    source = f"checkpoint {args.checkpoint}, layer {args.layer}"
  else:
    cfg = IndexerConfig.for_model(args.model)
    if args.small:  # the model's heads, SMALL_CONFIG's narrow projections and top-k
      cfg = cfg.replace(dim=SMALL_CONFIG.dim, q_lora_rank=SMALL_CONFIG.q_lora_rank,
                        topk=SMALL_CONFIG.topk)
    if args.topk:
      cfg = cfg.replace(topk=args.topk)
    from flax import nnx
    module = Indexer(cfg, rngs=nnx.Rngs(args.seed))
    source = f"random weights ({args.model} shapes{', --small' if args.small else ''})"
  rng = np.random.default_rng(args.seed)
  prefix, ext = _ints(args.prefix, "prefix"), _ints(args.extend, "extend")
  if len(prefix) != len(ext):
    raise SystemExit(f"demo: --prefix and --extend must name the same number of requests, got "
                     f"{len(prefix)} and {len(ext)}")
  B, n = len(ext), args.next_n

  log(f"nsa_jax {nsa_jax.__version__} | jax {jax.__version__} | {jax.devices()[0].device_kind}"
      f" | backend={args.backend}: {_kernel_note(args.backend)}")
  log(f"indexer layer: {source}: dim {cfg.dim}, q_lora_rank {cfg.q_lora_rank}, H {cfg.n_heads},"
      f" D {cfg.head_dim}, top-{cfg.topk}, scale_fmt {cfg.scale_fmt}, hadamard "
      f"{cfg.use_hadamard}, rope {'interleaved' if cfg.rope_interleave else 'NeoX'} "
      f"theta {cfg.rope_theta:g} YaRN x{cfg.rope_factor:g}")
  steps = IndexerSteps(module, backend=args.backend, budget_bytes=args.budget_bytes)
  log(f"memory budget for prefill logits: {_fmt_bytes(steps.budget_bytes)} "
      f"({'from --budget-bytes' if args.budget_bytes else 'measured once on ' + str(jax.devices()[0]) + ' and cached'}"
      f"; chunking skipped below {nsa_jax.budget.SKIP_CHUNK_ELEMENTS:,} logits)")

  capacity = [p + e + args.decode_steps * n for p, e in zip(prefix, ext)]
  tables, num_pages = allocate_block_tables(capacity, seed=args.seed)
  cache = nsa_jax.IndexKCache.create(num_pages, cfg.head_dim)
  log(f"paged K cache: {num_pages} pages x {PAGE_SIZE} tokens "
      f"({_fmt_bytes(num_pages * PAGE_SIZE * (cfg.head_dim + 4))}), pages shuffled across "
      f"requests")
  owner = _slot_owner(tables, num_pages)
  out = dict(config=cfg, budget_bytes=steps.budget_bytes)

  if sum(prefix):
    _, _, cache, out["prompt_s"] = _prefill_round(
        "prompt prefill", steps, cfg, rng, prefix, [0] * B, tables, cache, counter, log,
        bucket=args.bucket)
  slots, batch, cache, out["extend_s"] = _prefill_round(
      "extend prefill", steps, cfg, rng, ext, prefix, tables, cache, counter, log,
      bucket=args.bucket)
  last_rows = np.cumsum(ext) - 1
  has = [b for b in range(B) if ext[b] > 0]
  _summarize(log, "selected keys of each request's last new token (prefill):",
             [slots[last_rows[b]] for b in has], has, [prefix[b] + ext[b] for b in has],
             [prefix[b] for b in has], owner, cfg.topk)

  ctx = [p + e for p, e in zip(prefix, ext)]
  dec_slots = None
  if args.decode_steps:
    from tqdm import tqdm
    log(f"\n[decode] {args.decode_steps} steps, {n} new token{'s' * (n > 1)} per request "
        f"per step")
    d0 = steps.cache_sizes()["decode"]
    times = []
    bar = tqdm(range(args.decode_steps), desc="decode", unit="step", file=sys.stderr,
               disable=args.decode_steps < 16 or args.quiet)
    d = None
    for _ in bar:
      ctx = [c + n for c in ctx]
      d = decode_inputs(ctx, tables, num_pages=num_pages)
      x, qr = _activations(rng, d.context_lens.shape[0] * n, cfg)
      t0 = time.perf_counter()
      dec_slots, cache = steps.decode(x, qr, d, cache)
      dec_slots = jax.block_until_ready(dec_slots)
      times.append(time.perf_counter() - t0)
    B_pad, pages_pad = d.block_tables.shape
    steady = float(np.median(times[1:])) if len(times) > 1 else times[0]
    out["decode_s"] = steady
    log(f"  B_pad {B_pad}, {pages_pad} pages per request (logits width "
        f"{pages_pad * PAGE_SIZE}); the decode step compiled "
        f"{steps.cache_sizes()['decode'] - d0} program(s) over {args.decode_steps} steps")
    log(f"  first step {times[0] * 1e3:9.1f} ms; steady {steady * 1e3:9.2f} ms per step "
        f"({B * n / steady:,.0f} tokens/s)")
    dec_slots = np.asarray(dec_slots)
    _summarize(log, "selected keys of each request's newest token (decode):",
               [dec_slots[b * n + n - 1] for b in range(B)], range(B), ctx, prefix, owner,
               cfg.topk)

  counter.active = False
  sizes = steps.cache_sizes()
  out.update(compiles=counter.n, programs=sizes, wall_s=time.perf_counter() - t_start,
             prefill_slots=slots, decode_slots=dec_slots)
  log(f"\ncompiles: {counter.n} XLA programs in all (prefill step: {sizes['prefill']} "
      f"bucket{'s' * (sizes['prefill'] != 1)}, decode step: {sizes['decode']}; the rest are "
      f"small host-side array setups); total wall time {out['wall_s']:.1f} s")
  return out


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m nsa_jax", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="cmd", required=True)
  d = sub.add_parser("demo", help="run a DeepSeek-V3.2 indexer layer: prefill, extend, decode")
  d.add_argument("--prefix", default="2560,0,1024",
                 help="prompt tokens per request, prefilled first (default: 2560,0,1024)")
  d.add_argument("--extend", default="256,384,128",
                 help="new tokens per request in the second, ragged prefill (default: 256,384,128)")
  d.add_argument("--bucket", type=int, default=256,
                 help="pad token and key counts to multiples of this (0: powers of two)")
  d.add_argument("--decode-steps", type=int, default=8, help="decode steps after the prefills")
  d.add_argument("--next-n", type=int, default=1, choices=(1, 2),
                 help="new tokens per request per decode step (2: speculative decoding)")
  d.add_argument("--topk", type=int, default=0, help="override index_topk (default: config's)")
  d.add_argument("--backend", default="auto", choices=nsa_jax.ops.BACKENDS)
  d.add_argument("--budget-bytes", type=int, default=None,
                 help="prefill logits budget in bytes (default: measured once and cached)")
  d.add_argument("--checkpoint", default=None,
                 help="DeepSeek-V3.2 checkpoint dir (config.json + safetensors shards)")
  d.add_argument("--layer", type=int, default=0, help="decoder layer to load with --checkpoint")
  d.add_argument("--model", default="deepseek-v3.2", choices=sorted(MODELS),
                 help="whose indexer shapes the random weights take (default: deepseek-v3.2; "
                      "--checkpoint reads its own config.json instead)")
  d.add_argument("--small", action="store_true",
                 help="a narrow layer (dim 512, q_lora_rank 256, top-256) for quick runs and CI")
  d.add_argument("--seed", type=int, default=0)
  d.add_argument("--quiet", action="store_true", help="no progress bar")
  return parser


def main(argv=None) -> None:
  args = build_parser().parse_args(argv)
  if args.cmd == "demo":
    if args.decode_steps < 0:
      raise SystemExit(f"demo: --decode-steps must be >= 0, got {args.decode_steps}")
    if args.bucket < 0:
      raise SystemExit(f"demo: --bucket must be >= 0, got {args.bucket}")
    if args.budget_bytes is not None and args.budget_bytes < 1:
      raise SystemExit(f"demo: --budget-bytes must be >= 1, got {args.budget_bytes}")
    demo(args)


if __name__ == "__main__":
  main()
