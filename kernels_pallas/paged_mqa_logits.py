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
- Grid ``(B, splits)``: CTA ``(b, s)`` owns pages ``[s * P_s, (s + 1) * P_s)`` of request
  ``b`` (``P_s = config.pages_per_split``). The split is static (from ``max_context_len``), so
  one long context is cut into many CTAs and many short ones each get their own. CTAs past
  a request's last page only write -inf; the hardware block scheduler hands the next CTA to
  whichever SM frees up, which balances ragged batches without a device-side schedule.
  Several CTAs stay resident per SM (46 KiB of SMEM each for n = 1, 54 KiB for n = 2, with
  H = 64 and 4 stages: 4 per SM), so one CTA's epilogue overlaps another's loads.
  Measured on the H100 and not kept (benchmarks/NOTES.md): a persistent grid with equal page
  segments per CTA (DeepGEMM's schedule), and the block-table slice copied to SMEM first;
  both were slower than this grid.
- Per CTA, one warpgroup: TMA the request's queries ``[n * H, D]`` and head weights once, then
  keep ``config.num_stages`` pages (8 KiB of keys plus 256 B of scales each) in flight in an
  SMEM ring guarded by one mbarrier per slot. The page id is read from the block table (a
  scalar load) at the top of the iteration that refills the slot, so its latency hides behind
  that iteration's math.
- Math per page: one fp8 wgmma with M = 64 (the page's tokens), N = n * H (the query rows),
  K = D = 128, float32 accumulate. Then in registers: relu, times the head weight (a per
  column vector), a sum over each query's H columns (a row reduction within a warp), times
  the token's scale, the validity mask, and a TMA store of the ``[n, 64]`` tile into the
  logits (two output slots so that a store overlaps the next page).
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
(one 128-byte swizzled row per token). ``interpret=True`` runs the same kernel in the Mosaic
GPU interpreter (CPU tests).
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
_F32 = jnp.float32
_FP8 = jnp.float8_e4m3fn
# fp8 rows of 128 bytes: 128-byte swizzle, tiles of (8 rows, 128 elements), as wgmma wants.
_T8 = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
_NUM_SMS = 132  # H100 SXM; only steers the split heuristic.


@dataclasses.dataclass(frozen=True)
class PagedConfig:
  """Static tuning of the paged kernel.

  Attributes:
    pages_per_split: pages (of 64 tokens) one CTA streams; the key axis of every request is cut
      into ``ceil(ceil(max_context_len / 64) / pages_per_split)`` splits.
    num_stages: depth of the TMA ring (pages in flight per CTA).
  """

  pages_per_split: int = 16
  num_stages: int = 4

  def __post_init__(self):
    if self.pages_per_split < 1 or self.num_stages < 1:
      raise ValueError(f"PagedConfig: need pages_per_split, num_stages >= 1, got {self}")


def default_config(batch: int, max_context_len: int, num_sms: int = _NUM_SMS) -> PagedConfig:
  """Pages per split: the largest power of two in [4, 64] that still gives the grid at least
  24 CTAs per SM. About 4 CTAs are resident per SM, so that is 6 or more rounds: the
  last round (the tail, where the GPU is partly idle) stays short, and ragged batches
  balance. A CTA's fixed cost (the q/w load, the ring's first latency) is hidden by the other
  resident CTAs. A first guess: tune with ``benchmarks/bench_paged_mqa_logits.py --sweep``."""
  pages = -(-max_context_len // PAGE)
  per = 4
  while per < 64 and batch * -(-pages // (2 * per)) >= 24 * num_sms:
    per *= 2
  return PagedConfig(pages_per_split=per)


def unsupported_reason(next_n: int, H: int, D: int) -> str | None:
  """None when the kernel takes these shapes, else why not."""
  if next_n not in (1, 2):
    return f"next_n must be 1 or 2, got {next_n}"
  if H not in (16, 32, 64, 128) or next_n * H > 128:
    return f"need H in (16, 32, 64, 128) and next_n * H <= 128, got next_n={next_n}, H={H}"
  if D != 128:
    return f"head dim D must be 128, got {D}"
  return None


def _kernel(q_gmem, w_gmem, k_gmem, ks_gmem, cl_gmem, bt_gmem, out_gmem,
            k_smem, ks_smem, q_smem, w_smem, o_smem, fill_smem, kv_bar, q_bar, *,
            n, H, num_pages, max_pages, out_pages, config, clean):
  NS, PS = config.num_stages, config.pages_per_split
  NQ = n * H
  b = lax.axis_index("b")
  j0 = lax.axis_index("s") * PS
  j1 = jnp.minimum(j0 + PS, out_pages)
  ctx = cl_gmem[b]
  ctx_pages = jnp.minimum((jnp.maximum(ctx, 0) + PAGE - 1) // PAGE, out_pages)
  n_comp = jnp.clip(ctx_pages - j0, 0, j1 - j0)  # pages holding at least one context token

  def rows(j):
    return out_gmem.at[pl.ds(b * n, n), pl.ds(j * PAGE, PAGE)]

  if clean:
    # Pages past the context only get -inf; these stores overlap the loads below.
    # The tile holds 2 rows whatever n: a splat store wants a multiple of 128 elements.
    fill_smem[...] = jnp.full((2, PAGE), -jnp.inf, _F32)
    plgpu.commit_smem()

    @pl.loop(j0 + n_comp, j1)
    def _(j):
      plgpu.copy_smem_to_gmem(fill_smem.at[pl.ds(0, n)], rows(j))

  def page_id(j):
    """(id clamped into the cache, whether the table names a real page) of page column j."""
    raw = bt_gmem[b, jnp.minimum(j, max_pages - 1)]
    ok = (j < max_pages) & (raw >= 0) & (raw < num_pages)
    return jnp.clip(raw, 0, num_pages - 1), ok

  def issue(pid, slot):
    plgpu.copy_gmem_to_smem(k_gmem.at[pid], k_smem.at[slot], kv_bar.at[slot])
    plgpu.copy_gmem_to_smem(ks_gmem.at[pid], ks_smem.at[slot], kv_bar.at[slot])

  @pl.when(n_comp > 0)
  def _compute():
    plgpu.copy_gmem_to_smem(q_gmem.at[b], q_smem, q_bar)
    plgpu.copy_gmem_to_smem(w_gmem.at[b], w_smem, q_bar)
    # All first-stage ids are loaded before any copy is issued so that the loads overlap.
    # Indices stop at the last page with context: table entries past it are never read.
    last = j0 + n_comp - 1
    first = [page_id(jnp.minimum(j0 + st, last))[0] for st in range(NS)]
    for st in range(NS):
      @pl.when(st < n_comp)
      def _():
        issue(first[st], st)

    plgpu.barrier_wait(q_bar)
    w = plgpu.load(w_smem, layout=plgpu.Layout.WGMMA.reduce(0))
    w = lax.broadcast_in_dim(w, (PAGE, NQ), [1])

    @pl.loop(0, n_comp)
    def _(i):
      slot = lax.rem(i, NS)
      j = j0 + i
      # Scalar loads first: their latency hides behind the wait and the wgmma.
      _, ok = page_id(j)
      next_pid, _ = page_id(jnp.minimum(j + NS, last))
      plgpu.barrier_wait(kv_bar.at[slot])

      def mma(acc):
        plgpu.wgmma(acc, k_smem.at[slot], q_smem.T)
        return acc[...]

      s = pl.run_scoped(mma, plgpu.ACC((PAGE, NQ), _F32))              # [64 tokens, n*H]
      ksc = plgpu.load(ks_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(1))
      s = jnp.maximum(s, 0.0) * w
      oslot = lax.rem(i, 2)
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)                  # o_smem[oslot] is free
      for t in range(n):
        r = s[:, t * H:(t + 1) * H].sum(axis=1) * ksc                 # [64]
        if clean:
          # Token p is seen by query t iff p <= ctx - n + t (which implies p < ctx).
          lim = jnp.where(ok, ctx - n + t + 1 - j * PAGE, 0)
          row = plgpu.broadcasted_iota(jnp.int32, (PAGE,), 0,
                                       layout=plgpu.Layout.WGMMA.reduce(1))
          r = jnp.where(row < lim, r, -jnp.inf)
        o_smem[oslot, t, :] = r
      # Fences the SMEM writes for the TMA store, and orders every read of this slot's
      # scales before the refill below overwrites them.
      plgpu.commit_smem()

      @pl.when(i + NS < n_comp)
      def _():
        issue(next_pid, slot)

      plgpu.copy_smem_to_gmem(o_smem.at[oslot], rows(j))

  plgpu.wait_smem_to_gmem(0)


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
  out_pages = -(-L // PAGE)
  splits = -(-out_pages // cfg.pages_per_split)
  Lp = out_pages * PAGE  # whole pages: see the module docstring
  num_pages, max_pages = k_pages.shape[0], block_tables.shape[1]
  body = functools.partial(_kernel, n=n, H=H, num_pages=num_pages, max_pages=max_pages,
                           out_pages=out_pages, config=cfg, clean=clean_logits)
  NS = cfg.num_stages
  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((B * n, Lp), _F32),
      grid=(B, splits),
      grid_names=("b", "s"),
      scratch_types=[
          plgpu.SMEM((NS, PAGE, D), _FP8, transforms=_T8),
          plgpu.SMEM((NS, PAGE), _F32),
          plgpu.SMEM((n * H, D), _FP8, transforms=_T8),
          plgpu.SMEM((n * H,), _F32),
          plgpu.SMEM((2, n, PAGE), _F32),
          plgpu.SMEM((2, PAGE), _F32),
          plgpu.Barrier(num_arrivals=2, num_barriers=NS),
          plgpu.Barrier(num_arrivals=2),
      ],
      compiler_params=plgpu.CompilerParams(),
      interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams)
                 else plgpu.InterpretGPUParams() if interpret else None),
  )
  out = kernel(q_fp8.reshape(B, n * H, D), weights.reshape(B, n * H), k_pages,
               k_scale_pages, context_lens, block_tables)
  return out[:, :L] if Lp != L else out


__all__ = ["PagedConfig", "default_config", "unsupported_reason", "paged_mqa_logits"]
