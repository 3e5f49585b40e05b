"""Mosaic GPU kernel: per-row top-k indices by radix select (rows resident, streamed, or split).

The algorithm, for one segment of one row (one CTA of 128-512 threads):

1. Load. Each logit in the segment's part of [ks, ke) becomes an order-preserving uint32 key
   (NaN ranks as -inf, -0.0 ties +0.0, as ``reference.sortable_keys``); keys outside the
   range become 0, below every valid key (the smallest valid key, that of -inf, is
   0x007FFFFF). The keys go to shared memory, and the same sweep builds a histogram of their
   top 11 bits (``red.shared.add``: relaxed shared-memory reductions, one per key).
2. Select. A block-wide suffix scan of the histogram finds the bucket that holds the k-th
   largest key: the keys in higher buckets are all chosen, and k shrinks by their count. If
   the bucket holds exactly the keys still wanted, the search stops; otherwise the next
   digit (11, then 10 bits) is histogrammed among the keys whose prefix matches, reading
   keys from shared memory only. After 32 bits the threshold key is exact; if more keys tie
   at it than are wanted, the same three passes run over the bits of ``~index`` of the tied
   keys, so the lowest-index ties win (the reference's tie rule). A segment with at most k
   valid keys keeps them all (no pass beyond the load).
3. Write. The chosen keys satisfy ``key & M1 > P1 or (key & M1 == P1 and ~idx & M2 >= P2)``
   for the prefixes found above. Each thread counts its chosen keys, one block-wide scan of
   those counts gives every thread its run of output slots, and each thread writes its keys'
   indices there (deterministic, thread-major order); the unused slots get -1.

Rows longer than a CTA's shared memory holds (32768 keys, 128 KB), when there are many of
them (>= 128 rows), stream through one CTA each (``TopKConfig.stream``, ``_emit_stream``): a
histogram sweep of the row from global memory, then a second sweep that compacts the keys at or
above the k-th key's top-digit bucket (a few thousand for k = 2048) into shared memory, where
steps 2-3 finish; a crowded bucket that does not fit falls back to running them over global
memory. Few long rows (decode) are instead split into segments of equal length, one CTA
each: each segment writes its own top-k as (index, logit) candidates, and the same kernel,
reading candidates instead of logits ("indirect" mode: the index of a candidate is the one
stored beside it, -1 for none), selects the top-k of the candidates.
This is exact: every key of the row's top-k (with the tie rule) is in its segment's top-k.
Rows are not split further to give few rows (decode) more SMs: on the H200 the extra merge
launch cost more than it saved (kernel time; 1 x 32768: 13.5 us unsplit vs 16.4 us as
4 x 8192 plus a merge; 64 x 32768: 17.0 vs 22.9 us; 1 x 131072: 24.6 us as 4 x 32768 vs
27.6 us as 16 x 8192 and two merges; benchmarks/NOTES.md).

Rows whose valid range holds at most k keys list them in ascending index, then -1, without
reading a logit (in the unsplit, direct case).

Per-lane scatter (histogram adds, index writes) and scans are not expressible in Pallas'
array-level Mosaic GPU code (jax 0.11.2), so the per-thread body is emitted through
``plgpu.inline_mgpu`` (see ``_mlir``). GPU interpret mode refuses ``inline_mgpu``: under
``interpret`` the kernel runs the same passes as value-level jnp (``_segment_values``) in
the same Pallas kernel shell, so CPU tests check the algorithm, the segment plan and the
merge; CUDA cross-lowering checks that the per-thread code builds; the GPU tests check the
kernel itself.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import _mlir as m

_SEGMENT_MAX = 32768          # keys a CTA holds in shared memory (128 KB)
_HIST = 2048                  # bins of an 11-bit digit
# Streaming rows (TopKConfig.stream): candidates held in shared memory, and the fewest rows
# for which streaming beats segments plus a merge. H200 kernel times (benchmarks/NOTES.md):
# 8192 x 65536 1.71 ms streamed (8192 candidates, 256 threads) vs 2.16 as segments + merge;
# 128 x 131072 0.065 (512 threads) vs 0.094; 64 x 131072 0.055 vs 0.049; 32 x 65536 0.029
# vs 0.026. 4096 candidates measured 2% faster at 8192 rows but leave less room for crowded
# buckets (k = 2048 needs at least ~3000); 512 threads win below ~1024 rows (more warps in
# flight per row when the GPU has few rows), 256 above.
_STREAM_CANDIDATES, _STREAM_MIN_ROWS, _STREAM_WIDE_BELOW = 8192, 128, 1024
# (shift, bits) of the three digits of a 32-bit key, most significant first.
_DIGITS = ((21, 11), (10, 11), (0, 10))
# misc scratch (int32 words): per-warp scan totals, the scan's result, the stream's overflow flag.
_WTOT, _RES, _FLAG, _MISC = 0, 32, 36, 40


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _round_up(a: int, b: int) -> int:
  return _cdiv(a, b) * b


@dataclasses.dataclass(frozen=True)
class TopKConfig:
  """Static shape of one launch.

  Attributes:
    segment: keys per CTA (a multiple of 4); a row of S keys runs as ceil(S / segment)
      segments, whose candidates a further launch merges.
    warpgroups: 128-thread warpgroups per CTA.
    load_unroll: 16-byte loads a thread keeps in flight in the load sweep.
    pass_unroll: shared-memory vectors a thread handles per step of the other sweeps.
    stop_after: profiling only: 0 runs everything; 1-4 stop after the load, the first scan,
      the digit passes or the count (the output is then left unwritten).
    stream: one CTA per row of any length, read twice from global memory (see
      ``_emit_stream``); ``segment`` is then the shared-memory capacity for the candidates
      (keys at or above the k-th key's top-digit bucket), a multiple of 4 x threads.
  """

  segment: int
  warpgroups: int
  load_unroll: int = 8
  pass_unroll: int = 4
  stop_after: int = 0
  stream: bool = False

  def __post_init__(self):
    if self.segment < 4 or self.segment % 4 or self.segment > _SEGMENT_MAX:
      raise ValueError(f"segment must be a multiple of 4 in [4, {_SEGMENT_MAX}], got "
                       f"{self.segment}")
    if self.warpgroups not in (1, 2, 4):
      raise ValueError(f"warpgroups must be 1, 2 or 4, got {self.warpgroups}")
    if self.stream and self.segment % (4 * self.threads):
      raise ValueError(f"a streaming config needs segment a multiple of {4 * self.threads}, "
                       f"got {self.segment}")

  @property
  def threads(self) -> int:
    return 128 * self.warpgroups

  @classmethod
  def default(cls, rows: int, num_keys: int, k: int) -> "TopKConfig":
    """As few segments of <= 32768 keys as the row needs, of equal length (a multiple of
    1024). 512 threads for segments above 8192 keys, 256 above 2048, else 128 (measured:
    8192 x 4096 merge-shaped rows 0.163 ms with 256 threads vs 0.197 with 128). ``rows`` and
    ``k`` do not change the choice today (splitting few rows further measured slower)."""
    del rows, k
    nseg = _cdiv(num_keys, _SEGMENT_MAX)
    seg = _round_up(_cdiv(num_keys, nseg), 1024 if num_keys > 1024 else 4)
    seg = min(seg, _SEGMENT_MAX)
    wg = 4 if seg > 8192 else 2 if seg > 2048 else 1
    return cls(segment=seg, warpgroups=wg)


def plan(rows: int, num_keys: int, k: int) -> list[tuple[int, TopKConfig]]:
  """The launches for rows of ``num_keys`` keys: [(keys per row, config)], the first reading
  logits, each later one the previous one's candidates (segments x k of them).

  Rows longer than a CTA's shared memory stream through one CTA each (two reads of the row,
  no merge) when there are enough rows to fill the GPU; few long rows (decode) split into
  segments, which gives one row several SMs."""
  if num_keys > _SEGMENT_MAX and rows >= _STREAM_MIN_ROWS and k * 4 <= _STREAM_CANDIDATES:
    wg = 4 if rows < _STREAM_WIDE_BELOW else 2
    return [(num_keys, TopKConfig(segment=_STREAM_CANDIDATES, warpgroups=wg, stream=True))]
  levels = []
  n = num_keys
  while True:
    cfg = TopKConfig.default(rows, n, k)
    levels.append((n, cfg))
    nseg = _cdiv(n, cfg.segment)
    if nseg == 1:
      return levels
    n = nseg * k


def unsupported_reason(num_keys: int, k: int) -> str | None:
  """None when the kernel takes rows of ``num_keys`` keys and this ``k``, else why not."""
  if num_keys < 1 or k < 1:
    return f"need S >= 1 and k >= 1, got S={num_keys}, k={k}"
  if num_keys >= 2**31 - _SEGMENT_MAX:
    return f"S={num_keys} keys: int32 key positions would overflow"
  if k > _SEGMENT_MAX // 4 and num_keys > _SEGMENT_MAX:
    return f"k={k} > {_SEGMENT_MAX // 4} with rows longer than {_SEGMENT_MAX} keys"
  return None


# ------------------------------------------------------------------------ the per-thread code
def _sortable(bits):
  """uint32 key of float32 ``bits`` (i32): NaN as -inf, -0.0 as +0.0, order-preserving."""
  mag = m.band(bits, m.c(0x7FFFFFFF))
  bits = m.select(m.ugt(mag, m.c(0x7F800000)), m.c(0xFF800000), bits)
  bits = m.select(m.eq(mag, m.c(0)), m.c(0), bits)
  # Negative: flip every bit; positive: set the sign bit.
  return m.bxor(bits, m.bor(m.sar(bits, 31), m.c(0x80000000)))


def _unsortable(key):
  """float32 bits of a valid key (the inverse of ``_sortable`` on its image)."""
  pos = m.ne(m.band(key, m.c(0x80000000)), m.c(0))
  return m.select(pos, m.band(key, m.c(0x7FFFFFFF)), m.bnot(key))


def _emit_segment(ks, ke, x, cidx, out_idx, out_val, keys, cand_idx, hist, misc, s_idx, r_idx,
                  *, S, k, cfg: TopKConfig, direct: bool, final: bool):
  """The whole per-segment select, as per-thread code (see the module docstring)."""
  nt = cfg.threads
  seg = S if cfg.stream else cfg.segment
  nseg = _cdiv(S, seg)
  t = m.thread_id()
  r, s = r_idx, s_idx

  x_p = m.global_ptr(x)
  ci_p = None if direct else m.global_ptr(cidx)
  oi_p = m.global_ptr(out_idx)
  ov_p = None if final else m.global_ptr(out_val)
  row64 = m.mul(m.to_i64(r), m.c(S, m.i64()))          # row offset, in elements
  out_w = k if final else nseg * k
  obase64 = m.add(m.mul(m.to_i64(r), m.c(out_w, m.i64())),
                  m.to_i64(m.mul(s, m.c(k))))          # this segment's first output slot

  seg_lo = m.mul(s, m.c(seg))
  seg_hi = m.smin(m.add(seg_lo, m.c(seg)), m.c(S))
  if direct:
    ksv = m.ld_global(m.gep(m.global_ptr(ks), r))
    kev = m.ld_global(m.gep(m.global_ptr(ke), r))
    lo_i = m.smin(m.smax(ksv, m.c(0)), m.c(S))
    hi_i = m.smin(m.smax(kev, lo_i), m.c(S))
  else:
    lo_i, hi_i = m.c(0), m.c(S)
  lo = m.smax(lo_i, seg_lo)
  hi = m.smax(m.smin(hi_i, seg_hi), lo)
  n = m.sub(hi, lo)

  def out_slot(j):
    return m.add(obase64, m.to_i64(j))

  if direct and final:
    # At most k valid keys: all of them, ascending, then -1; no logit is read.
    with m.when(m.sle(n, m.c(k))):
      def few(j, _):
        v = m.select(m.slt(j, n), m.add(lo, j), m.c(-1))
        m.st_global(m.gep(oi_p, out_slot(j)), v)
        return []
      m.for_range(t, m.c(k), nt, [], few)
    go = m.sgt(n, m.c(k))
  else:
    # Segments and merges keep their <= k valid keys through the general path (with values).
    go = m.sgt(m.c(seg), m.c(0))

  with m.when(go):
    blk = _Block(t, nt, m.ptr(hist), m.ptr(misc), cfg)
    glob = _global_source(blk, x_p, ci_p, row64, seg_lo, lo, hi, S=S, direct=direct)
    out = (oi_p, ov_p, out_slot)
    if cfg.stream:
      _emit_stream(blk, glob, m.ptr(keys), m.ptr(cand_idx), out, k=k)
    else:
      _emit_select(blk, glob, m.ptr(keys), out, k=k)


class _Block:
  """The block-wide pieces every sweep shares: thread ids, the two histogram buffers in shared
  memory, vector loops over a source, and block scans."""

  def __init__(self, t, nt, hist_p, misc_p, cfg):
    self.t, self.nt, self.nw, self.cfg = t, nt, nt // 32, cfg
    self.lane, self.warp = m.band(t, m.c(31)), m.shr(t, 5)
    self.hist_p, self.misc_p = hist_p, misc_p

  def hist_at(self, buf, d):
    return m.gep(self.hist_p, m.add(m.c(buf * _HIST), d))

  def zero_hist(self, buf):
    for j in range(_HIST // self.nt):
      m.st_shared(self.hist_at(buf, m.add(self.t, m.c(j * self.nt))), m.c(0))

  def vec_loop(self, src, unroll, carry, body, *, warp_uniform=False):
    """body(v_clamped, in_range, carry) -> carry for each of this thread's 4-key vectors of
    ``src`` (thread t takes vectors v_lo + t + j * nt). ``warp_uniform``: every lane of a warp
    runs the same iterations (lanes past the end see in_range false), for warp votes."""
    nt = self.nt

    def step(vb, c):
      if warp_uniform:
        vb = m.add(vb, self.lane)
      vs = [m.add(vb, m.c(u * nt)) for u in range(unroll)]
      ins = [m.slt(v, src.v_hi) for v in vs]
      vcs = [m.select(p, v, src.v_lo) for v, p in zip(vs, ins)]
      return body(vcs, ins, c)
    first = m.shl(self.warp, 5) if warp_uniform else self.t
    return m.for_range(m.add(src.v_lo, first), src.v_hi, nt * unroll, carry, step)

  def block_scan(self, x, from_top):
    """(exclusive scan, block total) of one i32 per thread over the block, in thread order
    (``from_top``: the sum over higher threads, a suffix scan): warp shuffles, then the
    per-warp totals through shared memory (one barrier)."""
    lane, warp = self.lane, self.warp
    incl = x
    for d in (1, 2, 4, 8, 16):
      if from_top:
        y = m.shfl_down(incl, d)
        incl = m.select(m.slt(m.add(lane, m.c(d)), m.c(32)), m.add(incl, y), incl)
      else:
        y = m.shfl_up(incl, d)
        incl = m.select(m.sge(lane, m.c(d)), m.add(incl, y), incl)
    m.st_shared(m.gep(self.misc_p, m.add(m.c(_WTOT), warp)), incl,
                pred=m.eq(lane, m.c(0 if from_top else 31)))
    m.barrier()
    total, other = m.c(0), m.c(0)
    for w in range(self.nw):
      tw = m.ld_shared(m.gep(self.misc_p, m.c(_WTOT + w)))
      total = m.add(total, tw)
      past = m.sgt(m.c(w), warp) if from_top else m.slt(m.c(w), warp)
      other = m.add(other, m.select(past, tw, m.c(0)))
    return m.add(other, m.sub(incl, x)), total

  def scan(self, buf, nbins, krem, zero_next):
    """(bucket, keys above it, keys in it, total) for the k_rem-th largest of hist[buf]."""
    t, misc_p = self.t, self.misc_p
    bpt = nbins // self.nt
    base = m.mul(t, m.c(bpt))
    hs = [m.ld_shared(self.hist_at(buf, m.add(base, m.c(j)))) for j in range(bpt)]
    own = hs[0]
    for h in hs[1:]:
      own = m.add(own, h)
    above, total = self.block_scan(own, from_top=True)
    for j in reversed(range(bpt)):
      h = hs[j]
      hit = m.land(m.slt(above, krem), m.sle(krem, m.add(above, h)))
      m.st_shared(m.gep(misc_p, m.c(_RES)), m.add(base, m.c(j)), pred=hit)
      m.st_shared(m.gep(misc_p, m.c(_RES + 1)), above, pred=hit)
      m.st_shared(m.gep(misc_p, m.c(_RES + 2)), h, pred=hit)
      above = m.add(above, h)
    if zero_next is not None:
      self.zero_hist(zero_next)
    m.barrier()
    res = [m.ld_shared(m.gep(misc_p, m.c(_RES + i))) for i in range(3)]
    return res + [total]


@dataclasses.dataclass
class _Source:
  """Where a sweep reads keys: 4-key vectors ``v_lo <= v < v_hi``; ``keys4(vc, p)`` the four
  sortable keys of vector vc (0 where invalid or ``p`` is false); ``nidx(vc, e, need)`` the tie
  order ~index of key (vc, e), read only where ``need``; ``index(vc, e, sel)`` its output
  index, read only where ``sel``. Global sources also have ``raw(vc)``: the vector's loads,
  issued before any of them is used (``keys4(vc, p, raw)`` then converts them)."""
  v_lo: object
  v_hi: object
  keys4: object
  nidx: object
  index: object
  raw: object = None


def _global_source(blk, x_p, ci_p, row64, seg_lo, lo, hi, *, S, direct):
  """Keys of this segment's part of [lo, hi), read from global memory (logits, or the
  candidates of a merge level) and made sortable on the fly."""
  vec_in = 4 if S % 4 == 0 else 1        # 16-byte global loads need 16-byte aligned rows
  v_lo = m.shr(m.sub(lo, seg_lo), 2)                    # 4-key vectors, segment-local
  # An empty range must not visit the vector holding lo: lo may lie past this segment.
  v_hi = m.select(m.sgt(hi, lo), m.shr(m.add(m.sub(hi, seg_lo), m.c(3)), 2), v_lo)
  n = m.sub(hi, lo)

  def load_vec(base_p, vc):
    """The 4 words of segment-local vector ``vc`` of a row of ``base_p`` (clamped in-row)."""
    pos = m.add(seg_lo, m.shl(vc, 2))
    if vec_in == 4:
      return list(m.ld_global_v4(m.gep(base_p, m.add(row64, m.to_i64(pos)))))
    out = []
    for e in range(4):
      pe = m.smin(m.add(pos, m.c(e)), m.c(S - 1))
      out.append(m.ld_global(m.gep(base_p, m.add(row64, m.to_i64(pe)))))
    return out

  def pos_of(vc, e):
    return m.add(seg_lo, m.add(m.shl(vc, 2), m.c(e)))

  def raw(vc):
    return (load_vec(x_p, vc), None if direct else load_vec(ci_p, vc))

  def keys4(vc, p, loaded=None):
    vals, cid = raw(vc) if loaded is None else loaded
    out = []
    for e in range(4):
      valid = m.land(p, m.ult(m.sub(pos_of(vc, e), lo), n))      # lo <= pos < hi
      if not direct:
        valid = m.land(valid, m.sge(cid[e], m.c(0)))
      out.append(m.select(valid, _sortable(vals[e]), m.c(0)))
    return out

  def index(vc, e, sel):
    pos = pos_of(vc, e)
    if direct:
      return pos
    return m.ld_global_if(m.gep(ci_p, m.add(row64, m.to_i64(m.smin(pos, m.c(S - 1))))), sel)

  def nidx(vc, e, need):
    return m.bnot(index(vc, e, need))

  return _Source(v_lo, v_hi, keys4, nidx, index, raw)


def _smem_source(keys_p, v_lo, v_hi, index):
  """Keys already sortable in shared memory (0 = no key), vectors [v_lo, v_hi)."""
  def keys4(vc, p):
    del p                                   # vc is clamped in range; p is tested by the sweeps
    return list(m.ld_shared_v4(m.gep(keys_p, m.shl(vc, 2))))
  return _Source(v_lo, v_hi, keys4, lambda vc, e, need: m.bnot(index(vc, e, need)), index)


def _first_state(k, scan0):
  """The select's state (M1, P1, M2, P2, k_rem, done) after the top digit's scan."""
  sh0, bits0 = _DIGITS[0]
  b0, above0, cnt0, total = scan0
  few = m.sle(total, m.c(k))
  krem0 = m.sub(m.c(k), above0)
  zero = m.c(0)
  return [m.select(few, zero, m.c(((1 << bits0) - 1) << sh0)),
          m.select(few, zero, m.shl(b0, sh0)), zero, zero,
          m.select(few, total, krem0),
          m.lor(few, m.eq(cnt0, krem0))]


def _hist_sweep(blk, glob, keys_p=None):
  """One sweep of ``glob`` from global memory: the top digit's histogram into hist[0] and,
  given ``keys_p``, the sortable keys into shared memory (0 where invalid)."""
  sh0, _ = _DIGITS[0]

  def body(vcs, ins, c):
    loaded = [glob.raw(vc) for vc in vcs]                 # all loads issued first
    for vc, p, ld in zip(vcs, ins, loaded):
      kv = glob.keys4(vc, p, ld)
      for e in range(4):
        m.red_shared_add(blk.hist_at(0, m.shr(kv[e], sh0)), m.c(1), pred=m.ne(kv[e], m.c(0)))
      if keys_p is not None:
        m.st_shared_v4(m.gep(keys_p, m.shl(vc, 2)), kv, p)
    return c

  blk.vec_loop(glob, blk.cfg.load_unroll, [], body)


def _emit_select(blk, glob, keys_p, out, *, k):
  """A segment held in shared memory: one load sweep from global memory (keys to shared
  memory, top-digit histogram), then every other sweep over shared memory."""
  cfg = blk.cfg
  blk.zero_hist(0)
  m.barrier()
  _hist_sweep(blk, glob, keys_p)
  m.barrier()
  if cfg.stop_after == 1:
    return
  scan0 = blk.scan(0, _HIST, m.c(k), zero_next=1)
  if cfg.stop_after == 2:
    return
  src = _smem_source(keys_p, glob.v_lo, glob.v_hi, glob.index)
  _emit_tail(blk, src, _first_state(k, scan0), out, k=k)


def _emit_stream(blk, glob, keys_p, cid_p, out, *, k):
  """A whole row streamed from global memory twice (``TopKConfig.stream``): a histogram
  sweep of the top digit, then a sweep that compacts the keys at or above the k-th key's
  bucket (k or a few thousand) into shared memory, where the rest of the select runs. Each
  warp appends to its own region in lane order (ballots), so the candidates' places, and the
  output's order, are deterministic. When they do not fit (a crowded bucket: ties, narrow
  rows), the rest of the select reads the row from global memory instead."""
  cfg, t, nt = blk.cfg, blk.t, blk.nt
  cap = cfg.segment
  per_warp = cap // blk.nw
  sh0, _ = _DIGITS[0]
  blk.zero_hist(0)
  for j in range(cap // nt):
    m.st_shared(m.gep(keys_p, m.add(t, m.c(j * nt))), m.c(0))
  m.st_shared(m.gep(blk.misc_p, m.c(_FLAG)), m.c(0), pred=m.eq(t, m.c(0)))
  m.barrier()
  _hist_sweep(blk, glob)
  m.barrier()
  scan0 = blk.scan(0, _HIST, m.c(k), zero_next=1)
  b0, above0, cnt0, _ = scan0
  fits = m.sle(m.add(above0, cnt0), m.c(cap))
  region = m.mul(blk.warp, m.c(per_warp))
  below = m.lanemask_lt()

  with m.when(fits):
    def compact_body(vcs, ins, c):
      (cnt,) = c
      loaded = [glob.raw(vc) for vc in vcs]
      for vc, p, ld in zip(vcs, ins, loaded):
        kv = glob.keys4(vc, p, ld)
        for e in range(4):
          key = kv[e]
          sel = m.land(m.ne(key, m.c(0)), m.uge(m.shr(key, sh0), b0))
          votes = m.ballot(sel)
          slot = m.add(cnt, m.popc(m.band(votes, below)))
          ok = m.land(sel, m.slt(slot, m.c(per_warp)))
          at = m.add(region, slot)
          m.st_shared(m.gep(keys_p, at), key, pred=ok)
          m.st_shared(m.gep(cid_p, at), glob.index(vc, e, ok), pred=ok)
          cnt = m.add(cnt, m.popc(votes))
      return [cnt]

    (cnt,) = blk.vec_loop(glob, cfg.load_unroll, [m.c(0)], compact_body, warp_uniform=True)
    m.st_shared(m.gep(blk.misc_p, m.c(_FLAG)), m.c(1),
                pred=m.land(m.sgt(cnt, m.c(per_warp)), m.eq(blk.lane, m.c(0))))
  m.barrier()
  ok = m.land(fits, m.eq(m.ld_shared(m.gep(blk.misc_p, m.c(_FLAG))), m.c(0)))
  state0 = _first_state(k, scan0)

  def cand_index(vc, e, sel):
    del sel
    return m.ld_shared(m.gep(cid_p, m.add(m.shl(vc, 2), m.c(e))))

  cand = _smem_source(keys_p, m.c(0), m.c(cap // 4), cand_index)

  def tail(src):
    _emit_tail(blk, src, state0, out, k=k)
    return []

  m.if_else(ok, lambda: tail(cand), lambda: tail(glob), [])


def _emit_tail(blk, src, state, out, *, k):
  """The select after the top digit's scan: the remaining digit passes (keys, then ~index for
  ties) while the k-th key's bucket is not exact, then count, scan, write and -1 fill."""
  cfg = blk.cfg
  t, nt = blk.t, blk.nt
  oi_p, ov_p, out_slot = out

  def digit_pass(state, on_idx, shift, bits, buf):
    M1, P1, M2, P2, krem, done = state

    def body(vcs, ins, c):
      kvs = [src.keys4(vc, p) for vc, p in zip(vcs, ins)]
      for vc, p, kv in zip(vcs, ins, kvs):
        for e in range(4):
          key = kv[e]
          match = m.land(p, m.land(m.ne(key, m.c(0)), m.eq(m.band(key, M1), P1)))
          if on_idx:
            ni = src.nidx(vc, e, match)
            match = m.land(match, m.eq(m.band(ni, M2), P2))
            val = ni
          else:
            val = key
          d = m.band(m.shr(val, shift), m.c((1 << bits) - 1))
          m.red_shared_add(blk.hist_at(buf, d), m.c(1), pred=match)
      return c

    blk.vec_loop(src, cfg.pass_unroll, [], body)
    m.barrier()
    b, above, cnt, _ = blk.scan(buf, 1 << bits, krem, zero_next=1 - buf)
    mask = m.c(((1 << bits) - 1) << shift)
    pre = m.shl(b, shift)
    krem2 = m.sub(krem, above)
    done2 = m.eq(cnt, krem2)
    if on_idx:
      return [M1, P1, m.bor(M2, mask), m.bor(P2, pre), krem2, done2]
    return [m.bor(M1, mask), m.bor(P1, pre), M2, P2, krem2, done2]

  buf = 1
  for on_idx, (shift, bits) in [(False, d) for d in _DIGITS[1:]] + [(True, d) for d in _DIGITS]:
    st = state
    state = m.if_else(m.lnot(st[5]),
                      lambda st=st, on_idx=on_idx, shift=shift, bits=bits, buf=buf:
                      digit_pass(st, on_idx, shift, bits, buf),
                      lambda st=st: st, [v.type for v in st])
    buf = 1 - buf
  M1, P1, M2, P2, _, _ = state
  if cfg.stop_after == 3:
    return

  def chosen(key, vc, e, p, ties):
    """Whether key (vc, e) is in the top-k; ``ties``: the index prefix (M2, P2) is in play
    (else every key of the final bucket is chosen, and no index is needed)."""
    km = m.band(key, M1)
    if not ties:
      return m.land(p, m.land(m.ne(key, m.c(0)), m.uge(km, P1)))
    above = m.ugt(km, P1)
    at = m.land(p, m.land(m.ne(key, m.c(0)), m.eq(km, P1)))
    tie_ok = m.uge(m.band(src.nidx(vc, e, at), M2), P2)
    return m.land(p, m.land(m.ne(key, m.c(0)), m.lor(above, m.land(at, tie_ok))))

  def uniform(fn, carry):
    """fn(ties) with the index prefix in play or not: one branch for the whole block."""
    return m.if_else(m.eq(M2, m.c(0)), lambda: fn(False), lambda: fn(True),
                     [v.type for v in carry])

  # Count, one block-wide exclusive scan, then each thread's run of output slots.
  def count(ties):
    def body(vcs, ins, c):
      (cnt,) = c
      kvs = [src.keys4(vc, p) for vc, p in zip(vcs, ins)]
      for vc, p, kv in zip(vcs, ins, kvs):
        for e in range(4):
          cnt = m.add(cnt, m.as_i32(chosen(kv[e], vc, e, p, ties)))
      return [cnt]
    return blk.vec_loop(src, cfg.pass_unroll, [m.c(0)], body)

  (mine,) = uniform(count, [m.c(0)])
  start, n_sel = blk.block_scan(mine, from_top=False)
  if cfg.stop_after == 4:
    return

  def write(ties):
    def body(vcs, ins, c):
      (slot,) = c
      kvs = [src.keys4(vc, p) for vc, p in zip(vcs, ins)]
      for vc, p, kv in zip(vcs, ins, kvs):
        for e in range(4):
          sel = m.land(chosen(kv[e], vc, e, p, ties), m.slt(slot, m.c(k)))
          m.st_global(m.gep(oi_p, out_slot(slot)), src.index(vc, e, sel), pred=sel)
          if ov_p is not None:
            m.st_global(m.gep(ov_p, out_slot(slot)), _unsortable(kv[e]), pred=sel)
          slot = m.add(slot, m.as_i32(sel))
      return [slot]
    return blk.vec_loop(src, cfg.pass_unroll, [start], body)

  uniform(write, [start])

  def fill(j, _):
    m.st_global(m.gep(oi_p, out_slot(j)), m.c(-1))
    if ov_p is not None:
      m.st_global(m.gep(ov_p, out_slot(j)), m.c(0xFF800000))
    return []

  m.for_range(m.add(m.smin(n_sel, m.c(k)), t), m.c(k), nt, [], fill)


