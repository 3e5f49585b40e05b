"""Pallas Mosaic GPU kernel: paged-decode MQA logits over an fp8 paged index-K cache.

``out[b * n + t, p] = k_scale[page, o] * sum_h w[b * n + t, h] * relu(q[b, t, h] . k[page, o])``
with ``page = block_tables[b, p // 64]``, ``o = p % 64``, for every token ``p`` that query ``t``
of request ``b`` may see (``p <= context_lens[b] - n + t``); -inf elsewhere when clean.

Design (Hopper, Mosaic GPU through ``plgpu.kernel``; chosen over Pallas-Triton because it
exposes what a streaming kernel needs directly: TMA page copies into an SMEM ring, mbarriers,
fp8 wgmma with a register epilogue; it also runs in the Mosaic GPU interpreter on CPU and
cross-lowers to CUDA without a GPU, so CPU CI checks both values and hardware legality):

- The op is memory bound: each cached token costs 132 bytes (128 fp8 key bytes and a float32
  scale) and only ``2 * n * H * D`` FLOPs, so the kernel is a streaming loop over pages.
- Persistent grid with equal page segments (DeepGEMM's schedule): the pages that hold context,
  request after request, form one list of ``P = sum_b ceil(ctx_b / 64)`` items; CTA ``c`` of
  ``G = ctas_per_sm * SMs`` takes the ``c``-th of ``G`` equal, contiguous segments (never
  shorter than ``min_pages_per_cta``), so one long context and many short ones both spread
  evenly over the SMs, and the TMA ring runs across request boundaries instead of draining
  and refilling for every CTA. The schedule (segment starts as (request, page), and per
  request its page count and the next non-empty request) is a few tiny XLA ops in the
  wrapper on ``context_lens``: nothing syncs with the host, and in a jitted model with several
  layers XLA computes it once for all of them.
- Measured first (v1, H100, B=64 x 64K): a grid of (request, 16-page split) CTAs reached 64-69%
  of the copy bandwidth; each CTA paid a chain of dependent loads (context length, page ids,
  first page) before streaming, and copying the split's block-table slice to SMEM first made
  it slower (+7%): the per-CTA start-up latency, not the loop, was the cost.
- Per CTA, one warpgroup: one TMA brings the per-request schedule rows into SMEM; then keep
  ``num_stages`` pages (8 KiB of keys plus 256 B of scales each) in flight in an SMEM ring
  guarded by one mbarrier per slot. The page id of the item ``num_stages`` ahead is read from
  the block table at the top of the iteration that refills its slot (its latency hides behind
  the wait and the math); the (request, page, valid) of the items in flight ride in the loop
  carry. When the item under computation starts a new request, its queries and head weights
  are loaded (one short wait per request boundary, while the ring stays full).
- Math per page: one fp8 wgmma with M = 64 (the page's tokens), N = n * H (the query rows),
  K = D = 128, float32 accumulate. Then in registers: relu, times the head weight (a per
  column vector), a sum over each query's H columns (a row reduction within a warp), times
  the token's scale, the validity mask, and a TMA store of the ``[n, 64]`` tile into the
  logits (two output slots so that a store overlaps the next page).
- With ``clean_logits`` the whole pages past each context (a second list, split the same way)
  get -inf by TMA stores from a constant tile, issued while the first pages load.
- Bad values never read out of bounds: a page id outside ``[0, num_pages)`` or a page past the
  block table's width is clamped for the load and its tokens are -inf; tokens past the
  context are -inf and their pages are never loaded.
- The output width is padded to whole pages (a multiple of 64 floats) when needed and sliced
  back, so that no page store ever crosses the end of a row. Measured on the H100: with only
  16-byte padding, a one-row (next_n = 1) TMA store of the last, partial page was not clipped
  at the row end and wrote its tail into the first columns of the next request's row (and,
  for the last request, past the array); two-row boxes were clipped. The slice costs one
  copy of the logits (4 bytes per token and query against 132 read) only when
  max_context_len % 64 != 0.

What the CUDA cross-lowering on a CPU-only jax 0.11.2 accepts (checked by the tests; it runs
layout inference and the wgmma/TMA checks but not ptxas, so registers and the SMEM limit only
show on a GPU): fp8 wgmma needs both operands K-major (keys ``[64, D]`` as A, queries
``[n*H, D]`` passed as ``q_smem.T``); a splat store into SMEM needs a multiple of 128
elements (hence the 2-row -inf tile for n = 1); an iota that nothing used (clean_logits=False)
left layout inference without a solution (it is built only where the mask needs it).

Supported: ``next_n`` in {1, 2}, ``H`` in {16, 32, 64, 128} with ``next_n * H <= 128``
(the wgmma N side, one float32 accumulator of at most 64 registers per thread), ``D == 128``
(one 128-byte swizzled row per token). Batches above ``MAX_BATCH`` requests (the schedule
rows live in SMEM) run as several launches. ``interpret=True`` runs the same kernel in the
Mosaic GPU interpreter (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

PAGE = 64
MAX_BATCH = 2048   # requests per launch: 4 schedule rows of int32 each, 32 KiB of SMEM
_F32 = jnp.float32
_I32 = jnp.int32
_FP8 = jnp.float8_e4m3fn
# fp8 rows of 128 bytes: 128-byte swizzle, tiles of (8 rows, 128 elements), as wgmma wants.
_T8 = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
# Rows of the per-request schedule table (int32 [_ROWS, B + 1 rounded up to 4]; column B is
# a sentinel request with no pages, the "next" of the last one).
_PAGES, _NEXT, _FNEXT, _CTX, _ROWS = 0, 1, 2, 3, 4
# Columns of the per-CTA schedule (int32 [G, 8]).
_T0, _T1, _B0, _J0, _F0, _F1, _FB0, _FJ0 = range(8)


def _num_sms() -> int:
  dev = jax.devices()[0]
  # Cross-lowering from a CPU host has no GPU to ask: assume an H100 SXM (132 SMs).
  return int(getattr(dev, "core_count", 0) or 132) if dev.platform == "gpu" else 132


@dataclasses.dataclass(frozen=True)
class PagedConfig:
  """Static tuning of the paged kernel.

  Attributes:
    ctas_per_sm: persistent CTAs per SM (the grid is ``ctas_per_sm * SMs``, fewer for small
      problems); each streams one contiguous segment of the batch's pages.
    num_stages: depth of the TMA ring (pages in flight per CTA).
    min_pages_per_cta: the shortest segment worth a CTA (small batches use fewer CTAs).
    num_ctas: the grid size itself, overriding ``ctas_per_sm`` (tests use it to force many
      short segments).
  """

  ctas_per_sm: int = 2
  num_stages: int = 8
  min_pages_per_cta: int = 4
  num_ctas: int | None = None

  def __post_init__(self):
    if self.ctas_per_sm < 1 or self.num_stages < 1 or self.min_pages_per_cta < 1:
      raise ValueError(f"PagedConfig: need ctas_per_sm, num_stages, min_pages_per_cta >= 1, "
                       f"got {self}")
    if self.num_ctas is not None and self.num_ctas < 1:
      raise ValueError(f"PagedConfig: num_ctas must be >= 1 or None, got {self.num_ctas}")


def unsupported_reason(next_n: int, H: int, D: int) -> str | None:
  """None when the kernel takes these shapes, else why not."""
  if next_n not in (1, 2):
    return f"next_n must be 1 or 2, got {next_n}"
  if H not in (16, 32, 64, 128) or next_n * H > 128:
    return f"need H in (16, 32, 64, 128) and next_n * H <= 128, got next_n={next_n}, H={H}"
  if D != 128:
    return f"head dim D must be 128, got {D}"
  return None


def _segments(counts, G: int, min_len: int):
  """Equal contiguous segments of the items ``(b, j), j < counts[b]``, request-major.

  Returns int32 [G] arrays (t0, t1, b0, j0): CTA c takes items [t0, t1), the first being page
  j0 of request b0 (a request with at least one item whenever t0 < t1)."""
  B = counts.shape[0]
  ends = jnp.cumsum(counts)
  total = ends[-1]
  seg = jnp.maximum(-(-total // G), min_len)
  t0 = jnp.minimum(jnp.arange(G, dtype=_I32) * seg, total)
  t1 = jnp.minimum(t0 + seg, total)
  b0 = jnp.minimum(jnp.searchsorted(ends, t0, side="right", method="compare_all"), B - 1)
  j0 = t0 - (ends[b0] - counts[b0])
  return t0, t1, b0.astype(_I32), j0


def _next_nonempty(counts):
  """int32 [B]: for each request the next one (after it) with items; B if none."""
  B = counts.shape[0]
  idx = jnp.where(counts > 0, jnp.arange(B, dtype=_I32), B)
  after = lax.cummin(idx, reverse=True)
  return jnp.concatenate([after[1:], jnp.full((1,), B, _I32)])


def _schedule(context_lens, out_pages: int, G: int, min_len: int, clean: bool):
  """(per-CTA int32 [G, 8], per-request int32 [_ROWS, Bp]): see the module docstring."""
  B = context_lens.shape[0]
  ctx = context_lens.astype(_I32)
  pages = jnp.clip((jnp.maximum(ctx, 0) + PAGE - 1) // PAGE, 0, out_pages)
  cols = [*_segments(pages, G, min_len)]
  fills = out_pages - pages
  if clean:
    cols += [*_segments(fills, G, 1)]
  else:
    cols += [jnp.zeros((G,), _I32)] * 4
  sched = jnp.stack(cols, axis=1)
  Bp = -(-(B + 1) // 4) * 4   # TMA rows are whole 16 bytes; column B is the sentinel
  rows = jnp.stack([pages, _next_nonempty(pages), _next_nonempty(fills), ctx])
  meta = jnp.pad(rows, ((0, 0), (0, Bp - B)))
  return sched, meta


def _kernel(q_gmem, w_gmem, k_gmem, ks_gmem, bt_gmem, sched_gmem, meta_gmem, out_gmem,
            k_smem, ks_smem, q_smem, w_smem, o_smem, fill_smem, meta_smem, kv_bar, q_bar,
            meta_bar, *, n, H, B, num_pages, max_pages, out_pages, num_stages, clean):
  NS = num_stages
  NQ = n * H
  c = lax.axis_index("c")
  t0, t1 = sched_gmem[c, _T0], sched_gmem[c, _T1]
  n_items = t1 - t0
  if clean:
    f0, f1 = sched_gmem[c, _F0], sched_gmem[c, _F1]
    n_fill = f1 - f0
  else:
    n_fill = 0

  def rows(b, j):
    return out_gmem.at[pl.ds(b * n, n), pl.ds(j * PAGE, PAGE)]

  def advance(b, j, count_of, next_row):
    """The item after page j of request b: the next page, or the next request's first."""
    last = j + 1 >= count_of(b)
    return jnp.where(last, meta_smem[next_row, b], b), jnp.where(last, 0, j + 1)

  def page_id(b, j):
    """(id clamped into the cache, whether the table names a real page) of item (b, j)."""
    raw = bt_gmem[jnp.minimum(b, B - 1), jnp.clip(j, 0, max_pages - 1)]
    ok = (j < max_pages) & (raw >= 0) & (raw < num_pages)
    return jnp.clip(raw, 0, num_pages - 1), ok

  def issue(pid, slot):
    plgpu.copy_gmem_to_smem(k_gmem.at[pid], k_smem.at[slot], kv_bar.at[slot])
    plgpu.copy_gmem_to_smem(ks_gmem.at[pid], ks_smem.at[slot], kv_bar.at[slot])

  @pl.when((n_items > 0) | (n_fill > 0))
  def _work():
    plgpu.copy_gmem_to_smem(meta_gmem, meta_smem, meta_bar)
    plgpu.barrier_wait(meta_bar)
    pages_of = lambda b: meta_smem[_PAGES, b]

    # The first num_stages pages go out before anything else so that they load meanwhile.
    bi, ji = sched_gmem[c, _B0], sched_gmem[c, _J0]
    window = []
    for st in range(NS):
      pid, ok = page_id(bi, ji)

      @pl.when(st < n_items)
      def _():
        issue(pid, st)

      window.append((bi, ji, ok))
      bi, ji = advance(bi, ji, pages_of, _NEXT)

    if clean:
      # Whole pages past each context: -inf. The tile holds 2 rows whatever n (a splat
      # store wants a multiple of 128 elements).
      fill_smem[...] = jnp.full((2, PAGE), -jnp.inf, _F32)
      plgpu.commit_smem()

      def fill(i, carry):
        b, j = carry
        plgpu.copy_smem_to_gmem(fill_smem.at[pl.ds(0, n)], rows(b, pages_of(b) + j))
        return advance(b, j, lambda b: out_pages - pages_of(b), _FNEXT)

      lax.fori_loop(0, n_fill, fill, (sched_gmem[c, _FB0], sched_gmem[c, _FJ0]))

    def body(i, carry):
      bi, ji, b_prev, ctx, window = carry
      slot = lax.rem(i, NS)
      bc, jc, okc = window[0]
      # Scalar loads first: their latency hides behind the waits and the wgmma.
      next_pid, next_ok = page_id(bi, ji)
      new_request = bc != b_prev
      ctx = jnp.where(new_request, meta_smem[_CTX, bc], ctx)

      @pl.when(new_request)
      def _():
        # The previous request's wgmmas are complete (their results were read), so its
        # queries can be overwritten.
        plgpu.copy_gmem_to_smem(q_gmem.at[bc], q_smem, q_bar)
        plgpu.copy_gmem_to_smem(w_gmem.at[bc], w_smem, q_bar)
        plgpu.barrier_wait(q_bar)

      plgpu.barrier_wait(kv_bar.at[slot])

      def mma(acc):
        plgpu.wgmma(acc, k_smem.at[slot], q_smem.T)
        return acc[...]

      s = pl.run_scoped(mma, plgpu.ACC((PAGE, NQ), _F32))              # [64 tokens, n*H]
      w = plgpu.load(w_smem, layout=plgpu.Layout.WGMMA.reduce(0))
      ksc = plgpu.load(ks_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(1))
      s = jnp.maximum(s, 0.0) * lax.broadcast_in_dim(w, (PAGE, NQ), [1])
      oslot = lax.rem(i, 2)
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)                  # o_smem[oslot] is free
      for t in range(n):
        r = s[:, t * H:(t + 1) * H].sum(axis=1) * ksc                 # [64]
        if clean:
          # Token p is seen by query t iff p <= ctx - n + t (which implies p < ctx).
          lim = jnp.where(okc, ctx - n + t + 1 - jc * PAGE, 0)
          row = plgpu.broadcasted_iota(_I32, (PAGE,), 0,
                                       layout=plgpu.Layout.WGMMA.reduce(1))
          r = jnp.where(row < lim, r, -jnp.inf)
        o_smem[oslot, t, :] = r
      # Fences the SMEM writes for the TMA store, and orders every read of this slot's
      # scales before the refill below overwrites them.
      plgpu.commit_smem()

      @pl.when(i + NS < n_items)
      def _():
        issue(next_pid, slot)

      plgpu.copy_smem_to_gmem(o_smem.at[oslot], rows(bc, jc))
      nb, nj = advance(bi, ji, pages_of, _NEXT)
      return nb, nj, bc, ctx, window[1:] + [(bi, ji, next_ok)]

    lax.fori_loop(0, n_items, body, (bi, ji, jnp.int32(-1), jnp.int32(0), window))

  plgpu.wait_smem_to_gmem(0)


