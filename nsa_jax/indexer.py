"""The lightning indexer as a Flax NNX layer: projections, rope, fp8, paged cache, top-k.

One layer, as DeepSeek-V3.2's ``inference/model.py`` ``Indexer`` (docs/contract.md, "The
forward of one layer"); GLM-5's is the same layer with other sizes and interleaved rope
(docs/models.md). Its :class:`~nsa_jax.config.IndexerConfig` lives in ``nsa_jax.config``.

    q = wq_b(qr).reshape(T, H, D)             k = LayerNorm(wk(x))            (f32 norm, eps 1e-6)
    q, k = rope(q, k)                         first 64 dims: NeoX (V3.2) or interleaved (GLM-5)
    q, k = hadamard(q), hadamard(k)           optional; exact logits are unchanged
    q_fp8, q_scale = act_quant(q)             k_fp8, k_scale = act_quant(k)   -> K into the cache
    w = weights_proj(x).f32 * H**-0.5 * q_scale * D**-0.5
    top-k of k_scale[j] * sum_h w[i, h] * relu(q_fp8[i, h] . k_fp8[j]) over each query's keys

Two entry points, both pure functions of (module, inputs, cache) -> (indices, new cache):
- :meth:`Indexer.prefill`: a ragged batch (``nsa_jax.build_ragged_batch``); the new keys are
  written into the paged cache, every request's keys (cached prefix + new) are gathered into
  the packed key axis, and ``prefill_topk`` selects under the cached memory budget.
- :meth:`Indexer.decode`: ``next_n`` (1..4) new tokens per request; keys written, then the
  paged logits over each request's context and its top-k.

Everything that looks at values (lengths, block tables) happens on the host, in
:func:`prefill_inputs` / :func:`decode_inputs`, which turn them into bucket-padded int32 arrays;
inside jit only shapes matter, so :class:`IndexerSteps` compiles once per bucket.

Output formats (``output=``), all int32 [rows, topk], -1 padded:
- ``"slots"``: physical cache slots ``block_tables[b, p // 64] * 64 + p % 64`` (what sparse
  attention reads; sglang's ``page_table_1`` ids).
- ``"positions"``: token positions within the request.
- ``"keys"``: indices into the key axis the logits were computed over: the packed key axis for
  prefill (``ks``-relative offsets plus ``ks``), the request's own positions for decode.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax import ops
from nsa_jax.cache import IndexKCache, table_slots
from nsa_jax.config import IndexerConfig
from nsa_jax.hadamard import hadamard_rotate
from nsa_jax.prefill import prefill_topk
from nsa_jax.quant import act_quant
from nsa_jax.reference import PAGE_SIZE
from nsa_jax.rope import apply_rope
from nsa_jax.topk_slots import decode_key_range, paged_topk_slots_unchecked
from nsa_jax.validation import describe, expect, host_array, static_int

OUTPUTS = ("slots", "positions", "keys")
_I32 = jnp.int32
_F32 = jnp.float32


# --------------------------------------------------------------------------- host-side inputs

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillInputs:
  """Device-side description of a ragged prefill (all int32, bucket-padded; a pytree).

  Attributes:
    positions: [T_pad] position of each new token within its request (rope); 0 for padding.
    ks, ke: [T_pad] half-open key range in the packed key axis; [0, 0) for padding.
    token_slots: [T_pad] cache slot each new token's key is written to; -1 for padding.
    key_slots: [S_pad] cache slot of each packed key (prefix and new); -1 for padding.
    key_positions: [S_pad] position of each packed key within its request; -1 for padding.
  """

  positions: Any
  ks: Any
  ke: Any
  token_slots: Any
  key_slots: Any
  key_positions: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeInputs:
  """Device-side description of a decode step (int32, bucket-padded; a pytree).

  Attributes:
    context_lens: [B_pad] tokens of each request including this step's next_n new ones;
      0 for padding requests.
    block_tables: [B_pad, max_pages] page ids, -1 past each request's pages. The logits
      width is ``max_pages * 64``.
  """

  context_lens: Any
  block_tables: Any


def _pow2_bucket(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _bucket(n: int, buckets, name: str, fn: str) -> int:
  if buckets is None:
    return _pow2_bucket(n)
  for b in sorted(buckets):
    if b >= n:
      return int(b)
  raise ValueError(f"{fn}: {name}={n} exceeds the largest bucket {max(buckets)}; add a "
                   f"bucket >= {n}")


def _check_tables(block_tables, lens, fn: str, num_pages: int | None) -> np.ndarray:
  """int32 block tables [B, max_pages] covering ``lens`` tokens per request, or ValueError."""
  tables = host_array(fn, "block_tables", block_tables)
  lens = np.asarray(lens, np.int64)
  if tables.ndim != 2 or not np.issubdtype(tables.dtype, np.integer):
    raise ValueError(f"{fn}: block_tables must be an int array [B, max_pages], got "
                     f"{tables.dtype}{list(tables.shape)}")
  if tables.shape[0] != lens.shape[0]:
    raise ValueError(f"{fn}: block_tables must have one row per request ({lens.shape[0]}), got "
                     f"{list(tables.shape)}")
  need = -(-lens // PAGE_SIZE)
  if need.size and need.max() > tables.shape[1]:
    b = int(np.argmax(need))
    raise ValueError(f"{fn}: block_tables has {tables.shape[1]} pages per row, but request {b} "
                     f"needs {int(need[b])} for {int(lens[b])} tokens")
  for b, n in enumerate(need):
    row = tables[b, :n]
    bad = (row < 0) if num_pages is None else ((row < 0) | (row >= num_pages))
    if bad.any():
      raise ValueError(f"{fn}: block_tables[{b}] must name pages in [0, "
                       f"{'num_pages' if num_pages is None else num_pages}) for its first {n} "
                       f"pages, got {row[:8].tolist()}{'...' if n > 8 else ''}")
  return tables.astype(np.int32)


def _slots(tables: np.ndarray, req: np.ndarray, pos: np.ndarray) -> np.ndarray:
  ok = req >= 0
  r, p = np.where(ok, req, 0), np.where(ok, pos, 0)
  return np.where(ok, tables[r, p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE, -1).astype(np.int32)


def prefill_inputs(batch, block_tables, *, num_pages: int | None = None) -> PrefillInputs:
  """Host side: a :class:`~nsa_jax.RaggedBatch` and block tables -> :class:`PrefillInputs`.

  Args:
    batch: ``nsa_jax.build_ragged_batch(extend_lens, prefix_lens, ...)``.
    block_tables: ints [B, max_pages]; request b's token p lives at cache slot
      ``block_tables[b, p // 64] * 64 + p % 64``. Must cover prefix + extend tokens.
    num_pages: the cache's page count, to check page ids against (optional).

  Returns:
    :class:`PrefillInputs` of numpy int32 arrays (shapes [T_pad] and [S_pad] only, so jit
    recompiles only when the batch's buckets change).
  """
  fn = "prefill_inputs"
  from nsa_jax.batch import RaggedBatch
  if not isinstance(batch, RaggedBatch):
    raise ValueError(f"{fn}: batch must be a RaggedBatch (nsa_jax.build_ragged_batch), got "
                     f"{type(batch).__name__}")
  num_pages = static_int(fn, "num_pages", num_pages, 1, none_ok=True)
  lens = np.zeros(batch.num_requests, np.int64)
  real = batch.key_request >= 0
  np.add.at(lens, batch.key_request[real], 1)
  tables = _check_tables(block_tables, lens, fn, num_pages)
  return PrefillInputs(
      positions=batch.positions.astype(np.int32), ks=batch.ks.astype(np.int32),
      ke=batch.ke.astype(np.int32),
      token_slots=_slots(tables, batch.token_request, batch.positions),
      key_slots=_slots(tables, batch.key_request, batch.key_positions),
      key_positions=np.where(real, batch.key_positions, -1).astype(np.int32))


def decode_inputs(context_lens, block_tables, *, batch_buckets: Sequence[int] | None = None,
                  page_buckets: Sequence[int] | None = None,
                  num_pages: int | None = None) -> DecodeInputs:
  """Host side: context lengths and block tables -> bucket-padded :class:`DecodeInputs`.

  Args:
    context_lens: ints [B] >= 0, each request's length *including* this step's new tokens.
    block_tables: ints [B, max_pages] covering those lengths.
    batch_buckets, page_buckets: ladders for B_pad and the table width (None: powers of two).
      The logits width is ``pages_pad * 64``.
    num_pages: the cache's page count, to check page ids against (optional).

  Returns:
    :class:`DecodeInputs` of numpy int32 arrays; padding requests have length 0 and -1 pages.
  """
  fn = "decode_inputs"
  ctx = host_array(fn, "context_lens", context_lens)
  num_pages = static_int(fn, "num_pages", num_pages, 1, none_ok=True)
  if ctx.ndim != 1 or (ctx.size and not np.issubdtype(ctx.dtype, np.integer)):
    raise ValueError(f"{fn}: context_lens must be a 1-D int sequence, got {ctx.dtype}"
                     f"{list(ctx.shape)}")
  if (ctx < 0).any():
    raise ValueError(f"{fn}: context_lens must be >= 0, got {ctx.tolist()}")
  tables = _check_tables(block_tables, ctx, fn, num_pages)
  B, P = tables.shape
  need = int((-(-ctx.astype(np.int64) // PAGE_SIZE)).max(initial=1))
  B_pad = _bucket(max(B, 1), batch_buckets, "number of requests", fn)
  P_pad = _bucket(max(need, 1), page_buckets, "pages per request", fn)
  out_t = np.full((B_pad, P_pad), -1, np.int32)
  keep = min(P, P_pad)
  out_t[:B, :keep] = tables[:, :keep]
  out_c = np.zeros(B_pad, np.int32)
  out_c[:B] = ctx
  return DecodeInputs(context_lens=out_c, block_tables=out_t)


def allocate_block_tables(capacities, *, seed: int | None = None, extra_pages: int = 0):
  """A simple page allocator for demos and tests: every request gets its own pages.

  Args:
    capacities: ints [B], tokens each request may grow to.
    seed: None for pages in order, else an int seeding a shuffle (pages scattered over the
      cache as a real allocator leaves them).
    extra_pages: unused pages appended to the cache.

  Returns:
    (int32 [B, max_pages] block tables with -1 past each request's pages, num_pages int).
  """
  fn = "allocate_block_tables"
  caps = host_array(fn, "capacities", capacities)
  if (caps.ndim != 1 or (caps.size and not np.issubdtype(caps.dtype, np.integer)) or
      (caps < 0).any()):
    raise ValueError(f"{fn}: capacities must be a 1-D sequence of ints >= 0, got "
                     f"{describe(capacities)}")
  caps = caps.astype(np.int64)
  seed = static_int(fn, "seed", seed, 0, none_ok=True)
  extra_pages = static_int(fn, "extra_pages", extra_pages, 0)
  pages = -(-caps // PAGE_SIZE)
  num_pages = int(pages.sum()) + int(extra_pages)
  order = np.arange(num_pages)
  if seed is not None:
    order = np.random.default_rng(seed).permutation(num_pages)
  tables = np.full((len(caps), max(int(pages.max(initial=0)), 1)), -1, np.int32)
  start = 0
  for b, n in enumerate(pages):
    tables[b, :n] = order[start:start + n]
    start += n
  return tables, max(num_pages, 1)


# --------------------------------------------------------------------------- the layer

class Indexer(nnx.Module):
  """The lightning indexer (one layer, any supported model: docs/models.md) as an NNX module.

  Parameters (torch names in the checkpoint; ``nnx.Linear`` kernels are [in, out]):
    wq_b: Linear(q_lora_rank -> H * D), no bias, ``config.dtype``.
    wk: Linear(dim -> D), no bias, ``config.dtype``.
    k_norm: LayerNorm(D) with bias, float32 params and math.
    weights_proj: Linear(dim -> H), no bias, float32 (V3.2 keeps it in fp32 and feeds it
      ``x.float()``; the checkpoint's bf16 values convert exactly).
  """

  def __init__(self, config: IndexerConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, IndexerConfig):
      raise ValueError(f"Indexer: config must be an IndexerConfig, got {type(config).__name__}")
    c = config
    self.config = c
    act = c.act_dtype
    self.wq_b = nnx.Linear(c.q_lora_rank, c.n_heads * c.head_dim, use_bias=False, dtype=act,
                           param_dtype=act, rngs=rngs)
    self.wk = nnx.Linear(c.dim, c.head_dim, use_bias=False, dtype=act, param_dtype=act,
                         rngs=rngs)
    self.k_norm = nnx.LayerNorm(c.head_dim, epsilon=c.norm_eps, dtype=_F32, param_dtype=_F32,
                                use_fast_variance=False, rngs=rngs)
    # HIGHEST: on GPU the default f32 matmul may run in TF32, which V3.2's fp32 weights_proj
    # does not; the head weights scale every logit.
    self.weights_proj = nnx.Linear(c.dim, c.n_heads, use_bias=False, dtype=_F32,
                                   param_dtype=_F32, precision=jax.lax.Precision.HIGHEST,
                                   rngs=rngs)

  # ------------------------------------------------------------------ projections

  def project(self, x: jax.Array, qr: jax.Array, positions: jax.Array):
    """The per-token part of the forward: projections, rope, Hadamard, fp8, head weights.

    Args:
      x: float [T, dim] hidden states (cast to ``config.dtype``).
      qr: float [T, q_lora_rank] query low-rank activations.
      positions: int32 [T] position of each token within its request.

    Returns:
      ``(q_fp8 float8_e4m3fn [T, H, D], k_fp8 float8_e4m3fn [T, D], k_scale float32 [T],
      weights float32 [T, H])`` with the q scales and the softmax scale folded into weights.
    """
    c = self.config
    fn = "Indexer.project"
    T = x.shape[0] if hasattr(x, "shape") and x.ndim else None
    expect("x", x, (T, c.dim), (jnp.bfloat16, jnp.float32, jnp.float16), fn)
    expect("qr", qr, (T, c.q_lora_rank), (jnp.bfloat16, jnp.float32, jnp.float16), fn)
    expect("positions", positions, (T,), _I32, fn)
    H, D, act = c.n_heads, c.head_dim, c.act_dtype
    q = self.wq_b(qr.astype(act)).reshape(T, H, D)
    # V3.2: F.layer_norm(x.float(), ...).type_as(x): normalize in f32, continue in bf16.
    k = self.k_norm(self.wk(x.astype(act)).astype(_F32)).astype(act)
    q = apply_rope(q, positions, c.rope)
    k = apply_rope(k, positions, c.rope)
    if c.use_hadamard:
      q, k = hadamard_rotate(q), hadamard_rotate(k)
    # One block per head (D elements), so one q scale per (token, head): it folds into w.
    q_fp8, q_scale = act_quant(q, D, c.scale_fmt)
    k_fp8, k_scale = act_quant(k, D, c.scale_fmt)
    w = self.weights_proj(x.astype(_F32)) * H ** -0.5
    w = w * q_scale[..., 0] * D ** -0.5
    return q_fp8, k_fp8, k_scale[:, 0], w

  # ------------------------------------------------------------------ prefill

  def prefill(self, x: jax.Array, qr: jax.Array, inputs: PrefillInputs, cache: IndexKCache, *,
              output: str = "slots", backend: str = "auto", interpret: bool = False,
              budget_bytes: int | None = None):
    """Ragged prefill: writes the new keys into ``cache`` and selects each token's top-k.

    Args:
      x: float [T_pad, dim] hidden states of the new tokens, packed request after request
        (rows past ``batch.num_tokens`` are padding and ignored).
      qr: float [T_pad, q_lora_rank].
      inputs: :class:`PrefillInputs` from :func:`prefill_inputs` (its [T_pad] / [S_pad]).
      cache: :class:`IndexKCache` holding every request's prefix keys; D = head_dim.
      output: "slots" | "positions" | "keys" (module docstring).
      backend, interpret: for ``mqa_logits`` / ``topk_indices`` (via ``prefill_topk``).
      budget_bytes: overrides the cached logits budget (a Python int), else the cached one.

    Returns:
      ``(int32 [T_pad, topk] indices, -1 padded; the new IndexKCache)``.
    """
    fn = "Indexer.prefill"
    self._check_output(output, fn)
    _check_cache(cache, self.config.head_dim, fn)
    if not isinstance(inputs, PrefillInputs):
      raise ValueError(f"{fn}: inputs must be PrefillInputs (nsa_jax.indexer.prefill_inputs), "
                       f"got {type(inputs).__name__}")
    T = x.shape[0]
    for name in ("positions", "ks", "ke", "token_slots"):
      expect(f"inputs.{name}", getattr(inputs, name), (T,), _I32, fn)
    S = inputs.key_slots.shape[0] if hasattr(inputs.key_slots, "shape") else None
    expect("inputs.key_slots", inputs.key_slots, (S,), _I32, fn)
    expect("inputs.key_positions", inputs.key_positions, (S,), _I32, fn)
    q8, k8, ksc, w = self.project(x, qr, inputs.positions)
    cache = cache.write(inputs.token_slots, k8, ksc)
    # The packed key axis (prefix + new per request) is read back from the cache after the
    # write, so a cached prefix and the new keys come from one place. [S_pad, D]: small.
    flat = jnp.maximum(inputs.key_slots, 0)
    keys8 = cache.k_fp8.reshape(-1, cache.head_dim)[flat]
    keysc = cache.k_scale.reshape(-1)[flat]
    idx = prefill_topk(q8, keys8, keysc, w, inputs.ks, inputs.ke, k=self.config.topk,
                       backend=backend, interpret=interpret, budget_bytes=budget_bytes)
    if output == "keys":
      return idx, cache
    table = inputs.key_slots if output == "slots" else inputs.key_positions
    return jnp.where(idx >= 0, table[jnp.maximum(idx, 0)], -1), cache

  # ------------------------------------------------------------------ decode

  def decode(self, x: jax.Array, qr: jax.Array, inputs: DecodeInputs, cache: IndexKCache, *,
             output: str = "slots", backend: str = "auto", interpret: bool = False):
    """Decode step: ``next_n`` new tokens per request (1, or up to 4 with speculative
    decoding; 1..4 is ``ops.MAX_NEXT_N``, the tested range).

    Args:
      x: float [B_pad * next_n, dim], request-major (row b * next_n + t is token t of b).
      qr: float [B_pad * next_n, q_lora_rank].
      inputs: :class:`DecodeInputs` from :func:`decode_inputs`; ``context_lens`` include the
        new tokens, which sit at positions ``context_lens[b] - next_n + t``.
      cache: :class:`IndexKCache` holding each request's earlier keys.
      output: "slots" | "positions" | "keys" ("keys" = "positions" here).
      backend, interpret: for ``paged_mqa_logits`` and ``topk_indices``.

    Returns:
      ``(int32 [B_pad * next_n, topk] indices, -1 padded; the new IndexKCache)``. Query t of
      request b sees positions ``p < context_lens[b]`` with ``p <= context_lens[b] - next_n + t``.
      B_pad = 0 (with x of 0 rows) gives int32 [0, topk] and the cache unchanged.
    """
    fn = "Indexer.decode"
    self._check_output(output, fn)
    _check_cache(cache, self.config.head_dim, fn)
    if not isinstance(inputs, DecodeInputs):
      raise ValueError(f"{fn}: inputs must be DecodeInputs (nsa_jax.indexer.decode_inputs), "
                       f"got {type(inputs).__name__}")
    B = inputs.context_lens.shape[0]
    expect("inputs.context_lens", inputs.context_lens, (B,), _I32, fn)
    expect("inputs.block_tables", inputs.block_tables, (B, None), _I32, fn)
    rows = x.shape[0] if hasattr(x, "shape") and x.ndim else None
    if B == 0 and rows == 0:  # an empty batch: nothing to write, nothing to select
      return jnp.zeros((0, self.config.topk), _I32), cache
    if rows is None or B == 0 or rows % B or rows == 0:
      raise ValueError(f"{fn}: x must have B_pad * next_n rows with B_pad={B} (from "
                       f"inputs.context_lens), got {describe(x)}")
    n, c = rows // B, self.config
    ops.check_next_n(fn, f"x of {rows} rows for B_pad={B} (from inputs.context_lens)", n)
    ctx, tables = inputs.context_lens, inputs.block_tables
    max_pages = tables.shape[1]
    L = max_pages * PAGE_SIZE
    pos = (ctx[:, None] - n + jnp.arange(n, dtype=_I32)[None, :]).reshape(-1)      # [B * n]
    q8, k8, ksc, w = self.project(x, qr, jnp.maximum(pos, 0))
    slots = table_slots(jnp.repeat(tables, n, axis=0), pos, cache.num_pages)
    cache = cache.write(slots, k8, ksc)
    logits = ops.paged_mqa_logits(q8.reshape(B, n, c.n_heads, c.head_dim), cache, w, ctx,
                                  tables, max_context_len=L, backend=backend,
                                  interpret=interpret)
    if output == "slots":
      return paged_topk_slots_unchecked(logits, ctx, tables, next_n=n, k=c.topk,
                                        num_pages=cache.num_pages, backend=backend,
                                        interpret=interpret), cache
    ke = decode_key_range(ctx, n, L)
    idx = ops.topk_indices(logits, jnp.zeros_like(ke), ke, k=c.topk, backend=backend,
                           interpret=interpret)
    return idx, cache

  @staticmethod
  def _check_output(output, fn):
    if output not in OUTPUTS:
      raise ValueError(f"{fn}: output must be one of {OUTPUTS}, got {output!r}")


def _check_cache(cache, D, fn):
  if not isinstance(cache, IndexKCache):
    raise ValueError(f"{fn}: cache must be an IndexKCache, got {type(cache).__name__}")
  if cache.head_dim != D or cache.page_size != PAGE_SIZE:
    raise ValueError(f"{fn}: cache must hold pages of {PAGE_SIZE} tokens of head_dim {D}, got "
                     f"k_fp8 {list(cache.k_fp8.shape)}")


# IndexerSteps (the jitted steps) lives in nsa_jax/steps.py, one floor above the layer; the
# name stays importable from here.
def __getattr__(name):
  if name == "IndexerSteps":
    from nsa_jax.steps import IndexerSteps
    return IndexerSteps
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DecodeInputs", "Indexer", "IndexerConfig", "IndexerSteps", "OUTPUTS",
           "PrefillInputs", "allocate_block_tables", "decode_inputs", "prefill_inputs"]