# ---------------------------------------------------------------- value-level stand-in (CPU)
def _segment_values(xs, ci, lo, hi, seg_lo, *, k):
  """The same passes on one segment's values (jnp): (indices [k], logits [k]).

  ``xs``: f32 [seg] logits (or candidate logits), ``ci``: i32 [seg] candidate indices (None
  when direct), ``[lo, hi)``: the valid range in row positions, ``seg_lo``: the position of
  ``xs[0]``. Chosen indices come in ascending position order (the kernel's order differs;
  the set is the same).
  """
  u32 = jnp.uint32
  seg = xs.shape[0]
  pos = seg_lo + jnp.arange(seg, dtype=jnp.int32)
  valid = (pos >= lo) & (pos < hi)
  if ci is not None:
    valid &= ci >= 0
  bits = lax.bitcast_convert_type(xs, u32)
  mag = bits & u32(0x7FFFFFFF)
  bits = jnp.where(mag > u32(0x7F800000), u32(0xFF800000), bits)
  bits = jnp.where(mag == 0, u32(0), bits)
  key = jnp.where((bits >> 31) == 1, ~bits, bits | u32(0x80000000))
  key = jnp.where(valid, key, u32(0))
  nidx = ~(pos if ci is None else ci).astype(u32)

  def digit(val, match, shift, bits_, krem):
    nb = 1 << bits_
    d = ((val >> shift) & u32(nb - 1)).astype(jnp.int32)
    h = jnp.zeros((nb,), jnp.int32).at[d].add(match.astype(jnp.int32))
    above_incl = jnp.cumsum(h[::-1])[::-1]            # keys in bins >= b
    above_excl = above_incl - h
    hit = (above_excl < krem) & (krem <= above_incl)
    b = jnp.argmax(hit).astype(jnp.int32)
    return b, above_excl[b], h[b], jnp.sum(h)

  sh0, b0bits = _DIGITS[0]
  b, above, cnt, total = digit(key, key != 0, sh0, b0bits, jnp.int32(k))
  few = total <= k
  krem = jnp.where(few, total, k - above)
  M1 = jnp.where(few, u32(0), u32(((1 << b0bits) - 1) << sh0))
  P1 = jnp.where(few, u32(0), b.astype(u32) << sh0)
  M2 = P2 = u32(0)
  done = few | (cnt == krem)
  for on_idx, (shift, bits_) in [(False, d) for d in _DIGITS[1:]] + [(True, d) for d in _DIGITS]:
    match = (key != 0) & ((key & M1) == P1)
    if on_idx:
      match &= (nidx & M2) == P2
    b, above, cnt, _ = digit(nidx if on_idx else key, match, shift, bits_, krem)
    mask, pre = u32(((1 << bits_) - 1) << shift), b.astype(u32) << shift
    krem2 = krem - above
    if on_idx:
      M2, P2 = jnp.where(done, M2, M2 | mask), jnp.where(done, P2, P2 | pre)
    else:
      M1, P1 = jnp.where(done, M1, M1 | mask), jnp.where(done, P1, P1 | pre)
    done2 = cnt == krem2
    krem = jnp.where(done, krem, krem2)
    done = done | done2
  km = key & M1
  sel = (key != 0) & ((km > P1) | ((km == P1) & ((nidx & M2) >= P2)))
  (where,) = jnp.nonzero(sel, size=k, fill_value=seg)
  ok = where < seg
  wc = jnp.minimum(where, seg - 1)
  idx = jnp.where(ok, pos[wc] if ci is None else ci[wc], -1)
  val = jnp.where(ok, xs[wc], -jnp.inf)
  return idx.astype(jnp.int32), val.astype(jnp.float32)


