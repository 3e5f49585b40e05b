"""Command line: ``nsa-jax demo`` (or ``python -m nsa_jax demo``) runs one DeepSeek-V3.2 indexer
layer end to end, the way an inference engine drives it.

The demo builds one V3.2-shaped indexer layer (random weights, or ``--checkpoint DIR --layer N``),
then serves a few requests: a prompt prefill, a second ragged prefill extending every request
onto its cached prefix, and decode steps, all through the jit-compiled steps (``IndexerSteps``)
with the paged fp8 K cache donated from step to step. It prints the memory budget, each
prefill's chunk plan, compile counts, timings and a summary of what the top-k selected. On a
GPU ``--backend auto`` runs the Pallas kernels; on a CPU the xla backend.

Bad flags end with one line on stderr and exit status 2; sizes are checked against the host's
and the device's memory before anything is allocated. Compiled programs are kept in JAX's
persistent compilation cache (``nsa_jax.compile_cache``), so a second run loads them instead
of compiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm import tqdm

import nsa_jax
from nsa_jax import budget as _budget
from nsa_jax.compile_cache import enable_compile_cache
from nsa_jax.config import MODELS, IndexerConfig
from nsa_jax.indexer import Indexer, allocate_block_tables, decode_inputs, prefill_inputs
from nsa_jax.planner import bucket_size
from nsa_jax.reference import PAGE_SIZE
from nsa_jax.steps import IndexerSteps

EXIT_USAGE, EXIT_FAILED = 2, 1
# A layer small enough for CI (--small): the model's heads, these narrow projections and top-k.
SMALL_CONFIG = IndexerConfig(dim=512, q_lora_rank=256, n_heads=64, head_dim=128, topk=256)


class CLIError(Exception):
  """A bad flag (code 2) or a failed run (code 1): main prints one line, no traceback."""

  def __init__(self, message: str, code: int = EXIT_USAGE):
    super().__init__(" ".join(str(message).split()))  # one line, whatever the source said
    self.code = code


# --------------------------------------------------------------------------- parsing

class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors (no usage block) that point at --help."""

  def error(self, message):
    self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Defaults in every flag's help; descriptions and epilogs keep their line breaks.

  A default of None or False is not printed: those flags say in words what happens unset."""

  def _get_help_string(self, action):
    if action.default is None or action.default is False:
      return action.help
    return super()._get_help_string(action)


def _prog() -> str:
  """How the user ran us: ``nsa-jax`` (the console script) or ``python -m nsa_jax``."""
  name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
  return name if name.startswith("nsa-jax") else "python -m nsa_jax"


DESCRIPTION = """\
nsa_jax: DeepSeek-V3.2's lightning indexer (fp8 multi-head MQA logits and top-k key selection
for sparse attention) in JAX. The demo command runs one indexer layer end to end, as an
inference engine drives it: prompt prefill, ragged extend onto the paged cache, decode."""

DEMO_STEPS = """\
what it does, step by step:
  1. layer    builds one indexer layer: random weights drawn on the host (--model's
              shapes, or a narrow layer with --small), or layer --layer of --checkpoint.
              With random weights the selection means nothing; the demo shows shapes,
              bucketing, compiles, timings and that every selected slot is consistent.
  2. cache    allocates a paged fp8 K cache (64-token pages, shuffled over the requests)
              for --prefix + --extend + decode tokens per request.
  3. prompt   prefills every request's --prefix tokens (skipped when all are 0).
  4. extend   a ragged prefill of --extend new tokens per request onto its cached prefix,
              chunked under the memory budget; each prefill runs twice: first call
              (compile or cache load) and steady-state time.
  5. decode   --decode-steps steps of --next-n new tokens per request.
  After steps 4 and 5, per request: how many keys were selected, the share from the cached
  prefix and from the last 64 positions, the lowest selected positions, and a consistency
  check (every selected slot belongs to the request and lies before the query).

compile cache: compiled programs are stored in --compile-cache (default: the directory in
$JAX_COMPILATION_CACHE_DIR, else ~/.cache/nsa_jax/jax-compile); a second run with the same
shapes loads them and compiles nothing. --no-compile-cache turns it off.

