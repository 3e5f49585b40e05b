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
- Two schedules (``PagedConfig.schedule``; ``benchmarks/bench_paged_variants.py`` times them
  beside DeepGEMM):
  ``"grid"`` (the default): grid ``(B, splits)``, CTA ``(b, s)`` owns pages
  ``[s * P_s, (s + 1) * P_s)`` of request ``b`` (``P_s = config.pages_per_split``). The split
  is static (from ``max_context_len``), so one long context is cut into many CTAs and many
  short ones each get their own. CTAs past a request's last page only write -inf; the
  hardware block scheduler hands the next CTA to whichever SM frees up, which balances
  ragged batches without a device-side schedule. Several CTAs stay resident per SM (46 KiB of
  SMEM each for n = 1, 54 KiB for n = 2, with H = 64 and 4 stages: 4 per SM), so one CTA's
  epilogue overlaps another's loads.
  ``"persistent"`` (DeepGEMM's schedule): ``ctas_per_sm * num_sms`` CTAs; :func:`paged_plan`
  (a few XLA ops on ``context_lens``, once per decode step, shareable by every layer) lays
  the batch's pages end to end and cuts them into equal runs, one per CTA; a CTA's ring runs
  across request boundaries and its queries are double-buffered (the next request's load
  while this one's pages stream), so it pays the start-up chain once, not once per split.
  Measured on the H100 in an earlier form and not kept then (benchmarks/NOTES.md): a
  persistent grid (single query buffer), and the block-table slice copied to SMEM first; that
  judgement was made by wall time, before the kernel-time method.
- Per CTA, one warpgroup: TMA the request's queries ``[n * H, D]`` and head weights once, then
  keep ``config.num_stages`` pages (8 KiB of keys plus 256 B of scales each) in flight in an
  SMEM ring guarded by one mbarrier per slot. The page id is read from the block table (a
  scalar load) at the top of the iteration that refills the slot, so its latency hides behind
  that iteration's math.
- Math per page: one fp8 wgmma per query group (:func:`query_groups`: ``g`` query tokens
  with ``g * H <= 128``) with M = 64 (the page's tokens), N = g * H (the query rows),
  K = D = 128, float32 accumulate, so every next_n (1..4) reads each page once (one launch
  of next_n = 4 took 0.176 ms at 64 x 32K on the H200 against 0.219 for two next_n = 2
  launches, the form used before). Then in registers: relu, times the head weight (a per
  column vector), a sum over each query's H columns (a row reduction within a warp), times
  the token's scale, the validity mask (skipped on pages wholly inside every query's
  range), and plain stores of the ``[n, 64]`` tile from registers into the logits
  (``direct_store``, the default; the SMEM tile + TMA store path, two output slots so that a
  store overlaps the next page, is the alternative). The slot is refilled right after the
  page's wgmmas, before the epilogue (``PagedConfig.release``).
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

Supported: ``next_n`` in 1..4, ``H`` in {16, 32, 64, 128}, ``D == 128`` (one 128-byte
swizzled row per token) (:func:`unsupported_reason`). ``interpret=True`` runs the same kernel
in the Mosaic GPU interpreter (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from kernels_pallas import _mlir

PAGE = 64
_F32 = jnp.float32
_FP8 = jnp.float8_e4m3fn
# fp8 rows of 128 bytes: 128-byte swizzle, tiles of (8 rows, 128 elements), as wgmma wants.
_T8 = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
_NUM_SMS = 132  # H100 SXM; only steers the split heuristic.


RELEASES = _mlir.RELEASES
SCHEDULES = ("grid", "persistent")
_SMEM_LIMIT = 227 * 1024  # bytes of shared memory one CTA may take on Hopper


@dataclasses.dataclass(frozen=True)
class PagedConfig:
  """Static tuning of the paged kernel.

  Attributes:
    pages_per_split: ``schedule="grid"``: pages (of 64 tokens) one CTA streams; the key axis
      of every request is cut into ``ceil(ceil(max_context_len / 64) / pages_per_split)``
      splits.
    num_stages: depth of the TMA ring (pages in flight per CTA).
    schedule: ``"grid"``, one CTA per (request, split) (the default); or ``"persistent"``,
      ``ctas_per_sm * num_sms`` CTAs that each stream an equal run of the batch's
      (request, page) pairs, given by a plan (:func:`paged_plan`) computed from the context
      lengths, the ring running across request boundaries.
    ctas_per_sm, num_sms: ``schedule="persistent"``: the grid is ``ctas_per_sm * num_sms``
      CTAs (132 SMs on an H100 SXM and an H200).
    group_rows: query rows (``g * H``) per wgmma at most, 64 or 128 (:func:`query_groups`).
      When a request's ``next_n * H`` rows fit one 128-row accumulator but come in several
      groups (64: next_n = 2 at H = 64), all the groups' wgmmas are issued before the
      first epilogue, so that one group's epilogue runs while the next group's MMA does.
    hoist_weights: keep the head weights in registers for the whole split (``"grid"``), where
      they fit; False loads them from SMEM for every page (fewer registers a thread).
    direct_store: ``"grid"`` only: store each page's logits from registers straight to
      global memory (no SMEM tile, TMA store or store wait), refill the ring slot as soon as
      the page's wgmmas have completed (before the epilogue), and compile without Pallas'
      automatic warpgroup barriers (``unsafe_no_auto_barriers``): one explicit barrier a
      page (before the refill) instead of about eight. DeepGEMM's kernels store this way.
    release: ``direct_store`` only: how a page's ring slot is handed back for its refill.
      ``"barrier"``: a warpgroup barrier (``commit_smem``: proxy fence + ``bar.sync``) after
      the page's wgmmas, then the refill. ``"fence"`` / ``"arrive"``: no barrier in the page
      loop at all; each thread arrives on the slot's mbarrier after its last read of the
      page (as DeepGEMM's consumers release a slot), with (``"fence"``) or without
      (``"arrive"``, as DeepGEMM and CUTLASS do) a per-thread async-proxy fence before it,
      and the slot is refilled one page later, when those arrivals are long complete (the
      prefetch distance drops to ``num_stages - 1`` pages). Interpret mode runs
      ``commit_smem`` in place of either (see ``_mlir.release_fence``).
  """

  pages_per_split: int = 16
  num_stages: int = 4
  schedule: str = "grid"
  ctas_per_sm: int = 2
  num_sms: int = _NUM_SMS
  group_rows: int = 128
  hoist_weights: bool = True
  direct_store: bool = False
  release: str = "barrier"

  def __post_init__(self):
    if self.pages_per_split < 1 or self.num_stages < 1:
      raise ValueError(f"PagedConfig: need pages_per_split, num_stages >= 1, got {self}")
    if self.num_stages > 32:
      raise ValueError(f"PagedConfig: num_stages must be <= 32 (one mbarrier parity bit "
                       f"each), got {self.num_stages}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"PagedConfig: schedule must be one of {SCHEDULES}, got "
                       f"{self.schedule!r}")
    if self.ctas_per_sm < 1 or self.num_sms < 1:
      raise ValueError(f"PagedConfig: need ctas_per_sm, num_sms >= 1, got {self}")
    if self.direct_store and self.schedule != "grid":
      raise ValueError(f"PagedConfig: direct_store needs schedule='grid', got {self}")
    if self.release not in RELEASES:
      raise ValueError(f"PagedConfig: release must be one of {RELEASES}, got {self.release!r}")
    if self.release != "barrier" and not (self.direct_store and self.num_stages >= 2):
      raise ValueError(f"PagedConfig: release={self.release!r} needs direct_store and "
                       f"num_stages >= 2, got {self}")
    if self.group_rows not in (64, 128):
      raise ValueError(f"PagedConfig: group_rows must be 64 or 128, got {self.group_rows}")

  @property
  def deferred(self) -> bool:
    """Whether slots are released by per-thread arrivals and refilled a page later."""
    return self.release != "barrier"

  @property
  def num_ctas(self) -> int:
    """CTAs of the persistent grid (the plan's length is this plus one)."""
    return self.ctas_per_sm * self.num_sms


def default_config(batch: int, max_context_len: int, num_sms: int = _NUM_SMS,
                   ctas_per_sm: int = 24) -> PagedConfig:
  """Pages per split: the largest power of two in [4, 64] that still gives the grid at least
  ``ctas_per_sm`` (24) CTAs per SM, and at least 8 where that leaves half as many. About 4
  CTAs are resident per SM, so 24 is 6 or more rounds: the last round (the tail, where the
  GPU is partly idle) stays short, and ragged batches balance. A CTA's fixed cost (the q/w
  load, the ring's first latency) is hidden by the other resident CTAs, but not at 4 pages
  a CTA when there are enough CTAs: on the H200 (2026-12-02, same call as DeepGEMM) 64 x 16K
  took 0.0446 ms at 8 pages a split (20 CTAs per SM) against 0.0477 at 4 (40 per SM), while
  8 x 32K (8 per SM at 8 pages) and 64 x 64K / 128 x 32K at 32 pages (20 per SM) were
  2-8% slower than the rule's choice. Compare with ``benchmarks/bench_paged_variants.py``.

  Stores go straight from registers (``direct_store``): on the H200 beside DeepGEMM
  (2026-12-02, one call) 1-7% faster than through SMEM and TMA at every measured shape
  (64 x 32K next_n = 2: 0.094 ms against 0.099)."""
  pages = -(-max_context_len // PAGE)

  def ctas(per):
    return batch * -(-pages // per)

  per = 4
  while per < 64 and (ctas(2 * per) >= ctas_per_sm * num_sms
                      or (per < 8 and 2 * ctas(2 * per) >= ctas_per_sm * num_sms)):
    per *= 2
  return PagedConfig(pages_per_split=per, direct_store=True)


def query_groups(next_n: int, H: int, rows: int = 128) -> tuple[tuple[int, int], ...]:
  """``(t0, g)`` per wgmma of a page: query tokens ``t0 .. t0 + g - 1`` (``g * H <= rows``
  query rows, or one token where ``H > rows``: the wgmma N side, one float32 accumulator of
  at most 64 registers a thread). Every group reads the page from the same SMEM slot, so the
  page is loaded once whatever next_n."""
  per = max(1, rows // H)
  return tuple((t0, min(per, next_n - t0)) for t0 in range(0, next_n, per))


def unsupported_reason(next_n: int, H: int, D: int) -> str | None:
  """None when :func:`paged_mqa_logits` can run these shapes, else why not: ``next_n`` in
  1..4 (in wgmma groups of at most 128 query rows, :func:`query_groups`, each page loaded
  once), ``H`` in {16, 32, 64, 128}, ``D == 128``."""
  if not 1 <= next_n <= 4:
    return f"next_n must be in 1..4, got {next_n}"
  if H not in (16, 32, 64, 128):
    return f"need H in (16, 32, 64, 128), got H={H}"
  if D != 128:
    return f"head dim D must be 128, got {D}"
  return None


def smem_bytes(next_n: int, H: int, config: PagedConfig) -> int:
  """Shared memory one CTA of this configuration takes, in bytes (each buffer rounded up to
  the 1024-byte alignment of a 128-byte swizzle: an estimate, the compiler places them)."""
  up = lambda x: -(-x // 1024) * 1024  # noqa: E731
  qbuf = 2 if config.schedule == "persistent" else 1
  NS = config.num_stages
  return (up(NS * PAGE * 128) + up(NS * PAGE * 4) + up(qbuf * next_n * H * 128)
          + up(qbuf * next_n * H * 4) + up(2 * next_n * PAGE * 4)
          + up(_fill_rows(next_n) * PAGE * 4)
          + up(8 * (NS * (1 + config.deferred) + qbuf)))


def _fill_rows(n: int) -> int:
  # A splat store into SMEM wants a multiple of 128 elements: 2 or 4 rows of 64.
  return 2 if n <= 2 else 4


def _context_pages(ctx, out_pages: int):
  """Pages holding at least one of ``ctx`` context tokens, at most ``out_pages``."""
  return jnp.minimum((jnp.maximum(ctx, 0) + PAGE - 1) // PAGE, out_pages)


def paged_plan(context_lens, max_context_len: int, num_ctas: int):
  """The persistent schedule's work split, from the context lengths (a few small XLA ops).

  It depends only on ``context_lens``, ``max_context_len`` and the grid size, so one plan
  serves every layer of a decode step (compute it once per step and pass it to each layer's
  call through ``paged_mqa_logits(..., plan=...)``).

  Requests with at least one page to compute come first, in order (``req``); their pages,
  laid end to end, are cut into ``num_ctas`` runs whose lengths differ by at most one page.

  Args:
    context_lens: int32 [B].
    max_context_len: static output width L (pages past it are not computed).
    num_ctas: static grid size (``PagedConfig.num_ctas``).

  Returns:
    ``(req, starts)``: ``req`` int32 [B, 3], row r = (request b, its pages to compute,
    context_lens[b]) with non-empty requests first in batch order; ``starts`` int32
    [num_ctas + 1, 3], row c = (index r into ``req``, page within that request, flat page
    index) where CTA c starts; CTA c computes flat pages ``[starts[c, 2], starts[c+1, 2])``.
    The end of the batch (flat index = all pages) is row (number of non-empty requests, 0).
  """
  ctx = context_lens.astype(jnp.int32)
  out_pages = -(-max_context_len // PAGE)
  pages = _context_pages(ctx, out_pages)
  # Non-empty requests first, in batch order (a scatter, not a sort: a few fused XLA ops).
  full = pages > 0
  pos = jnp.where(full, jnp.cumsum(full) - 1, jnp.sum(full) + jnp.cumsum(~full) - 1)
  row = jnp.stack([jnp.arange(ctx.shape[0], dtype=jnp.int32), pages, ctx], axis=1)
  req = jnp.zeros_like(row).at[pos].set(row, unique_indices=True)
  cum = jnp.cumsum(req[:, 1])
  total = cum[-1]
  c = jnp.arange(num_ctas + 1, dtype=jnp.int32)
  # c * total // G without the int32 overflow of c * total.
  flat = (total // num_ctas) * c + jnp.minimum(c, total % num_ctas)
  # The plan row holding flat page f: the number of rows that end at or before f; the end
  # (f = total) maps to the first empty row, so that a CTA's last request is r_end - 1 when
  # its run ends on a request boundary (empty rows end at total too).
  r = jnp.minimum(jnp.sum(cum[None, :] <= flat[:, None], axis=1, dtype=jnp.int32),
                  jnp.sum(full, dtype=jnp.int32))
  before = jnp.where(r > 0, cum[jnp.maximum(r - 1, 0)], 0)
  starts = jnp.stack([r, flat - before, flat], axis=1)
  return req, starts


_TMA_DIM = 256  # a TMA box holds at most 256 elements along each dimension


def _q_chunks(n: int, H: int) -> tuple[tuple[int, int], ...]:
  """(row0, rows) of the query/weight copies: n * H rows in boxes of <= 256."""
  NQ = n * H
  return tuple((r0, min(_TMA_DIM, NQ - r0)) for r0 in range(0, NQ, _TMA_DIM))


def _copy_queries(q_src, w_src, q_dst, w_dst, bar, n, H):
  """TMA of one request's queries [n*H, D] and weights [n*H]; 2 arrivals per chunk on bar."""
  for r0, rows in _q_chunks(n, H):
    plgpu.copy_gmem_to_smem(q_src.at[pl.ds(r0, rows)], q_dst.at[pl.ds(r0, rows)], bar)
    plgpu.copy_gmem_to_smem(w_src.at[pl.ds(r0, rows)], w_dst.at[pl.ds(r0, rows)], bar)


def _page_id(bt_gmem, b, j, *, max_pages: int, num_pages: int):
  """(id clamped into the cache, whether the table names a real page) of request b's page
  column j."""
  raw = bt_gmem[b, jnp.minimum(j, max_pages - 1)]
  ok = (j < max_pages) & (raw >= 0) & (raw < num_pages)
  return jnp.clip(raw, 0, num_pages - 1), ok


def _issue_page(k_gmem, ks_gmem, k_smem, ks_smem, kv_bar, pid, slot):
  """TMA of cache page ``pid`` (keys and scales) into ring slot ``slot``: 2 arrivals."""
  plgpu.copy_gmem_to_smem(k_gmem.at[pid], k_smem.at[slot], kv_bar.at[slot])
  plgpu.copy_gmem_to_smem(ks_gmem.at[pid], ks_smem.at[slot], kv_bar.at[slot])


def _overlapped(n: int, H: int, rows: int) -> bool:
  """Whether the page's wgmma groups are all in flight at once (their accumulators fit the
  registers of one 128-row group)."""
  return len(query_groups(n, H, rows)) > 1 and n * H <= 128


def _hoisted_weights(w_smem, n, H, rows):
  """Per wgmma group, its head weights broadcast to the accumulator's [64, g*H] layout, to
  keep in registers across the pages; None when the groups run one after another (the
  registers go to the accumulator; each group then loads its weights per page)."""
  groups = query_groups(n, H, rows)
  if len(groups) > 1 and not _overlapped(n, H, rows):
    return None
  out = []
  for t0, g in groups:
    w = plgpu.load(w_smem.at[pl.ds(t0 * H, g * H)] if len(groups) > 1 else w_smem,
                   layout=plgpu.Layout.WGMMA.reduce(0))
    out.append(lax.broadcast_in_dim(w, (PAGE, g * H), [1]))
  return out


def _page_math(k_ref, ks_ref, q_ref, w_ref, o_ref, *, n, H, ctx, ok, j, clean, w_hoisted,
               rows=128, after_mma=None):
  """One page: logits of its 64 tokens for the n queries into ``o_ref`` [n, 64] (an SMEM
  tile, or with ``direct_store`` the output rows in GMEM).

  One fp8 wgmma per query group (:func:`query_groups`): M = 64 (the page's tokens),
  N = g * H (the query rows), K = D = 128, float32 accumulate. Then in registers: relu,
  times the head weight (a per column vector), a sum over each query's H columns (a row
  reduction within a warp), times the token's scale and the validity mask. With several
  groups that fit one accumulator's registers together (:func:`_overlapped`), every
  group's wgmma is issued first and group i's epilogue runs while group i + 1's MMA does.
  ``after_mma()`` (optional) runs once the last wgmma of the page has completed, before
  that group's epilogue: the page's SMEM slot is no longer read after it."""
  ksc = plgpu.load(ks_ref, layout=plgpu.Layout.WGMMA.reduce(1))
  groups = query_groups(n, H, rows)

  def q_of(t0, g):
    return q_ref if g == n else q_ref.at[pl.ds(t0 * H, g * H)]

  def epilogue(s, gi, t0, g):
    NQ = g * H
    if w_hoisted is not None:
      w = w_hoisted[gi]
    else:
      w_g = w_ref if g == n else w_ref.at[pl.ds(t0 * H, NQ)]
      w = plgpu.load(w_g, layout=plgpu.Layout.WGMMA.reduce(0))
      w = lax.broadcast_in_dim(w, (PAGE, NQ), [1])
    s = jnp.maximum(s, 0.0) * w
    return [(t0 + u, s[:, u * H:(u + 1) * H].sum(axis=1) * ksc) for u in range(g)]  # [64]

  if _overlapped(n, H, rows):
    def mma_all(*accs):
      for (t0, g), acc in zip(groups, accs):
        plgpu.wgmma(acc, k_ref, q_of(t0, g).T)
      res = []
      for gi, ((t0, g), acc) in enumerate(zip(groups, accs)):
        s = plgpu.wgmma_accumulator_load(acc, wait_n=len(groups) - 1 - gi)
        if after_mma is not None and gi == len(groups) - 1:
          after_mma()
        res.extend(r for _, r in epilogue(s, gi, t0, g))
      return res

    vals = pl.run_scoped(mma_all, *[plgpu.ACC((PAGE, g * H), _F32) for _, g in groups])
    _store_rows(o_ref, list(zip(range(n), vals)), n=n, ctx=ctx, ok=ok, j=j, clean=clean)
    return
  for gi, (t0, g) in enumerate(groups):
    def mma(acc, t0=t0, g=g):
      plgpu.wgmma(acc, k_ref, q_of(t0, g).T)
      return acc[...]

    s = pl.run_scoped(mma, plgpu.ACC((PAGE, g * H), _F32))
    if after_mma is not None and gi == len(groups) - 1:
      after_mma()
    # Each group's rows are stored before the next group's MMA is issued.
    _store_rows(o_ref, epilogue(s, gi, t0, g), n=n, ctx=ctx, ok=ok, j=j, clean=clean)


def _store_rows(o_ref, outs, *, n, ctx, ok, j, clean):
  """``o_ref[t, :] = r`` for each ``(t, r)`` of ``outs``, masked when ``clean``.

  Token p of the page is seen by query t iff p <= ctx - n + t (which implies p < ctx), and
  only when the table names a real page (``ok``). Most pages lie wholly inside every query's
  range: those skip the per-token compare and select (a uniform branch on scalars)."""
  def plain():
    for t, r in outs:
      o_ref[t, :] = r

  if not clean:
    plain()
    return
  whole = ok & ((j + 1) * PAGE <= ctx - n + 1)
  pl.when(whole)(plain)

  @pl.when(jnp.logical_not(whole))
  def _():
    row = plgpu.broadcasted_iota(jnp.int32, (PAGE,), 0, layout=plgpu.Layout.WGMMA.reduce(1))
    for t, r in outs:
      lim = jnp.where(ok, ctx - n + t + 1 - j * PAGE, 0)
      o_ref[t, :] = jnp.where(row < lim, r, -jnp.inf)


def _grid_kernel(q_gmem, w_gmem, k_gmem, ks_gmem, cl_gmem, bt_gmem, out_gmem,
                 k_smem, ks_smem, q_smem, w_smem, o_smem, fill_smem, kv_bar, q_bar,
                 used_bar=None, *, n, H, num_pages, max_pages, out_pages, config, clean,
                 interpret=False):
  NS, PS = config.num_stages, config.pages_per_split
  b = lax.axis_index("b")
  j0 = lax.axis_index("s") * PS
  j1 = jnp.minimum(j0 + PS, out_pages)
  ctx = cl_gmem[b]
  ctx_pages = _context_pages(ctx, out_pages)
  n_comp = jnp.clip(ctx_pages - j0, 0, j1 - j0)  # pages holding at least one context token

  def rows(j):
    return out_gmem.at[pl.ds(b * n, n), pl.ds(j * PAGE, PAGE)]

  def page_id(j):
    return _page_id(bt_gmem, b, j, max_pages=max_pages, num_pages=num_pages)

  def issue(pid, slot):
    _issue_page(k_gmem, ks_gmem, k_smem, ks_smem, kv_bar, pid, slot)

  # The table entries of the ring's first pages are loaded beside the context length, not
  # after it (page_id clamps into the table; entries past the context are never used): the
  # CTA's start-up chain is one load latency, then the TMAs. On the H200 (ncu, 64 x 32K,
  # next_n = 2, 8 pages a CTA) a quarter of the stall samples sat in this once-per-CTA code.
  first = [page_id(j0 + st)[0] for st in range(NS)]
  last = j0 + n_comp - 1

  @pl.when(n_comp > 0)
  def _start():
    _copy_queries(q_gmem.at[b], w_gmem.at[b], q_smem, w_smem, q_bar, n, H)
    for st in range(NS):
      @pl.when(st < n_comp)
      def _():
        issue(first[st], st)

  if clean:
    # Pages past the context only get -inf (only CTAs that have any pay the fill and its
    # barrier); these stores overlap the loads above.
    @pl.when(n_comp < j1 - j0)
    def _fill():
      fill_smem[...] = jnp.full(fill_smem.shape, -jnp.inf, _F32)
      plgpu.commit_smem()

      @pl.loop(j0 + n_comp, j1)
      def _(j):
        plgpu.copy_smem_to_gmem(fill_smem.at[pl.ds(0, n)], rows(j))

  @pl.when(n_comp > 0)
  def _compute():
    plgpu.barrier_wait(q_bar)
    # The weights stay in registers for the whole split where they fit.
    w = _hoisted_weights(w_smem, n, H, config.group_rows) if config.hoist_weights else None

    def page_math(slot, j, ok, o_ref, after_mma=None):
      _page_math(k_smem.at[slot], ks_smem.at[slot], q_smem, w_smem, o_ref, n=n, H=H,
                 ctx=ctx, ok=ok, j=j, clean=clean, w_hoisted=w, rows=config.group_rows,
                 after_mma=after_mma)

    @pl.loop(0, n_comp)
    def _(i):
      slot = lax.rem(i, NS)
      j = j0 + i
      # Scalar loads first: their latency hides behind the wait and the wgmma.
      _, ok = page_id(j)
      # The page that refills a slot: NS pages ahead, or NS - 1 for the previous page's slot.
      next_pid, _ = page_id(jnp.minimum(j + NS - int(config.deferred), last))
      if config.deferred:
        # The previous page's slot: every thread arrived on used_bar after its last read
        # of it, one page ago, so this wait rarely stalls.
        prev = lax.rem(i + NS - 1, NS)

        @pl.when((i >= 1) & (i - 1 + NS < n_comp))
        def _():
          plgpu.barrier_wait(used_bar.at[prev])
          issue(next_pid, prev)

        plgpu.barrier_wait(kv_bar.at[slot])

        def release():
          # Per thread (128 arrivals): its scales are in registers, its wgmmas complete.
          @pl.when(i + NS < n_comp)
          def _():
            _mlir.release_fence(config.release, interpret)
            plgpu.barrier_arrive(used_bar.at[slot])

        page_math(slot, j, ok, rows(j), after_mma=release)
        return
      plgpu.barrier_wait(kv_bar.at[slot])
      if config.direct_store:
        def refill():
          # Every thread's read of the slot's scales (and its wgmmas) is done before one
          # thread's TMA overwrites the slot: without auto barriers this is the page's only
          # warpgroup barrier.
          plgpu.commit_smem()

          @pl.when(i + NS < n_comp)
          def _():
            issue(next_pid, slot)

        page_math(slot, j, ok, rows(j), after_mma=refill)
        return
      oslot = lax.rem(i, 2)
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)                  # o_smem[oslot] is free
      page_math(slot, j, ok, o_smem.at[oslot])
      # Fences the SMEM writes for the TMA store, and orders every read of this slot's
      # scales before the refill below overwrites them.
      plgpu.commit_smem()

      @pl.when(i + NS < n_comp)
      def _():
        issue(next_pid, slot)

      plgpu.copy_smem_to_gmem(o_smem.at[oslot], rows(j))

  plgpu.wait_smem_to_gmem(0)


def _persistent_kernel(q_gmem, w_gmem, k_gmem, ks_gmem, cl_gmem, bt_gmem, req_gmem, st_gmem,
                       out_gmem,
                       k_smem, ks_smem, q_smem, w_smem, o_smem, fill_smem, kv_bar, q_bar, *,
                       n, H, B, num_pages, max_pages, out_pages, config, clean):
  """CTA c streams flat pages [starts[c, 2], starts[c + 1, 2]) of the plan (paged_plan).

  Two cursors walk the plan's (request index r, page j) pairs: the compute cursor, and the
  issue cursor NS pages ahead, which refills the ring slot the compute cursor has just
  freed; the ring does not drain at a request boundary. The queries and weights are
  double-buffered: when the compute cursor enters request r, the next request's are loaded
  into the other buffer (the previous request's wgmmas have all completed by then)."""
  NS, G = config.num_stages, config.num_ctas
  c = lax.axis_index("c")
  r0, pj0, f0 = st_gmem[c, 0], st_gmem[c, 1], st_gmem[c, 2]
  r_end, j_end, f1 = st_gmem[c + 1, 0], st_gmem[c + 1, 1], st_gmem[c + 1, 2]
  count = f1 - f0
  r_last = jnp.where(j_end > 0, r_end, r_end - 1)  # request of this CTA's last page

  def out_rows(b, j):
    return out_gmem.at[pl.ds(b * n, n), pl.ds(j * PAGE, PAGE)]

  if clean:
    # Pages past each context only get -inf: CTA c fills those of requests c, c + G, ...
    fill_smem[...] = jnp.full(fill_smem.shape, -jnp.inf, _F32)
    plgpu.commit_smem()

    @pl.loop(0, jnp.maximum(B - c + G - 1, 0) // G)
    def _(k):
      b = c + k * G
      pages_b = _context_pages(cl_gmem[b], out_pages)

      @pl.loop(pages_b, out_pages)
      def _(j):
        plgpu.copy_smem_to_gmem(fill_smem.at[pl.ds(0, n)], out_rows(b, j))

  def request(r):
    """(b, pages, ctx) of plan row r (clamped into the table: past-the-end rows are read
    only by cursors that are never used)."""
    rr = jnp.minimum(r, B - 1)
    return req_gmem[rr, 0], req_gmem[rr, 1], req_gmem[rr, 2]

  def advance(cur):
    r, j, b, pages, ctx = cur
    nb, npg, nctx = request(r + 1)
    wrap = j + 1 >= pages
    return (jnp.where(wrap, r + 1, r), jnp.where(wrap, 0, j + 1), jnp.where(wrap, nb, b),
            jnp.where(wrap, npg, pages), jnp.where(wrap, nctx, ctx))

  def page_id(b, j):
    return _page_id(bt_gmem, b, j, max_pages=max_pages, num_pages=num_pages)

  def issue(cur, slot):
    _, j, b, _, _ = cur
    _issue_page(k_gmem, ks_gmem, k_smem, ks_smem, kv_bar, page_id(b, j)[0], slot)

  def issue_q(r, qslot):
    b, _, _ = request(r)
    _copy_queries(q_gmem.at[b], w_gmem.at[b], q_smem.at[qslot], w_smem.at[qslot],
                  q_bar.at[qslot], n, H)

  @pl.when(count > 0)
  def _compute():
    issue_q(r0, 0)
    b0, pages0, ctx0 = request(r0)
    start = (r0, pj0, b0, pages0, ctx0)
    cur = start
    for st in range(NS):
      if st:
        cur = advance(cur)

      @pl.when(st < count)
      def _():
        issue(cur, st)

    def body(i, carry):
      comp, iss = carry[:5], carry[5:]
      r, j, b, _, ctx = comp
      slot = lax.rem(i, NS)
      qslot = lax.rem(r - r0, 2)
      iss = advance(iss)  # the page NS ahead of this one
      _, ok = page_id(b, j)

      @pl.when((i == 0) | (j == 0))
      def _():
        plgpu.barrier_wait(q_bar.at[qslot])

        @pl.when(r + 1 <= r_last)
        def _():
          issue_q(r + 1, 1 - qslot)

      plgpu.barrier_wait(kv_bar.at[slot])
      oslot = lax.rem(i, 2)
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)                  # o_smem[oslot] is free
      _page_math(k_smem.at[slot], ks_smem.at[slot], q_smem.at[qslot], w_smem.at[qslot],
                 o_smem.at[oslot], n=n, H=H, ctx=ctx, ok=ok, j=j, clean=clean,
                 w_hoisted=None, rows=config.group_rows)
      plgpu.commit_smem()

      @pl.when(i + NS < count)
      def _():
        issue(iss, slot)

      plgpu.copy_smem_to_gmem(o_smem.at[oslot], out_rows(b, j))
      return (*advance(comp), *iss)

    lax.fori_loop(0, count, body, (*start, *cur))

  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("max_context_len", "clean_logits", "interpret",
                                             "config"))
def paged_mqa_logits(q_fp8, k_pages, k_scale_pages, weights, context_lens, block_tables,
                     plan=None, *, max_context_len: int, clean_logits: bool = True,
                     interpret: bool | plgpu.InterpretGPUParams = False,
                     config: PagedConfig | None = None) -> jax.Array:
  """Paged-decode MQA logits (DeepGEMM ``fp8_paged_mqa_logits``) on Hopper.

  Args:
    q_fp8: float8_e4m3fn [B, n, H, D], n = next_n in 1..4 (:func:`unsupported_reason`).
    k_pages: float8_e4m3fn [num_pages, 64, D]; k_scale_pages: float32 [num_pages, 64].
    weights: float32 [B * n, H].
    context_lens: int32 [B]; block_tables: int32 [B, max_pages].
    plan: ``schedule="persistent"`` only: the ``(req, starts)`` of :func:`paged_plan` for
      these ``context_lens``, ``max_context_len`` and ``config.num_ctas`` (computed here when
      None; pass it to share one plan across the layers of a decode step). A plan made from
      other context lengths gives wrong logits (it is not checked).
    max_context_len: static output width L.
    clean_logits: -inf exactly where a token is invalid; with False those entries are
      unspecified (pages past a request's context are not written at all).
    interpret: run in the Mosaic GPU interpreter (CPU): True for default parameters, or an
      ``plgpu.InterpretGPUParams`` (race detection, NaN-poisoned memory).
    config: a :class:`PagedConfig`; default from :func:`default_config`.

  Returns:
    float32 [B * n, L].
  """
  B, n, H, D = q_fp8.shape
  why = unsupported_reason(n, H, D)
  if why:
    raise ValueError(f"paged_mqa_logits (pallas): {why}")
  L = max_context_len
  cfg = config or default_config(B, L)
  persistent = cfg.schedule == "persistent"
  if plan is not None and not persistent:
    raise ValueError(f"paged_mqa_logits (pallas): plan is only used by "
                     f"schedule='persistent', got a plan with {cfg}")
  need = smem_bytes(n, H, cfg)
  if need > _SMEM_LIMIT:
    raise ValueError(f"paged_mqa_logits (pallas): {cfg} at next_n={n}, H={H} needs {need} "
                     f"bytes of shared memory per CTA, over the {_SMEM_LIMIT} Hopper allows")
  out_pages = -(-L // PAGE)
  Lp = out_pages * PAGE  # whole pages: see the module docstring
  num_pages, max_pages = k_pages.shape[0], block_tables.shape[1]
  NS = cfg.num_stages
  qbuf = (2,) if persistent else ()
  scratch = [
      plgpu.SMEM((NS, PAGE, D), _FP8, transforms=_T8),
      plgpu.SMEM((NS, PAGE), _F32),
      plgpu.SMEM((*qbuf, n * H, D), _FP8, transforms=_T8),
      plgpu.SMEM((*qbuf, n * H), _F32),
      plgpu.SMEM((2, n, PAGE), _F32),
      plgpu.SMEM((_fill_rows(n), PAGE), _F32),
      plgpu.Barrier(num_arrivals=2, num_barriers=NS),
      plgpu.Barrier(num_arrivals=2 * len(_q_chunks(n, H)), num_barriers=2 if persistent else 1),
  ]
  if cfg.deferred:
    scratch.append(plgpu.Barrier(num_arrivals=1, num_barriers=NS))   # used_bar
  common = dict(n=n, H=H, num_pages=num_pages, max_pages=max_pages, out_pages=out_pages,
                config=cfg, clean=clean_logits)
  args = [q_fp8.reshape(B, n * H, D), weights.reshape(B, n * H), k_pages, k_scale_pages,
          context_lens, block_tables]
  if persistent:
    if plan is None:
      plan = paged_plan(context_lens, L, cfg.num_ctas)
    req, starts = plan
    if req.shape != (B, 3) or starts.shape != (cfg.num_ctas + 1, 3) \
        or req.dtype != jnp.int32 or starts.dtype != jnp.int32:
      raise ValueError(f"paged_mqa_logits (pallas): plan must be paged_plan's (req int32 "
                       f"[{B}, 3], starts int32 [{cfg.num_ctas + 1}, 3]), got "
                       f"{req.dtype}{list(req.shape)}, {starts.dtype}{list(starts.shape)}")
    body = functools.partial(_persistent_kernel, B=B, **common)
    grid, names = (cfg.num_ctas,), ("c",)
    args += [req, starts]
  else:
    body = functools.partial(_grid_kernel, interpret=bool(interpret), **common)
    grid, names = (B, -(-out_pages // cfg.pages_per_split)), ("b", "s")
  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((B * n, Lp), _F32),
      grid=grid,
      grid_names=names,
      scratch_types=scratch,
      # direct_store: the kernel places its own barriers (PagedConfig.direct_store).
      compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=cfg.direct_store),
      interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams)
                 else plgpu.InterpretGPUParams() if interpret else None),
  )
  out = kernel(*args)
  return out[:, :L] if Lp != L else out


__all__ = ["PagedConfig", "RELEASES", "SCHEDULES", "default_config", "paged_plan",
           "query_groups", "smem_bytes", "unsupported_reason", "paged_mqa_logits"]