# ----------------------------------------------------------------------------------- launch
def _launch(x, cidx, ks, ke, *, k, cfg: TopKConfig, final: bool, interpret: bool):
  """One level: [R, S] logits (or candidates) -> [R, k] indices, or [R, nseg * k] candidate
  (indices, logits) when the row runs as several segments."""
  R, S = x.shape
  seg = S if cfg.stream else cfg.segment     # keys a CTA selects from
  nseg = _cdiv(S, seg)
  direct = cidx is None
  assert not final or nseg == 1
  assert not cfg.stream or (direct and final)
  cap = cfg.segment                           # shared-memory keys (segment or candidates)
  out_w = k if final else nseg * k
  out_type = [jax.ShapeDtypeStruct((R, out_w), jnp.int32)]
  if not final:
    out_type.append(jax.ShapeDtypeStruct((R, out_w), jnp.float32))
  n_in = 3 if direct else 4

  def body(*refs):
    ins, outs, scratch = refs[:n_in], refs[n_in:n_in + len(out_type)], refs[n_in + len(out_type):]
    if direct:
      ks_ref, ke_ref, x_ref = ins
      ci_ref = None
    else:
      ks_ref, ke_ref, x_ref, ci_ref = ins
    oi_ref = outs[0]
    ov_ref = outs[1] if not final else None
    keys_ref, cand_ref, hist_ref, misc_ref = scratch
    s_idx = lax.axis_index("s")
    r_idx = lax.axis_index("r")
    if interpret:
      _interpret_body(ks_ref, ke_ref, x_ref, ci_ref, oi_ref, ov_ref, s_idx, r_idx, S=S, k=k,
                      seg=seg, nseg=nseg, final=final)
      return
    refs_in = [ks_ref, ke_ref, x_ref] + ([] if direct else [ci_ref])
    refs_out = [oi_ref] + ([] if final else [ov_ref])
    arg_types = ([plgpu.RefType()] * (len(refs_in) + len(refs_out) + 4)
                 + [plgpu.Layout.WG_SPLAT] * 2)

    @plgpu.inline_mgpu(arg_types=tuple(arg_types))
    def _(ctx, *args):
      a = list(args)
      ks_, ke_, x_ = a[:3]
      ci_ = None if direct else a[3]
      o = a[len(refs_in):len(refs_in) + len(refs_out)]
      keys_, cand_, hist_, misc_ = a[len(refs_in) + len(refs_out):-2]
      s_, r_ = (v.registers.item() for v in a[-2:])
      _emit_segment(ks_, ke_, x_, ci_, o[0], None if final else o[1], keys_, cand_, hist_, misc_,
                    s_, r_, S=S, k=k, cfg=cfg, direct=direct, final=final)

    _(*refs_in, *refs_out, keys_ref, cand_ref, hist_ref, misc_ref, s_idx, r_idx)

  operands = [ks, ke, x] + ([] if direct else [cidx])
  return plgpu.kernel(
      body,
      out_type=out_type[0] if final else tuple(out_type),
      grid=(nseg, R),                 # rows on CUDA's x axis (no 65535 limit)
      grid_names=("s", "r"),
      num_threads=None if interpret else cfg.warpgroups,
      thread_name=None if interpret else "wg",
      scratch_types=[plgpu.SMEM((cap,), jnp.int32),
                     plgpu.SMEM((cap if cfg.stream else 4,), jnp.int32),
                     plgpu.SMEM((2 * _HIST,), jnp.int32),
                     plgpu.SMEM((_MISC + 8,), jnp.int32)],
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name="nsa_topk",
  )(*operands)