def _grid_size(cfg: PagedConfig, B: int, out_pages: int, interpret) -> int:
  if cfg.num_ctas is not None:
    return cfg.num_ctas
  G = cfg.ctas_per_sm * (4 if interpret else _num_sms())
  # Never more CTAs than segments of min_pages_per_cta the largest batch could fill.
  return max(1, min(G, -(-(B * out_pages) // cfg.min_pages_per_cta)))


def _launch(q_fp8, k_pages, k_scale_pages, weights, context_lens, block_tables, *, L, clean,
            interpret, cfg):
  B, n, H, D = q_fp8.shape
  out_pages = -(-L // PAGE)
  Lp = out_pages * PAGE  # whole pages: see the module docstring
  num_pages, max_pages = k_pages.shape[0], block_tables.shape[1]
  G = _grid_size(cfg, B, out_pages, interpret)
  sched, meta = _schedule(context_lens, out_pages, G, cfg.min_pages_per_cta, clean)
  NS = cfg.num_stages
  body = functools.partial(_kernel, n=n, H=H, B=B, num_pages=num_pages, max_pages=max_pages,
                           out_pages=out_pages, num_stages=NS, clean=clean)
  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((B * n, Lp), _F32),
      grid=(G,),
      grid_names=("c",),
      scratch_types=[
          plgpu.SMEM((NS, PAGE, D), _FP8, transforms=_T8),
          plgpu.SMEM((NS, PAGE), _F32),
          plgpu.SMEM((n * H, D), _FP8, transforms=_T8),
          plgpu.SMEM((n * H,), _F32),
          plgpu.SMEM((2, n, PAGE), _F32),
          plgpu.SMEM((2, PAGE), _F32),
          plgpu.SMEM(meta.shape, _I32),
          plgpu.Barrier(num_arrivals=2, num_barriers=NS),
          plgpu.Barrier(num_arrivals=2),
          plgpu.Barrier(num_arrivals=1),
      ],
      compiler_params=plgpu.CompilerParams(),
      interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams)
                 else plgpu.InterpretGPUParams() if interpret else None),
  )
  out = kernel(q_fp8.reshape(B, n * H, D), weights.reshape(B, n * H), k_pages,
               k_scale_pages, block_tables.astype(_I32), sched, meta)
  return out[:, :L] if Lp != L else out


@functools.partial(jax.jit, static_argnames=("max_context_len", "clean_logits", "interpret",
                                             "config"))
def paged_mqa_logits(q_fp8, k_pages, k_scale_pages, weights, context_lens, block_tables, *,
                     max_context_len: int, clean_logits: bool = True,
                     interpret: bool | plgpu.InterpretGPUParams = False,
                     config: PagedConfig | None = None) -> jax.Array:
  """Paged-decode MQA logits (DeepGEMM ``fp8_paged_mqa_logits``) on Hopper.

  Args:
    q_fp8: float8_e4m3fn [B, n, H, D], n = next_n in {1, 2}.
    k_pages: float8_e4m3fn [num_pages, 64, D]; k_scale_pages: float32 [num_pages, 64].
    weights: float32 [B * n, H].
    context_lens: int32 [B]; block_tables: int32 [B, max_pages].
    max_context_len: static output width L.
    clean_logits: -inf exactly where a token is invalid; with False those entries are
      unspecified (pages past a request's context are not written at all).
    interpret: run in the Mosaic GPU interpreter (CPU): True for default parameters, or an
      ``plgpu.InterpretGPUParams`` (race detection, NaN-poisoned memory).
    config: a :class:`PagedConfig`; default ``PagedConfig()``.

  Returns:
    float32 [B * n, L].
  """
  B, n, H, D = q_fp8.shape
  why = unsupported_reason(n, H, D)
  if why:
    raise ValueError(f"paged_mqa_logits (pallas): {why}")
  call = functools.partial(_launch, L=max_context_len, clean=clean_logits,
                           interpret=interpret, cfg=config or PagedConfig())
  if B <= MAX_BATCH:
    return call(q_fp8, k_pages, k_scale_pages, weights, context_lens, block_tables)
  parts = []
  for s in range(0, B, MAX_BATCH):
    e = min(s + MAX_BATCH, B)
    parts.append(call(q_fp8[s:e], k_pages, k_scale_pages, weights[s * n:e * n],
                      context_lens[s:e], block_tables[s:e]))
  return jnp.concatenate(parts, axis=0)


__all__ = ["PagedConfig", "MAX_BATCH", "unsupported_reason", "paged_mqa_logits"]