examples:
  {prog} demo --small
      a narrow layer: seconds on a CPU
  {prog} demo --model glm-5 --small --topk 512
      GLM-5's heads and rope, narrow projections, top-512
  {prog} demo --prefix 30000,0 --extend 2048,512 --next-n 2
      two requests (a 30000-token prompt extended by 2048, a new one of 512 tokens),
      then decode steps of two tokens each (speculative decoding)
  {prog} demo --checkpoint DIR --layer 3
      layer 3 of a DeepSeek-V3.2 checkpoint (DIR holds config.json and the shards)
"""


def _add_layer_args(p: argparse.ArgumentParser) -> None:
  """Which indexer layer the demo builds (see _build_layer: a new model source goes in both)."""
  g = p.add_argument_group("layer")
  g.add_argument("--model", default="deepseek-v3.2", choices=sorted(MODELS),
                 help="whose indexer shapes the random weights take (--checkpoint reads its "
                      "own config.json instead)")
  g.add_argument("--small", action="store_true",
                 help="a narrow layer (dim 512, q_lora_rank 256, top-256; the model's heads) "
                      "for quick runs and CI")
  g.add_argument("--checkpoint", metavar="DIR", default=None,
                 help="a checkpoint directory (DeepSeek-V3.2 or GLM-5: config.json and "
                      "safetensors shards) to load --layer from (default: random weights)")
  g.add_argument("--layer", type=int, default=0, help="decoder layer to load from --checkpoint")
  g.add_argument("--topk", type=int, default=None,
                 help="keys kept per query (default: the config's index_topk, 2048 for V3.2)")
  g.add_argument("--seed", type=int, default=0,
                 help="seed of the random weights, activations and page shuffle")


def _add_run_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("requests")
  g.add_argument("--prefix", default="2560,0,1024", metavar="N,N,...",
                 help="prompt tokens per request, prefilled first")
  g.add_argument("--extend", default="256,384,128", metavar="N,N,...",
                 help="new tokens per request in the second, ragged prefill")
  g.add_argument("--decode-steps", type=int, default=8, help="decode steps after the prefills")
  g.add_argument("--next-n", type=int, default=1, choices=(1, 2, 3, 4),
                 help="new tokens per request per decode step (2-4: speculative decoding)")
  g = p.add_argument_group("execution")
  g.add_argument("--backend", default="auto", choices=("auto", "pallas", "xla"),
                 help="kernels: auto = Pallas on a GPU, xla elsewhere; pallas needs a GPU")
  g.add_argument("--bucket", type=int, default=256,
                 help="pad token and key counts up to a multiple of this (0: a power of two)")
  g.add_argument("--budget-bytes", type=int, default=None,
                 help="prefill logits budget in bytes (default: measured once per device "
                      "and cached)")
  g.add_argument("--compile-cache", metavar="DIR", default=None,
                 help="persistent compilation cache directory (default: "
                      "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/nsa_jax/jax-compile)")
  g.add_argument("--no-compile-cache", action="store_true",
                 help="compile everything afresh, store nothing")
  g.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
  prog = prog or _prog()
  parser = _Parser(prog=prog, description=DESCRIPTION, formatter_class=_HelpFormatter,
                   epilog=f"run '{prog} demo --help' for the demo's flags and steps")
  sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", title="commands")
  d = sub.add_parser("demo", formatter_class=_HelpFormatter,
                     help="run a DeepSeek-V3.2 indexer layer: prompt prefill, ragged extend, "
                          "decode",
                     description="Runs one indexer layer (DeepSeek-V3.2's unless --model or "
                                 "--checkpoint says otherwise) the way an inference engine "
                                 "does and reports what it did.",
                     epilog=DEMO_STEPS.format(prog=prog))
  _add_layer_args(d)
  _add_run_args(d)
  parser.commands = {"demo": d}  # main reports a command's stray flags with its own --help
  return parser


# --------------------------------------------------------------------------- flag checks

def _ints(text: str, flag: str) -> list[int]:
  try:
    vals = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise CLIError(f"{flag} must be comma-separated ints >= 0, got {text!r}") from None
  if not vals or min(vals) < 0:
    raise CLIError(f"{flag} must be comma-separated ints >= 0, got {text!r}")
  return vals


def _at_least(args, name: str, low: int, *, none_ok: bool = False) -> None:
  v = getattr(args, name)
  if v is None and none_ok:
    return
  if v is None or v < low:
    raise CLIError(f"--{name.replace('_', '-')} must be an int >= {low}, got {v}")


def check_args(args) -> tuple[list[int], list[int]]:
  """Checks every flag that needs no device; returns (prefix, extend) lengths."""
  prefix, ext = _ints(args.prefix, "--prefix"), _ints(args.extend, "--extend")
  if len(prefix) != len(ext):
    raise CLIError(f"--prefix and --extend must name the same number of requests, got "
                   f"{len(prefix)} and {len(ext)}")
  if sum(ext) == 0:
    raise CLIError(f"--extend must give at least one request new tokens (the extend prefill "
                   f"needs a token), got {args.extend!r}")
  for name, low in (("decode_steps", 0), ("bucket", 0), ("seed", 0), ("layer", 0)):
    _at_least(args, name, low)
  _at_least(args, "topk", 1, none_ok=True)
  _at_least(args, "budget_bytes", 1, none_ok=True)
  if args.checkpoint is not None:
    if args.small:
      raise CLIError("--small and --checkpoint exclude each other (the checkpoint's config "
                     "gives the shapes)")
    if not os.path.isdir(args.checkpoint):
      raise CLIError(f"--checkpoint must be a checkpoint directory, but "
                     f"{args.checkpoint!r} " +
                     ("is a file" if os.path.exists(args.checkpoint) else "does not exist"))
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
      raise CLIError(f"--checkpoint {args.checkpoint!r} has no config.json (a checkpoint "
                     f"directory holds config.json and the safetensors shards)")
  elif args.layer:
    raise CLIError("--layer needs --checkpoint (random weights have one layer)")
  if args.compile_cache is not None and args.no_compile_cache:
    raise CLIError("--compile-cache and --no-compile-cache exclude each other")
  return prefix, ext


def _check_backend(backend: str) -> None:
  if backend == "pallas" and jax.default_backend() != "gpu":
    raise CLIError(f"--backend pallas needs a CUDA GPU (the Pallas GPU kernels), but jax runs on "
                   f"{jax.default_backend()}; use --backend auto or xla")


# --------------------------------------------------------------------------- sizes

def _round_up(n: int, bucket: int) -> int:
  """The padded size the demo asks the batch builder for (bucket 0: a power of two)."""
  if bucket:
    return max(bucket, -(-n // bucket) * bucket)
  return bucket_size(n)


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
    if n < 1024 or unit == "PiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return str(n)


def estimate_bytes(cfg, prefix, ext, *, decode_steps, next_n, bucket, budget_bytes):
  """(host bytes, device bytes) the demo needs at its largest step; a rough lower bound.

  Device: the paged cache, the weights, and the larger prefill's activations, per-token layer
  intermediates (q in bf16 and float32 while rope and Hadamard run, its fp8 copy), gathered
  keys, logits (bounded by the budget) with the top-k's workspace, and the output; or a
  decode step's logits if they are larger. Host: the
  random activations (drawn in float32), the cache's zeros, the slot map (two int64 per
  slot) and the copies of the outputs.
  """
  H, D, dim, ql, k = cfg.n_heads, cfg.head_dim, cfg.dim, cfg.q_lora_rank, cfg.topk
  caps = [p + e + decode_steps * next_n for p, e in zip(prefix, ext)]
  slots = sum(-(-c // PAGE_SIZE) for c in caps) * PAGE_SIZE
  cache = slots * (D + 4)
  weights = ql * H * D * 2 + dim * D * 2 + dim * H * 4
  rounds = [(sum(ext), sum(prefix) + sum(ext))]
  if sum(prefix):
    rounds.append((sum(prefix), sum(prefix)))
  dev_round = host_round = 0
  for T, S in rounds:
    T_pad, S_pad = _round_up(T, bucket), _round_up(S, bucket)
    logits = min(T_pad * S_pad * 4, budget_bytes)
    dev_round = max(dev_round, T_pad * (dim + ql) * 2 + T_pad * H * D * (2 + 4 + 1)
                    + T_pad * H * 8 + S_pad * (D + 4) * 2 + 2 * logits + T_pad * k * 8)
    host_round = max(host_round, T_pad * (dim + ql) * 6 + T_pad * k * 8 + (T_pad + S_pad) * 64)
  if decode_steps:  # a decode step's logits: [B_pad * next_n, pages_pad * 64] float32, twice
    pow2 = lambda n: 1 << max(n - 1, 0).bit_length()   # decode_inputs' default buckets
    pages = max(-(-c // PAGE_SIZE) for c in caps)
    dev_round = max(dev_round, 2 * pow2(len(caps)) * next_n * pow2(pages) * PAGE_SIZE * 4)
  return host_round + cache + slots * 16 + 2 * weights, dev_round + cache + weights


def _check_sizes(cfg, prefix, ext, args, budget_bytes: int, device) -> None:
  """Refuses, before allocating, what cannot fit the host's or the device's memory."""
  caps = [p + e + args.decode_steps * args.next_n for p, e in zip(prefix, ext)]
  slots = sum(-(-c // PAGE_SIZE) for c in caps) * PAGE_SIZE
  if slots > np.iinfo(np.int32).max:
    raise CLIError(f"--prefix/--extend/--decode-steps need {slots:,} cache slots, more than "
                   f"int32 slot ids address ({np.iinfo(np.int32).max:,})")
  host, dev = estimate_bytes(cfg, prefix, ext, decode_steps=args.decode_steps,
                             next_n=args.next_n, bucket=args.bucket, budget_bytes=budget_bytes)
  host_free = _budget._host_memory()[0]
  mem = _budget.query_device_memory(device)
  if mem is None:  # a CPU device: its arrays live in host memory too
    host, dev = host + dev, 0
  if host > host_free:
    raise CLIError(f"these requests need about {_fmt_bytes(host)} of host memory, more than "
                   f"the {_fmt_bytes(host_free)} available; use fewer tokens in --prefix/"
                   f"--extend, or --small")
  if mem is not None and dev > mem[0]:
    raise CLIError(f"these requests need about {_fmt_bytes(dev)} of memory on {device}, more "
                   f"than its {_fmt_bytes(mem[0])} free; use fewer tokens in --prefix/--extend, "
                   f"or --small")


# --------------------------------------------------------------------------- the layer

def random_indexer(cfg, seed: int):
  """An Indexer with random weights drawn on the host (numpy): nothing is compiled.

  Linear kernels are normal with variance 1/fan_in (nnx's lecun-normal scale, untruncated);
  the k LayerNorm is the identity (scale 1, bias 0), as nnx initializes it.
  """
  rng = np.random.default_rng(seed)
  act = np.dtype(cfg.act_dtype)

  def kernel(fan_in, fan_out, dtype):
    w = rng.standard_normal((fan_in, fan_out), np.float32) * np.float32(fan_in ** -0.5)
    return w.astype(dtype)

  H, D = cfg.n_heads, cfg.head_dim
  params = {"wq_b": {"kernel": kernel(cfg.q_lora_rank, H * D, act)},
            "wk": {"kernel": kernel(cfg.dim, D, act)},
            "k_norm": {"scale": np.ones(D, np.float32), "bias": np.zeros(D, np.float32)},
            "weights_proj": {"kernel": kernel(cfg.dim, H, np.float32)}}
  module = nnx.eval_shape(lambda: Indexer(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(module)
  nnx.replace_by_pure_dict(state, jax.device_put(params))
  nnx.update(module, state)
  return module


def _layer_config(args):
  """The config of the layer the flags name, read without loading weights."""
  overrides = {"topk": args.topk} if args.topk else {}
  if args.checkpoint:
    try:
      return IndexerConfig.from_hf_config(args.checkpoint, **overrides)
    except (ValueError, OSError) as e:
      raise CLIError(f"--checkpoint {args.checkpoint!r}: {e}", EXIT_FAILED) from None
  cfg = IndexerConfig.for_model(args.model)
  if args.small:
    cfg = cfg.replace(dim=SMALL_CONFIG.dim, q_lora_rank=SMALL_CONFIG.q_lora_rank,
                      topk=SMALL_CONFIG.topk)
  return cfg.replace(**overrides)


def _build_layer(args, cfg):
  """(module, a description of where its weights came from)."""
  if args.checkpoint:
    try:
      # config.json again, not cfg: load_indexer also checks that the layer has an indexer
      module = nsa_jax.load_indexer(args.checkpoint, args.layer,
                                    **({"topk": args.topk} if args.topk else {}))
    except (ValueError, OSError) as e:  # a bad checkpoint is the user's, not a bug
      raise CLIError(f"--checkpoint {args.checkpoint!r}: {e}", EXIT_FAILED) from None
    return module, f"checkpoint {args.checkpoint}, layer {args.layer}"
  return random_indexer(cfg, args.seed), (
      f"random weights ({args.model} shapes{', --small' if args.small else ''})")


# --------------------------------------------------------------------------- the demo

class _CompileCounter:
  """Counts XLA programs made from now on: compiled, or loaded from the persistent cache.

  jax reports one backend-compile duration per program whether it compiled it or loaded it
  (the event wraps the cache lookup); a load also reports a cache hit."""

  def __init__(self):
    self.programs = self.loaded = 0
    self.active = True
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    jax.monitoring.register_event_listener(self._on_event)

  def _on_duration(self, event, duration, **kwargs):
    if self.active and event == "/jax/core/compile/backend_compile_duration":
      self.programs += 1

  def _on_event(self, event, **kwargs):
    if self.active and event == "/jax/compilation_cache/cache_hits":
      self.loaded += 1

  @property
  def compiled(self) -> int:
    return self.programs - self.loaded


def _activations(rng, rows: int, cfg):
  """Random bf16 hidden states and q-lora activations (both RMS-normed in V3.2: unit scale),
  made on the host and copied over (a device-side cast would be one more compiled program)."""
  bf16 = ml_dtypes.bfloat16
  x = rng.standard_normal((rows, cfg.dim), np.float32).astype(bf16)
  qr = rng.standard_normal((rows, cfg.q_lora_rank), np.float32).astype(bf16)
  return jax.device_put(x), jax.device_put(qr)


def _zero_cache(num_pages: int, head_dim: int):
  """An all-zero IndexKCache built from host zeros (IndexKCache.create compiles two fills)."""
  return nsa_jax.IndexKCache(
      jax.device_put(np.zeros((num_pages, PAGE_SIZE, head_dim), ml_dtypes.float8_e4m3fn)),
      jax.device_put(np.zeros((num_pages, PAGE_SIZE), np.float32)))


def _kernel_note(backend: str) -> str:
  if backend == "xla":
    return "xla (reference backend)"
  if jax.default_backend() == "gpu":
    return "pallas (Pallas GPU kernels, xla where a kernel does not take the shape)"
  return "xla (no GPU: auto falls back to the xla backend)"


def _prefill_round(name, steps, cfg, rng, ext, pre, tables, cache, counter, log, *, bucket):
  """One ragged prefill through the jitted step; returns (slots, batch, cache, seconds).

  The same batch runs twice: the first call's time (compile or cache load included) is
  printed, the second (steady-state) time is returned."""
  T, S = sum(ext), sum(ext) + sum(pre)
  batch = nsa_jax.build_ragged_batch(
      ext, pre, token_buckets=(_round_up(T, bucket),) if bucket else None,
      key_buckets=(_round_up(S, bucket),) if bucket else None)
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
  c0, l0 = counter.compiled, counter.loaded
  t0 = time.perf_counter()
  slots, cache = steps.prefill(x, qr, inp, cache)
  slots = jax.block_until_ready(slots)
  t_first = time.perf_counter() - t0
  if counter.compiled > c0:
    tag = "new bucket: compiled"
  elif counter.loaded > l0:
    tag = "new bucket: loaded from the compile cache"
  else:
    tag = "bucket already compiled"
  # Same inputs again: rewrites the same keys into the same slots, so the cache is unchanged;
  # this is the steady-state time of a batch in an already compiled bucket.
  c1 = counter.programs
  t0 = time.perf_counter()
  slots2, cache = steps.prefill(x, qr, inp, cache)
  slots2 = jax.block_until_ready(slots2)
  t_steady = time.perf_counter() - t0
  if counter.programs != c1:
    raise CLIError("a second prefill call in the same bucket compiled (a bug: please report)",
                   EXIT_FAILED)
  slots, slots2 = np.asarray(slots), np.asarray(slots2)
  if not np.array_equal(slots, slots2):
    raise CLIError("the same prefill gave two different selections (a bug: please report)",
                   EXIT_FAILED)
  tflops = 2 * valid * cfg.n_heads * cfg.head_dim / t_steady / 1e12
  log(f"  first call {t_first * 1e3:9.1f} ms ({tag}); "
      f"steady {t_steady * 1e3:9.1f} ms = {batch.num_tokens / t_steady:,.0f} tokens/s, "
      f"{tflops:.3f} useful TFLOP/s over {valid:,} valid (query, key) pairs")
  return slots, batch, cache, t_steady


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
    ok = (bool(((req_of[sel] == b) & (pos_of[sel] < ctx)).all())
          and len(set(sel.tolist())) == len(sel))
    pos = np.sort(pos_of[sel])
    in_prefix = float((pos < pre).mean()) if len(pos) else 0.0
    recent = float((pos >= ctx - 64).mean()) if len(pos) else 0.0
    log(f"  request {b}: {len(sel):5d} of {ctx:6d} keys (cap {topk}); {in_prefix:5.1%} from the "
        f"cached prefix, {recent:5.1%} in the last 64; lowest selected positions "
        f"{pos[:6].tolist()}; slots {'consistent' if ok else 'INCONSISTENT'}")
    if not ok:
      raise CLIError(f"request {b}'s selected slots do not belong to it (a bug: please report)",
                     EXIT_FAILED)


@dataclasses.dataclass(frozen=True)
class Preflight:
  """What the flags ask for, checked before anything is allocated or compiled."""

  prefix: list[int]
  ext: list[int]
  config: IndexerConfig
  device: jax.Device
  budget_bytes: int


def preflight(args) -> Preflight:
  """Every check of the flags, the layer's config and the sizes against host and device
  memory; allocates nothing, compiles nothing. Raises CLIError."""
  prefix, ext = check_args(args)
  _check_backend(args.backend)
  cfg = _layer_config(args)
  device = jax.devices()[0]
  budget = args.budget_bytes or _budget.prime(device)
  _check_sizes(cfg, prefix, ext, args, budget, device)
  return Preflight(prefix, ext, cfg, device, budget)


def demo(args, log=print, checked: Preflight | None = None) -> dict:
  """Runs the demo; returns a dict of the measured figures (tests read it).

  Args:
    args: the parsed ``demo`` flags (``build_parser().parse_args(["demo", ...])``).
    log: where the report's lines go.
    checked: :func:`preflight`'s result, if already made.

  Raises:
    CLIError: a bad flag (code 2) or a failed run (code 1).
  """
  t_start = time.perf_counter()
  checked = checked or preflight(args)
  prefix, ext, cfg, device = checked.prefix, checked.ext, checked.config, checked.device
  counter = _CompileCounter()
  module, source = _build_layer(args, cfg)
  B, n = len(ext), args.next_n

  log(f"nsa_jax {nsa_jax.__version__} | jax {jax.__version__} | {device.device_kind}"
      f" | backend={args.backend}: {_kernel_note(args.backend)}")
  log(f"indexer layer: {source}: dim {cfg.dim}, q_lora_rank {cfg.q_lora_rank}, H {cfg.n_heads},"
      f" D {cfg.head_dim}, top-{cfg.topk}, scale_fmt {cfg.scale_fmt}, hadamard "
      f"{cfg.use_hadamard}, rope {'interleaved' if cfg.rope_interleave else 'NeoX'} "
      f"theta {cfg.rope_theta:g} YaRN x{cfg.rope_factor:g}")
  if not args.checkpoint:
    log("  (random weights: which keys get selected means nothing; the run shows shapes, "
        "compiles, timings and consistency)")
  steps = IndexerSteps(module, backend=args.backend, budget_bytes=args.budget_bytes)
  log(f"memory budget for prefill logits: {_fmt_bytes(steps.budget_bytes)} "
      f"({'from --budget-bytes' if args.budget_bytes else f'measured once on {device} and cached'}"
      f"; chunking skipped below {nsa_jax.budget.SKIP_CHUNK_ELEMENTS:,} logits)")
  cache_dir = jax.config.jax_compilation_cache_dir
  on = cache_dir and jax.config.jax_enable_compilation_cache
  log(f"compile cache: {cache_dir if on else 'off'}")

  capacity = [p + e + args.decode_steps * n for p, e in zip(prefix, ext)]
  tables, num_pages = allocate_block_tables(capacity, seed=args.seed)
  cache = _zero_cache(num_pages, cfg.head_dim)
  log(f"paged K cache: {num_pages} pages x {PAGE_SIZE} tokens "
      f"({_fmt_bytes(num_pages * PAGE_SIZE * (cfg.head_dim + 4))}), pages shuffled across "
      f"requests")
  owner = _slot_owner(tables, num_pages)
  rng = np.random.default_rng(args.seed)
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
    log(f"\n[decode] {args.decode_steps} steps, {n} new token{'s' * (n > 1)} per request "
        f"per step")
    d0 = counter.programs
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
        f"{pages_pad * PAGE_SIZE}); {counter.programs - d0} program(s) compiled or loaded "
        f"over {args.decode_steps} steps")
    log(f"  first step {times[0] * 1e3:9.1f} ms; steady {steady * 1e3:9.2f} ms per step "
        f"({B * n / steady:,.0f} tokens/s)")
    dec_slots = np.asarray(dec_slots)
    _summarize(log, "selected keys of each request's newest token (decode):",
               [dec_slots[b * n + n - 1] for b in range(B)], range(B), ctx, prefix, owner,
               cfg.topk)

  counter.active = False
  sizes = steps.cache_sizes()
  out.update(compiled=counter.compiled, loaded=counter.loaded, programs=sizes,
             wall_s=time.perf_counter() - t_start, prefill_slots=slots, decode_slots=dec_slots)
  log(f"\nprograms: {counter.compiled} compiled, {counter.loaded} loaded from the compile "
      f"cache (prefill step: {sizes['prefill']} bucket{'s' * (sizes['prefill'] != 1)}, decode "
      f"step: {sizes['decode']}); wall time {out['wall_s']:.1f} s after imports")
  return out


# --------------------------------------------------------------------------- entry point

def _setup_compile_cache(args) -> None:
  if args.no_compile_cache:
    jax.config.update("jax_enable_compilation_cache", False)
    return
  try:
    enable_compile_cache(args.compile_cache)
  except ValueError as e:
    if args.compile_cache is not None:
      raise CLIError(f"--compile-cache: {e}") from None
    print(f"{args.prog}: warning: no compile cache ({e})", file=sys.stderr)


def main(argv=None) -> int:
  """The ``nsa-jax`` console script; returns the exit status (0 ok, 1 failed run, 2 bad flag)."""
  parser = build_parser()
  args, stray = parser.parse_known_args(argv)
  if stray:
    parser.commands.get(args.cmd, parser).error(f"unrecognized arguments: {' '.join(stray)}")
  if args.cmd is None:
    parser.print_help(sys.stderr)
    print(f"\n{parser.prog}: error: name a command, e.g. '{parser.prog} demo --small'",
          file=sys.stderr)
    return EXIT_USAGE
  args.prog = f"{parser.prog} {args.cmd}"
  try:
    checked = preflight(args)  # every flag error before a cache is touched or memory taken
    _setup_compile_cache(args)
    demo(args, checked=checked)
  except CLIError as e:
    print(f"{args.prog}: error: {e}", file=sys.stderr)
    return e.code
  except KeyboardInterrupt:
    print(f"{args.prog}: interrupted", file=sys.stderr)
    return 130
  except MemoryError:
    print(f"{args.prog}: error: out of host memory; use fewer tokens", file=sys.stderr)
    return EXIT_FAILED
  except Exception as e:  # the device running out of memory is a size problem, not a bug
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    print(f"{args.prog}: error: out of device memory ({str(e).splitlines()[0][:200]}); use "
          f"fewer tokens or --budget-bytes", file=sys.stderr)
    return EXIT_FAILED
  return 0


if __name__ == "__main__":
  sys.exit(main())