def _interpret_body(ks_ref, ke_ref, x_ref, ci_ref, oi_ref, ov_ref, s_idx, r_idx, *, S, k, seg,
                    nseg, final):
  direct = ci_ref is None
  seg_lo = s_idx * seg
  if direct:
    lo_i = jnp.clip(ks_ref[r_idx], 0, S)
    hi_i = jnp.clip(ke_ref[r_idx], lo_i, S)
  else:
    lo_i, hi_i = jnp.int32(0), jnp.int32(S)
  pad = nseg * seg - S
  row = x_ref[r_idx]
  xs = lax.dynamic_slice(jnp.pad(row, (0, pad)), (seg_lo,), (seg,))
  ci = None
  if not direct:
    ci = lax.dynamic_slice(jnp.pad(ci_ref[r_idx], (0, pad), constant_values=-1), (seg_lo,),
                           (seg,))
  lo = jnp.maximum(lo_i, seg_lo)
  hi = jnp.maximum(jnp.minimum(hi_i, seg_lo + seg), lo)
  idx, val = _segment_values(xs, ci, lo, hi, seg_lo, k=k)
  if direct and final:
    n = hi - lo
    j = jnp.arange(k, dtype=jnp.int32)
    idx = jnp.where(n <= k, jnp.where(j < n, lo + j, -1), idx)
  if final:
    oi_ref[r_idx] = idx
  else:
    cur = oi_ref[r_idx]
    oi_ref[r_idx] = lax.dynamic_update_slice(cur, idx, (s_idx * k,))
    curv = ov_ref[r_idx]
    ov_ref[r_idx] = lax.dynamic_update_slice(curv, val, (s_idx * k,))


