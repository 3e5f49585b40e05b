"""Pallas GPU (Triton) kernel: per-row top-k indices by an exact threshold search on counts.

Per row (one program each), for the keys in [ks, ke):
1. Each float logit maps to an order-preserving uint32 key (NaN ranks as -inf, -0.0 ties +0.0,
   as ``reference.sortable_keys``); keys outside the row's range become 0, below every valid
   key (the smallest valid key, that of -inf, is 0x007FFFFF).
2. A row with at most k valid keys writes them all (ascending index, then -1) without reading
   a single logit.
3. Otherwise the k-th largest key is found exactly by a bracket search: ``lo`` with
   count(key >= lo) >= k and ``hi`` with count(key >= hi) < k, starting from the row's min
   and max + 1. Two searches, picked statically by the config:
   Single-probe search (``probes`` = 1 and no compaction; the default for resident rows):
   each pass counts the keys >= one probe, placed where a straight line through
   (lo, count(lo)) and (hi, count(hi)) crosses k (regula falsi); a probe that fails to halve
   the bracket is followed by a plain bisection, so the search takes at most 64 passes,
   typically far fewer. No in-bracket min / max is taken. Resident rows use it because the
   multi-probe passes measured slower there (H100, k = 2048, normal logits, median of 20:
   8192 x 8192 0.71 ms with this search vs 0.85 / 1.22 / 1.20 ms multi-probe with P = 1 /
   2 / 4; 4096 x 32768 1.28 ms vs 1.64 / 2.69 / 2.53 ms): register sweeps are ALU-bound,
   so fewer passes do not pay for ~3 more instructions a key per probe.
   Multi-probe search (``probes`` > 1 or compaction; the default for streaming rows, where
   each pass re-reads the row from L2 / HBM):
   each pass over the row counts the keys >= each of ``P`` probes (8 for streaming
   rows) and, after a pass that left both counts unchanged, the min
   and max key inside the current bracket. The probes sit around where a straight
   line through (lo, count(lo)) and (hi, count(hi)) crosses k (regula falsi), at 1/4, 1/16,
   1/64, ... of the bracket either side; the new bracket is the tightest pair of probes around
   the threshold, then (when they were taken) snapped to the old bracket's min / max key (no
   count changes: no key lies in between), so a bracket that holds one distinct value closes
   within two passes (ties). A pass that
   fails to halve the bracket is followed by one centred on its middle, so the search takes at
   most ~64 passes; on normal, uniform or rounded data it takes 4-8 passes (the min/max pass
   included) at 8K-256K keys. Both searches stop early as soon as a probe counts exactly k
   keys (then no tie handling is needed).
   Candidate compaction (``compact`` = C, on for streaming rows): as soon as at most
   W = k + C (whole tiles) keys are >= lo, one pass copies those keys and their indices,
   ascending index, to a per-row scratch (an extra output, L2-resident while the row is
   worked on), and the search and the last pass go on over the scratch: the row itself is
   read 2-5 times plus that pass (N(0, 1) data, C = 2048) instead of 5-8 times plus the last.
4. A last pass writes the indices. Resident rows without a tie at the threshold (exactly k
   keys >= lo, the usual case): each thread counts its selected keys, one block-wide
   exclusive scan of those counts gives every thread its run of output slots, and the thread
   fills its run in its own key order (thread-major order). Otherwise (ties at lo, or a
   streaming row): an in-tile prefix sum per tile writes every key above the threshold
   (ascending index), then keys equal to it (ascending index) until k slots are filled.

Order and tie rule: the order of the k indices within a row is unspecified (thread-major for
resident rows without a tie, ascending index otherwise; ``ascending=True`` asks for ascending
index always, at the cost of the per-tile write on resident rows). The set is specified:
every key above the k-th largest, then, when the k-th and (k+1)-th largest keys tie, the
lowest-index tied keys until k are chosen (the xla backend picks the same set, in descending value
order). The selected set equals the reference's whenever values are distinct, and whenever
ties are broken by index. Rows with <= k valid keys list them in ascending index, then -1.

Two ways to hold the row, picked statically from S:
- resident (S <= ``_RESIDENT_MAX``): the row is loaded once as ``[tile / 4, 4]`` tiles kept in
  registers (one CTA of 16 warps at 32K keys: 64 keys a thread, one 16-byte vector per tile);
  the loads do not depend on ks / ke (the range is applied to the loaded keys), every pass
  reads registers only, and each count is summed within a thread's tile rows before one
  block-wide sum per pass.
- streaming (longer rows): each pass reads the row's tiles again (from L2 while the rows in
  flight fit it, else from HBM), looping over the tiles that overlap [ks, ke) only.

A single-probe pass costs ~3 instructions a key plus one block-wide sum. A multi-probe pass
costs ~3 instructions a key per probe (compare, select, add into per-lane counts packed
8 or 16 bits a probe), ~6 more when it takes the in-bracket min / max, and a few block-wide
sums (two probes' totals share one 32-bit sum when S < 2**16), so more probes trade ALU (it
matters for register-resident rows, hence one probe there) for fewer passes (it matters for
streaming ones); the kernel's time is (1 HBM read of the row) +
(number of passes) x (register or L2/HBM sweep); see
``benchmarks/NOTES.md`` for the floor and the measured figures.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

_U32 = jnp.uint32
_I32 = jnp.int32
_RESIDENT_MAX = 32768   # keys a row may hold in registers (16 warps x 32 threads x 64 keys)
_V = 4                  # keys a thread loads per resident tile: one 16-byte vector
_MAX_TILE = 1 << 15     # per-tile prefix sums pack two 16-bit counts into one int32

# jax 0.11 deprecates Pallas-Triton in favour of Mosaic GPU (warned at every lowering). This
# kernel needs Triton's scatter stores and in-register prefix sums, which Mosaic GPU's array
# level does not offer; the warning is silenced for this kernel's lowering only.
warnings.filterwarnings("ignore", message=r".*Pallas Triton backend is deprecated.*")


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _next_pow2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class TopKConfig:
  """Static shape of the kernel.

  Attributes:
    tile: keys per tile (a power of two <= 32768); one counting step handles one tile.
      Resident rows hold each tile as a [tile / 4, 4] register block (4 keys a thread row).
    resident: hold all ``ceil(S / tile)`` tiles in registers (else re-read them every pass).
    num_warps: warps per row-program.
    interpolate: probes around the regula-falsi estimate (else evenly spaced probes:
      multisection, ~32 / log2(P + 1) passes; plain bisection for the single-probe search).
    out_chunk: output slots written per step by the few-valid path (a power of two).
    probes: thresholds counted per pass (P); more probes shrink the bracket faster for ~3
      more instructions a key each. ``probes=1`` with ``compact=0`` runs the single-probe
      search (regula falsi / bisection, no in-bracket min / max; see the module docstring).
      None: 1 for resident rows (the only search they run), 8 for streaming ones.
    compact: candidate budget C (0: off). Once at most W = k + C (rounded up to whole
      tiles) keys remain >= lo, one pass copies them to a per-row scratch of W keys and
      indices, and the rest of the search and the write run over that scratch only.
  """

  tile: int
  resident: bool
  num_warps: int
  interpolate: bool = True
  out_chunk: int = 2048
  probes: int | None = None
  compact: int = 0

  def __post_init__(self):
    if self.probes is None:
      object.__setattr__(self, "probes", 1 if self.resident else 8)
    if self.tile < 1 or self.tile & (self.tile - 1) or self.tile > _MAX_TILE:
      raise ValueError(f"tile must be a power of two <= {_MAX_TILE}, got {self.tile}")
    if self.resident and (self.tile < _V or self.probes != 1 or self.compact):
      raise ValueError(f"resident rows take tile >= {_V}, probes=1 and compact=0 (the "
                       f"single-probe search over [tile/{_V}, {_V}] register tiles), got {self}")
    if self.compact < 0:
      raise ValueError(f"compact must be >= 0, got {self.compact}")
    if self.probes < 1:
      raise ValueError(f"probes must be >= 1, got {self.probes}")
    if self.out_chunk < 1 or self.out_chunk & (self.out_chunk - 1):
      raise ValueError(f"out_chunk must be a power of two, got {self.out_chunk}")

  @classmethod
  def default(cls, num_keys: int, k: int) -> "TopKConfig":
    """A register-resident row up to 32K keys (tiles of one 4-key row a thread: 8 warps up to
    8K keys, 16 warps above, i.e. 32-64 keys a thread), else a streaming row (8 probes a
    pass, candidate compaction with C = 2048)."""
    out_chunk = min(_next_pow2(k), 2048)
    width = _next_pow2(num_keys)
    if width <= _RESIDENT_MAX:
      # Measured on the H100 (benchmarks/NOTES.md): at 32K keys 16 warps x 64 keys beat
      # 32 x 32 (0.80 vs 0.83 ms); at 8K keys 8 warps beat 16 and 32.
      num_warps = 4 if width <= 2048 else 8 if width <= 8192 else 16
      return cls(tile=max(_V, min(width, 32 * _V * num_warps)), resident=True,
                 num_warps=num_warps, out_chunk=out_chunk)
    return cls(tile=8192, resident=False, num_warps=16, out_chunk=out_chunk, compact=2048)


def unsupported_reason(num_keys: int, k: int) -> str | None:
  """None when the kernel takes rows of ``num_keys`` keys and this ``k``, else why not."""
  if num_keys < 1 or k < 1:
    return f"need S >= 1 and k >= 1, got S={num_keys}, k={k}"
  if num_keys >= 2**31 - _MAX_TILE:
    return f"S={num_keys} keys: int32 key positions would overflow"
  return None


def _probe_offsets(P: int) -> list[float]:
  """Probe positions relative to the interpolated estimate, in bracket widths: +-4**-i."""
  if P == 1:
    return [0.0]
  h = P // 2
  return sorted([-(4.0 ** -i) for i in range(1, h + 1)] +
                [4.0 ** -i for i in range(1, P - h + 1)])


def _sortable_u32(x):
  """uint32 keys ordered like float32 x; NaN as -inf, -0.0 as +0.0 (see reference)."""
  x = jnp.where(jnp.isnan(x), -jnp.inf, x)
  x = jnp.where(x == 0.0, 0.0, x)
  u = lax.bitcast_convert_type(x, _U32)
  neg = (u >> 31) == 1
  return jnp.where(neg, ~u, u | _U32(0x80000000))


def _topk_kernel(ks_ref, ke_ref, x_ref, o_ref, sk_ref=None, si_ref=None, *, num_keys, k,
                 cfg: TopKConfig, ascending: bool = False, barrier: bool = True):
  S, tile = num_keys, cfg.tile
  n_tiles = pl.cdiv(S, tile)
  row = pl.program_id(0)
  # Clamped so that nothing outside [0, S) is ever addressed, whatever ks/ke hold.
  lo_i = jnp.clip(ks_ref[row], 0, S)
  hi_i = jnp.clip(ke_ref[row], lo_i, S)
  n_valid = hi_i - lo_i
  lane = lax.broadcasted_iota(_I32, (tile,), 0)

  @pl.when(n_valid <= k)
  def _few():
    # Every valid key is chosen whatever its value: no logit is read.
    och = cfg.out_chunk
    def body(c, _):
      j = c * och + lax.broadcasted_iota(_I32, (och,), 0)
      plt.store(o_ref.at[row, j], jnp.where(j < n_valid, lo_i + j, -1), mask=j < k)
      return _
    lax.fori_loop(0, pl.cdiv(k, och), body, 0)

  @pl.when(n_valid > k)
  def _select():
    if cfg.resident:
      _resident_select(x_ref, o_ref, row, lo_i, hi_i, n_valid, num_keys=S, k=k, cfg=cfg,
                       ascending=ascending)
      return

    def load(t):
      """Tile t: (keys, absolute indices); keys outside [lo, hi) are 0."""
      # A traced start: the last tile may run past S (masked), which a static slice rejects.
      start = pl.multiple_of(lo_i * 0 + t * tile, tile)
      idx = start + lane
      valid = (idx >= lo_i) & (idx < hi_i)
      # Masked by the static row end only (none when whole tiles cover S), not by [lo, hi):
      # a mask that varies per key keeps Triton from vectorizing the loads (measured on the
      # resident rows: 4-byte loads at a 16-byte stride).
      if S % tile:
        x = plt.load(x_ref.at[row, pl.ds(start, tile)], mask=idx < S, other=0.0)
      else:
        x = plt.load(x_ref.at[row, pl.ds(start, tile)])
      return jnp.where(valid, _sortable_u32(x), _U32(0)), idx

    t_lo, t_hi = lo_i // tile, pl.cdiv(hi_i, tile)

    def fold(fn, init):
      return lax.fori_loop(t_lo, t_hi, lambda t, acc: fn(acc, *load(t)), init)

    if cfg.probes == 1 and not cfg.compact:
      zeros = jnp.zeros((tile,), _I32)

      def count_ge(p):
        return jnp.sum(fold(lambda acc, key, _: acc + (key >= p).astype(_I32), zeros))

      state = _single_probe_search(count_ge, _initial_bracket(fold, tile, n_valid), k, cfg)
      _write(fold, o_ref, row, k, state)
      return
    W = sk_ref.shape[1] if cfg.compact else 0
    state = _search(fold, tile, n_tiles, S, k, cfg, _initial_bracket(fold, tile, n_valid),
                    stop=W)
    if not cfg.compact:
      _write(fold, o_ref, row, k, state)
      return
    lo, hi, c_lo, c_hi, _, _ = state
    ts = min(W, tile)
    small = (c_lo <= W) & (c_lo != k) & (hi - lo > _U32(1))

    @pl.when(jnp.logical_not(small))
    def _direct():
      _write(fold, o_ref, row, k, state)

    @pl.when(small)
    def _compacted():
      # One pass copies the c_lo <= W keys >= lo (and their indices), ascending index, to the
      # row's scratch; the search and the write go on over those few keys only, in the same
      # order, so the result is the one the full row would give.
      def compact(off, key, idx):
        keep = key >= lo
        cs = jnp.cumsum(keep.astype(_I32))
        pos = jnp.where(keep, off + cs - 1, W)
        plt.store(sk_ref.at[row, pos], key, mask=keep)
        plt.store(si_ref.at[row, pos], idx, mask=keep)
        return off + jnp.max(cs)

      fold(compact, jnp.int32(0))
      if barrier:   # the scratch is read back by other threads (interpret mode: no threads)
        plt.debug_barrier()
      lane_s = lax.broadcasted_iota(_I32, (ts,), 0)

      def fold_s(fn, init):
        def step(t, acc):
          j = t * ts + lane_s
          m = j < c_lo
          key = plt.load(sk_ref.at[row, pl.ds(pl.multiple_of(t * ts, ts), ts)], mask=m,
                         other=0)
          idx = plt.load(si_ref.at[row, pl.ds(pl.multiple_of(t * ts, ts), ts)], mask=m,
                         other=0)
          return fn(acc, jnp.where(m, key, _U32(0)), idx)
        return lax.fori_loop(0, pl.cdiv(c_lo, ts), step, init)

      st = _search(fold_s, ts, W // ts, W, k, cfg, state, stop=0)
      _write(fold_s, o_ref, row, k, st)


def _resident_select(x_ref, o_ref, row, lo_i, hi_i, n_valid, *, num_keys, k, cfg, ascending):
  """A row of more than k valid keys held in registers as [tile / 4, 4] tiles.

  Tile t holds keys ``t * tile + 4 * i + j`` at (i, j): each thread loads whole 16-byte
  vectors, unmasked except in a last tile that runs past S (the [ks, ke) range is applied
  after the load, so the loads do not wait for it). Counts are summed per tile row first
  (within a thread) and once across the block per pass.
  """
  S, tile = num_keys, cfg.tile
  R, NT = tile // _V, pl.cdiv(S, tile)
  lane = (lax.broadcasted_iota(_I32, (R, _V), 0) * _V
          + lax.broadcasted_iota(_I32, (R, _V), 1))
  keys = []
  for t in range(NT):
    idx = t * tile + lane
    if (t + 1) * tile <= S:
      x = plt.load(x_ref.at[row, idx])
    else:
      x = plt.load(x_ref.at[row, jnp.minimum(idx, S - 1)], mask=idx < S, other=0.0)
    keys.append(jnp.where((idx >= lo_i) & (idx < hi_i), _sortable_u32(x), _U32(0)))

  def count_ge(p):
    acc = jnp.zeros((R,), _I32)
    for key in keys:
      acc = acc + jnp.sum((key >= p).astype(_I32), axis=1)
    return jnp.sum(acc)

  kmax = jnp.zeros((R,), _U32)
  kmin = jnp.full((R,), 0xFFFFFFFF, _U32)
  for key in keys:
    kmax = jnp.maximum(kmax, jnp.max(key, axis=1))
    kmin = jnp.minimum(kmin, jnp.min(jnp.where(key > 0, key, _U32(0xFFFFFFFF)), axis=1))
  # Everything valid is >= the min key; nothing is >= max + 1 (max valid key <= 0xFF800000).
  bracket = (jnp.min(kmin), jnp.max(kmax) + _U32(1), n_valid, jnp.int32(0), jnp.bool_(False),
             None)
  lo, hi, c_lo, c_hi, _, _ = _single_probe_search(count_ge, bracket, k, cfg)
  exact = c_lo == k

  def ascending_write(g, c_g, with_ties):
    # Every key >= g, then (with_ties) the lowest-index keys == lo after the c_g above it,
    # all in ascending index: one block scan and one block sum per tile.
    off_s, off_t = jnp.int32(0), jnp.int32(0)
    for t, key in enumerate(keys):
      sure, tie = key >= g, (key == lo) & with_ties
      c = sure.astype(_I32) + (tie.astype(_I32) << 16)   # a tile's counts fit 16 bits
      rs = jnp.sum(c, axis=1)
      pk = (jnp.cumsum(rs) - rs)[:, None] + jnp.cumsum(c, axis=1) - c
      p_sure = off_s + (pk & 0xFFFF)
      p_tie = c_g + off_t + (pk >> 16)
      pos = jnp.where(sure, p_sure, p_tie)
      m = sure | (tie & (p_tie < k))
      plt.store(o_ref.at[row, jnp.where(m, pos, k)], t * tile + lane, mask=m)
      tot = jnp.sum(rs)
      off_s, off_t = off_s + (tot & 0xFFFF), off_t + (tot >> 16)

  if ascending:
    ascending_write(jnp.where(exact, lo, hi), jnp.where(exact, k, c_hi),
                    jnp.logical_not(exact))
    return

  @pl.when(exact)
  def _no_ties():
    # Exactly the k keys >= lo: one block-wide scan of per-thread counts places them, each
    # thread's keys in a run of slots (thread-major order, not ascending index).
    n = jnp.zeros((R,), _I32)
    for key in keys:
      n = n + jnp.sum((key >= lo).astype(_I32), axis=1)
    run = jnp.cumsum(n) - n
    for t, key in enumerate(keys):
      sel = key >= lo
      c = sel.astype(_I32)
      pos = run[:, None] + jnp.cumsum(c, axis=1) - c
      plt.store(o_ref.at[row, jnp.where(sel, pos, k)], t * tile + lane, mask=sel)
      run = run + jnp.sum(c, axis=1)

  @pl.when(jnp.logical_not(exact))
  def _ties():
    # lo is the k-th largest key and ties with the (k+1)-th: the c_hi keys above it (>= hi,
    # as hi == lo + 1), then the lowest-index ties.
    ascending_write(hi, c_hi, jnp.bool_(True))


def _single_probe_search(count_ge, bracket, k, cfg):
  """One count per pass from ``bracket`` (see ``_initial_bracket``) on:
  (lo, hi, c_lo, c_hi, _, _) with c_lo == k or hi == lo + 1."""
  lo, hi, c_lo, c_hi, bisect, _ = bracket

  def cond(c):
    lo, hi, c_lo, _, _ = c
    return (c_lo != k) & (hi - lo > _U32(1))

  def body(c):
    lo, hi, c_lo, c_hi, bisect = c
    w = hi - lo                                        # >= 2
    half = w >> 1
    if cfg.interpolate:
      # Aim where a straight line through (lo, c_lo) and (hi, c_hi) crosses k.
      frac = (c_lo - k).astype(jnp.float32) / (c_lo - c_hi).astype(jnp.float32)
      d = jnp.floor(frac * w.astype(jnp.float32))
      d = jnp.clip(d, 1.0, w.astype(jnp.float32)).astype(_U32)
      d = jnp.clip(d, _U32(1), w - _U32(1))
      d = jnp.where(bisect, half, d)
    else:
      d = half
    p = lo + d
    c = count_ge(p)
    up = c >= k
    new_lo, new_hi = jnp.where(up, p, lo), jnp.where(up, hi, p)
    # A probe that did not halve the bracket is followed by a bisection (and a bisection
    # by a probe), so the search never takes more than ~64 passes.
    slow = (new_hi - new_lo - _U32(1)) > half
    return (new_lo, new_hi, jnp.where(up, c, c_lo), jnp.where(up, c_hi, c),
            slow & jnp.logical_not(bisect))

  lo, hi, c_lo, c_hi, _ = lax.while_loop(cond, body, (lo, hi, c_lo, c_hi, bisect))
  return lo, hi, c_lo, c_hi, None, None


def _initial_bracket(fold, tile, n_valid):
  """Everything valid is >= the min key; nothing is >= max + 1 (one pass)."""
  kmax, kmin = fold(
      lambda acc, key, idx: (jnp.maximum(acc[0], key),
                             jnp.minimum(acc[1], jnp.where(key > 0, key, _U32(0xFFFFFFFF)))),
      (jnp.zeros((tile,), _U32), jnp.full((tile,), 0xFFFFFFFF, _U32)))
  lo, hi = jnp.min(kmin), jnp.max(kmax) + _U32(1)   # max valid key <= 0xFF800000: no wrap
  return lo, hi, n_valid, jnp.int32(0), jnp.bool_(False), jnp.bool_(False)


def _count_pass(fold, tile, n_tiles, n_max, P, probes, lo, hi, snap=True):
  """Counts of keys >= each probe, and (if snap) the min / max key in [lo, hi), in one pass.

  A lane's count never exceeds ``n_tiles`` (the tiles folded) and a total never exceeds
  ``n_max``: several probes' counts share one uint32 per lane (fewer adds and registers), and
  two totals share one block-wide sum when ``n_max < 2**16``.
  """
  fbits = 8 if n_tiles < (1 << 8) else 16 if n_tiles < (1 << 16) else 32
  per_word = 32 // fbits
  n_words = -(-P // per_word)

  def fn(acc, key, _):
    words, mn, mx = acc
    words = list(words)
    for j, p in enumerate(probes):
      w, f = divmod(j, per_word)
      words[w] = words[w] + jnp.where(key >= p, _U32(1 << (f * fbits)), _U32(0))
    if snap:
      inb = (key >= lo) & (key < hi)
      mn = jnp.minimum(mn, jnp.where(inb, key, _U32(0xFFFFFFFF)))
      mx = jnp.maximum(mx, jnp.where(inb, key, _U32(0)))
    return tuple(words), mn, mx

  words, mn, mx = fold(fn, (tuple(jnp.zeros((tile,), _U32) for _ in range(n_words)),
                            jnp.full((tile,), 0xFFFFFFFF, _U32), jnp.zeros((tile,), _U32)))
  counts = []
  for w in range(n_words):
    nf = min(per_word, P - w * per_word)
    if fbits == 32:
      counts.append(jnp.sum(words[w]).astype(_I32))
    elif fbits == 16 and n_max < (1 << 16):
      tot = jnp.sum(words[w])
      counts += [(tot & 0xFFFF).astype(_I32), (tot >> 16).astype(_I32)][:nf]
    elif fbits == 8 and n_max < (1 << 16):
      fm = _U32(0x00FF00FF)
      t02 = jnp.sum(words[w] & fm)
      t13 = jnp.sum((words[w] >> 8) & fm) if nf > 1 else _U32(0)
      counts += [(t02 & 0xFFFF).astype(_I32), (t13 & 0xFFFF).astype(_I32),
                 (t02 >> 16).astype(_I32), (t13 >> 16).astype(_I32)][:nf]
    else:
      mask = _U32((1 << fbits) - 1)
      counts += [jnp.sum((words[w] >> (f * fbits)) & mask).astype(_I32) for f in range(nf)]
  if not snap:   # no snapping: max(new_lo, 0) and min(new_hi, 0xFFFFFFFF) change nothing
    zero = lo - lo   # traced: a Triton scf.if cannot yield a bare constant
    return counts, zero, zero + _U32(0xFFFFFFFE)
  return counts, jnp.min(mn), jnp.max(mx)


def _search(fold, tile, n_tiles, n_max, k, cfg, state, stop):
  """Narrows (lo, hi, c_lo, c_hi, bisect) until c_lo == k, hi == lo + 1 or c_lo <= stop."""
  P = cfg.probes
  if cfg.interpolate:
    offsets = _probe_offsets(P)
  else:
    offsets = [(j + 1) / (P + 1) for j in range(P)]

  def cond(c):
    lo, hi, c_lo, _, _, _ = c
    go = (c_lo != k) & (hi - lo > _U32(1))
    return go & (c_lo > stop) if stop else go

  def body(c):
    lo, hi, c_lo, c_hi, bisect, stuck = c
    w = hi - lo                                        # >= 2
    wf = w.astype(jnp.float32)
    if cfg.interpolate:
      # Probes around where a straight line through (lo, c_lo) and (hi, c_hi) crosses k,
      # at geometrically spaced distances (1/4, 1/16, ... of the bracket) either side.
      f0 = (c_lo - k).astype(jnp.float32) / (c_lo - c_hi).astype(jnp.float32)
      # A pass that did not halve the bracket is followed by one centred on its middle
      # (which then shrinks it >= 2x, >= 4x for P >= 2): at most ~64 passes, typically 4-8.
      f0 = jnp.where(bisect, jnp.float32(0.5), f0)
    else:
      f0 = jnp.float32(0.0)
    probes = []
    for t in offsets:
      d = jnp.clip(jnp.floor((f0 + jnp.float32(t)) * wf), 1.0, wf).astype(_U32)
      probes.append(lo + jnp.clip(d, _U32(1), w - _U32(1)))
    # The in-bracket min / max (~6 more instructions a key) only after a pass that left the
    # counts unchanged: the bracket then likely holds one distinct value (ties).
    counts, mn, mx = lax.cond(
        stuck,
        lambda: _count_pass(fold, tile, n_tiles, n_max, P, probes, lo, hi, snap=True),
        lambda: _count_pass(fold, tile, n_tiles, n_max, P, probes, lo, hi, snap=False))
    new_lo, new_hi, new_clo, new_chi = lo, hi, c_lo, c_hi
    for p, cnt in zip(probes, counts):
      up = cnt >= k
      raise_lo = up & (p > new_lo)
      cut_hi = jnp.logical_not(up) & (p < new_hi)
      new_lo, new_clo = jnp.where(raise_lo, p, new_lo), jnp.where(raise_lo, cnt, new_clo)
      new_hi, new_chi = jnp.where(cut_hi, p, new_hi), jnp.where(cut_hi, cnt, new_chi)
    # No key of the old bracket lies below mn or above mx: snapping the new bracket to them
    # keeps both counts. A bracket holding one distinct value thus ends as [v, v + 1).
    new_lo, new_hi = jnp.maximum(new_lo, mn), jnp.minimum(new_hi, mx + _U32(1))
    slow = (new_hi - new_lo - _U32(1)) > (w >> 1)
    stuck = (new_clo == c_lo) & (new_chi == c_hi)
    return new_lo, new_hi, new_clo, new_chi, slow & jnp.logical_not(bisect), stuck

  return lax.while_loop(cond, body, state)


def _write(fold, o_ref, row, k, state):
  """The last pass: the k indices, in the documented order (see the module docstring)."""
  lo, hi, c_lo, c_hi, _, _ = state
  # Either exactly k keys are >= lo, or lo is the k-th largest key itself (hi == lo + 1):
  # then the c_hi keys above it go first and ties at lo fill the rest, lowest index first.
  exact = c_lo == k
  g = jnp.where(exact, lo, hi)
  c_g = jnp.where(exact, k, c_hi)

  def write(acc, key, idx):
    off_sure, off_tie = acc
    sure = key >= g
    tie = (key == lo) & jnp.logical_not(exact)
    cs = jnp.cumsum(sure.astype(_I32) + (tie.astype(_I32) << 16))
    p_sure = off_sure + (cs & 0xFFFF) - 1
    p_tie = c_g + off_tie + (cs >> 16) - 1
    pos = jnp.where(sure, p_sure, p_tie)
    m = sure | (tie & (p_tie < k))
    # Masked lanes point past the row: a GPU store skips them, and interpret mode, which
    # scatters every lane, drops out-of-bounds updates instead of clobbering a slot.
    plt.store(o_ref.at[row, jnp.where(m, pos, k)], idx, mask=m)
    total = jnp.max(cs)
    return off_sure + (total & 0xFFFF), off_tie + (total >> 16)

  fold(write, (jnp.int32(0), jnp.int32(0)))


@functools.partial(jax.jit, static_argnames=("k", "interpret", "config", "ascending"))
def topk_indices(logits, ks, ke, *, k: int = 2048, interpret: bool = False,
                 config: TopKConfig | None = None, ascending: bool = False) -> jax.Array:
  """Per row, the indices of the k largest logits among keys in [ks, ke).

  Semantics are those of ``nsa_jax.reference.topk_indices`` (NaN ranks as -inf, every valid
  key above every invalid one, -1 fill, rows with <= k valid keys returned whole without
  reading values and listed in ascending index) except the order within a row, which is
  unspecified unless ``ascending``. The set follows the reference's tie rule: when the k-th
  largest key ties with the (k+1)-th, every key above it and then the lowest-index ties are
  chosen.

  Args:
    logits: float32 [T, S].
    ks, ke: int32 [T]; clamped to [0, S] (a row with ke <= ks has no valid key).
    k: static count, may exceed S.
    interpret: run in Pallas interpret mode (CPU).
    config: static :class:`TopKConfig`; None picks ``TopKConfig.default(S, k)``.
    ascending: list each row's indices in ascending order (resident rows then always run the
      per-tile scan write: a block-wide scan and sum per tile instead of one scan per row;
      streaming rows are ascending anyway).

  Returns:
    int32 [T, k].
  """
  T, S = logits.shape
  why = unsupported_reason(S, k)
  if why:
    raise ValueError(f"topk kernel: {why}")
  cfg = config or TopKConfig.default(S, k)
  kernel = functools.partial(_topk_kernel, num_keys=S, k=k, cfg=cfg, ascending=ascending,
                             barrier=not interpret)
  out_shape = [jax.ShapeDtypeStruct((T, k), jnp.int32)]
  if cfg.compact:
    # Per-row candidate scratch (keys, indices): written and read back by the row's program.
    W = _round_up(k + cfg.compact, min(cfg.tile, _next_pow2(k + cfg.compact)))
    out_shape += [jax.ShapeDtypeStruct((T, W), _U32), jax.ShapeDtypeStruct((T, W), _I32)]
  # Without a scratch the output goes bare, not as a one-element list.
  single = len(out_shape) == 1
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape[0] if single else out_shape,
      grid=(T,),
      in_specs=[pl.no_block_spec] * 3,
      out_specs=pl.no_block_spec if single else [pl.no_block_spec] * len(out_shape),
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
      interpret=interpret,
      name="nsa_topk",
  )(ks.astype(_I32), ke.astype(_I32), logits.astype(jnp.float32))
  return out if single else out[0]