@functools.partial(jax.jit, static_argnames=("k", "interpret", "config", "ascending"))
def topk_indices(logits, ks, ke, *, k: int = 2048, interpret: bool = False,
                 config: TopKConfig | None = None, ascending: bool = False) -> jax.Array:
  """Per row, the indices of the k largest logits among keys in [ks, ke).

  Semantics are those of ``nsa_jax.reference.topk_indices`` (NaN ranks as -inf, every valid
  key above every invalid one, -1 fill, rows with <= k valid keys returned whole) except the
  order within a row, which is unspecified unless ``ascending``. The set follows the
  reference's tie rule: when the k-th largest key ties with the (k+1)-th, every key above it
  and then the lowest-index ties are chosen.

  Args:
    logits: float32 [T, S].
    ks, ke: int32 [T]; clamped to [0, S] (a row with ke <= ks has no valid key).
    k: static count, may exceed S.
    interpret: run the kernel shell in Pallas interpret mode with the value-level passes
      (CPU).
    config: static :class:`TopKConfig` for the first launch (the one reading logits);
      None picks ``TopKConfig.default``. Merges always use their defaults.
    ascending: list each row's indices in ascending order (one sort of the [T, k] result).

  Returns:
    int32 [T, k].
  """
  T, S = logits.shape
  why = unsupported_reason(S, k)
  if why:
    raise ValueError(f"topk kernel: {why}")
  levels = [cfg for _, cfg in plan(T, S, k)]
  if config is not None and config.stream:
    levels = [config]
  elif config is not None:
    nseg = _cdiv(S, config.segment)
    levels = [config] + ([cfg for _, cfg in plan(T, nseg * k, k)] if nseg > 1 else [])
  return _topk(logits, ks, ke, k=k, levels=tuple(levels), interpret=interpret,
               ascending=ascending)


def _topk(logits, ks, ke, *, k, levels, interpret=False, ascending=False):
  """``topk_indices`` with an explicit list of launch configs (the first reads logits)."""
  ks = ks.astype(jnp.int32)
  ke = ke.astype(jnp.int32)
  x, ci = logits.astype(jnp.float32), None
  for i, cfg in enumerate(levels):
    final = i == len(levels) - 1
    out = _launch(x, ci, ks, ke, k=k, cfg=cfg, final=final, interpret=interpret)
    if final:
      idx = out
    else:
      ci, x = out
  if ascending:
    # -1 (as uint32, the largest) sorts last.
    idx = lax.bitcast_convert_type(
        jnp.sort(lax.bitcast_convert_type(idx, jnp.uint32), axis=1), jnp.int32)
  return idx
