"""Pallas Mosaic GPU kernel: fp8 ragged-prefill MQA logits (DeepGEMM ``fp8_mqa_logits``).

``logits[i, j] = k_scale[j] * sum_h w[i, h] * relu(q[i, h] . k[j])`` for ks[i] <= j < ke[i].

Design (Hopper, a persistent grid of one CTA per SM walking blocks of ``block_q`` query
tokens):
- The ``block_q * H`` (= 128) query rows of the block are the wgmma N side, loaded once into
  SMEM; key tiles of ``block_kv`` rows are the M side, K = D = 128. fp8 wgmma needs both
  operands K-major, which q [T*H, D] and k [S, D] already are, so nothing is transposed.
- Warp specialization: the last warpgroup is the TMA producer (a ``num_stages`` ring of key
  and k_scale tiles with full/free mbarriers); by default four math warpgroups each take 64
  rows of every 256-key tile (DeepGEMM's layout), so that one's epilogue (relu, weight, head
  sum on the CUDA cores) overlaps the others' wgmma, and store their logits straight from
  registers to global memory.
- The CTAs take the query blocks round by round (one block each per round); on rows of
  ``BALANCE_MIN_TILES`` key tiles or more, in snake order, with the last, partial round cut
  evenly over all CTAs at key-tile boundaries, so that no CTA computes a whole block more
  than another (``MqaLogitsConfig.balance``, ``_schedule``).
- Epilogue in registers: the f32 accumulator [block_kv, block_q * H] gets relu and the
  per-column weight, each query's H columns are summed (lane shuffles within a quad), the sum
  is scaled by k_scale (after the head sum: one multiply per logit, not per head) and masked.
- Only key tiles inside the block's [min ks, max ke) are loaded and computed; a causal prefill
  costs about half the dense work. With ``clean_logits`` the producer, once its loads are
  issued, fills the tiles outside that span with -inf by TMA stores from a constant tile;
  partial tiles are masked in the epilogue. Without it those tiles are left unwritten.
- Partial tiles at the ends of T and S rely on TMA: loads past the end read zeros, stores past
  the end are dropped. ks/ke are clamped to [0, S] and padded to whole query blocks, so no
  scalar read is out of bounds whatever the values.
- Deterministic: every logit is computed by one warpgroup in a fixed order.

Schedule knobs (``MqaLogitsConfig``; ``variant_configs`` lists the candidates benchmarked
against each other and DeepGEMM on the H200): 2-4 math warpgroups taking whole key tiles in
turn or all sharing each tile by rows (DeepGEMM's layout: 4 x 64 keys of a 256-key tile);
the wgmma split into two query-side halves so that one half's epilogue overlaps the other's
MMA; double-buffered output tiles; wider -inf fill stores; launch order of the query blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import _mlir

SUPPORTED_HEADS = (16, 32, 64, 128)
SUPPORTED_HEAD_DIMS = (128,)
_WGMMA_N = 128  # block_q * H: the query rows one wgmma takes as its N side
# balance=None takes the balanced schedule from this many key tiles a row (S / block_kv) on.
# H200, 2026-12-02, eighth session, one call, kernel time, once its table lost its loop
# (``_search``): faster than round-robin by 0.9-1.9% at S = 16384, 1.5-4.9% at 32768-65536,
# even at 8192 x 8192 (+0.6%), 4.7% slower at 2048 x 8192 (a 0.24 ms kernel: the balanced
# table's extra fusions, ~10 us, are a larger share there).
BALANCE_MIN_TILES = 64


@dataclasses.dataclass(frozen=True)
class MqaLogitsConfig:
  """Tile sizes and schedule of the kernel.

  Attributes:
    block_q: query tokens per CTA; ``block_q * H`` (the wgmma N side) must be 128 or 256.
    block_kv: keys per TMA tile (one ring slot), 64 to 256.
    num_stages: depth of the TMA ring of key tiles.
    heavy_first: take query blocks in reverse order: in a causal prefill the last queries
      see the most keys, and starting them first shortens the tail.
    num_ctas: persistent grid size (each CTA loops over query blocks, its TMA ring running
      across block boundaries); None = the GPU's SM count (1 CTA per SM).
    balance: True: whole rounds of query blocks in snake order and the last, partial round
      cut evenly over all CTAs at key-tile boundaries (``_schedule``); False: whole blocks
      round-robin, which leaves the CTAs of the partial round idle for a block's time
      (4096 blocks on 132 SMs: 31.03 rounds). None (default): True for rows of at least
      ``BALANCE_MIN_TILES`` key tiles, where it measured 0.9-4.9% faster on the H200, else
      False (2048 x 8192 measured 4.7% slower with it, 2026-12-02).
    num_consumers: math warpgroups (2 to 4). More of them interleave one's CUDA-core
      epilogue with the others' wgmma at a smaller accumulator each (the register file
      is shared: 232 registers a thread for 2, 160 for 3, 112 for 4).
    kv_split: every consumer takes every key tile, ``block_kv / num_consumers`` rows of it
      (one TMA ring slot feeds all math warpgroups at once); False: consumers take whole
      tiles in turn (``num_stages`` must then be a multiple of ``num_consumers``).
    split_n: issue each tile's wgmma as two halves of the query side (two accumulators,
      two commit groups) and run the first half's epilogue while the second's MMA runs.
    out_buffers: SMEM output tiles per consumer (1 or 2); with 2 a tile's epilogue does not
      wait for the TMA store of the consumer's previous tile to leave SMEM.
    fill_tiles: key tiles per TMA store of the ``-inf`` fill (fewer, larger stores); the
      store box is at most 256 keys wide.
    direct_store: consumers store each tile's logits from registers straight to global
      memory (no SMEM tile, TMA store or store wait), release the key slot as soon as the
      tile's wgmmas have completed (before the epilogue), and the kernel compiles without
      Pallas' automatic warpgroup barriers (``unsafe_no_auto_barriers``): at most one
      barrier a tile (``release``) instead of about six. DeepGEMM's kernel stores this way.
      Rows past T are skipped; the one row slice per query block that crosses the end of
      the keys goes through SMEM and a clipping TMA store (``out_buffers`` is unused).
    release: ``direct_store`` only: what a consumer runs between its last read of a key
      slot and its per-thread arrive that frees the slot: ``"barrier"`` (``commit_smem``:
      proxy fence + warpgroup barrier), ``"fence"`` (a per-thread proxy fence, no barrier)
      or ``"arrive"`` (nothing: DeepGEMM's and CUTLASS's release); see
      ``_mlir.release_fence`` for interpret mode.

  ``for_heads(H)`` is the default: DeepGEMM's layout of the work and of the stores (4 math
  warpgroups on every 256-key tile, 64 keys each, direct stores). On the H200 (2026-12-02,
  kernel time) it was 1.11-1.16x faster than the former default (2 warpgroups taking whole
  128-key tiles, SMEM + TMA stores: ``variant_configs``' "two_wg") at three shapes timed in
  one call, and 0.95-1.07x DeepGEMM's speed at seven shapes timed in one call with
  DeepGEMM (BENCHMARKS.md).
  """

  block_q: int
  block_kv: int = 128
  num_stages: int = 4
  heavy_first: bool = True
  num_ctas: int | None = None
  balance: bool | None = None
  num_consumers: int = 2
  kv_split: bool = False
  split_n: bool = False
  out_buffers: int = 1
  fill_tiles: int = 1
  direct_store: bool = False
  release: str = "barrier"

  @classmethod
  def for_heads(cls, num_heads: int) -> "MqaLogitsConfig":
    """The default schedule for H heads (see the class docstring)."""
    return cls(block_q=_WGMMA_N // num_heads, block_kv=256, num_consumers=4, kv_split=True,
               direct_store=True)

  @property
  def sub_kv(self) -> int:
    """Keys per consumer wgmma (the M side)."""
    return self.block_kv // self.num_consumers if self.kv_split else self.block_kv

  def smem_bytes(self, num_heads: int, head_dim: int = 128) -> int:
    """Scratch bytes the kernel allocates (barriers aside)."""
    nq = self.block_q * num_heads
    fill_unit = 128 if self.block_kv % 128 == 0 else 64
    fill_keys = (max(fill_unit, 128 // self.block_q)
                 + (self.fill_tiles * self.block_kv if self.fill_tiles > 1 else 0))
    return (2 * nq * head_dim + 2 * nq * 4 + self.num_stages * self.block_kv * (head_dim + 4)
            + self.num_consumers * self.out_buffers * self.block_q * self.sub_kv * 4
            + self.block_q * fill_keys * 4)

  def check(self, num_heads: int) -> None:
    nq = self.block_q * num_heads
    nc, sub = self.num_consumers, self.sub_kv
    acc_regs = sub * nq // 128            # f32 accumulator registers a thread
    problems = []
    if nq not in (128, 256):
      problems.append("block_q * H must be 128 or 256")
    if nc not in (2, 3, 4):
      problems.append("num_consumers must be 2, 3 or 4")
    elif self.kv_split and self.block_kv % nc:
      problems.append("kv_split needs block_kv divisible by num_consumers")
    elif sub not in (64, 128):
      problems.append("keys per consumer wgmma (block_kv, or block_kv / num_consumers with "
                      "kv_split) must be 64 or 128")
    elif acc_regs > (128 if nc == 2 else 64):
      problems.append(f"accumulator of {acc_regs} registers a thread is too large for "
                      f"{nc} consumers")
    if not 64 <= self.block_kv <= 256:
      problems.append("block_kv must be in [64, 256]")
    if not self.kv_split and self.num_stages % nc:
      problems.append("without kv_split num_stages must be a multiple of num_consumers")
    if self.release not in _mlir.RELEASES or (
        self.release != "barrier" and not self.direct_store):
      problems.append("release must be 'barrier', or 'fence' / 'arrive' with direct_store")
    if self.num_stages < 2 or self.out_buffers not in (1, 2):
      problems.append("num_stages >= 2 and out_buffers in (1, 2)")
    if self.fill_tiles < 1 or self.fill_tiles * self.block_kv > 256:
      problems.append("fill_tiles * block_kv must be in [block_kv, 256]")
    if not problems and self.smem_bytes(num_heads) > 220 * 1024:
      problems.append(f"{self.smem_bytes(num_heads)} bytes of SMEM (> 220 KiB)")
    if problems:
      raise ValueError(f"mqa_logits kernel: unsupported config {self} for H={num_heads}: "
                       + "; ".join(problems))


def variant_configs(num_heads: int) -> dict[str, MqaLogitsConfig]:
  """The candidate schedules that ``benchmarks/bench_mqa_variants.py`` times against each
  other (and the tests run in interpret mode); "default" is what ``mqa_logits`` uses.

  - default: ``MqaLogitsConfig.for_heads``: 4 math warpgroups share every 256-key tile (64
    keys each) and store their logits from registers (DeepGEMM's layout).
  - round_robin / balanced: the default with whole query blocks handed to the CTAs in
    turn (``balance=False``, DeepGEMM's schedule) or with snake rounds and the partial
    round cut evenly (``balance=True``), whatever the row length.
  - two_wg: the former default: 2 math warpgroups take whole 128-key tiles in turn, logits
    through an SMEM tile and a TMA store. The variants below change one thing of it.
  - launch_order: query blocks in launch order instead of heaviest first.
  - ob2_fill2: two output tiles per consumer and -inf fill stores two key tiles wide.
  - split_n: each tile's wgmma in two query-side halves, the first half's epilogue
    overlapping the second's MMA.
  - nc3_split / nc4_split: 3 or 4 math warpgroups on every key tile (192 or 256 keys), 64
    keys each, SMEM + TMA stores; nc4_split_n adds split_n.
  - nc4_alt: 4 math warpgroups taking 64-key tiles in turn (8-stage ring).
  - direct: two_wg with ``direct_store``.
  - release_fence / release_arrive: the default with a per-thread proxy fence, or nothing,
    instead of the warpgroup barrier before a key slot is freed (``MqaLogitsConfig.release``).
  """
  base = MqaLogitsConfig(block_q=_WGMMA_N // num_heads)
  r = dataclasses.replace
  default = MqaLogitsConfig.for_heads(num_heads)
  return {
      "default": default,
      "round_robin": r(default, balance=False),
      "balanced": r(default, balance=True),
      "release_fence": r(default, release="fence"),
      "release_arrive": r(default, release="arrive"),
      "two_wg": base,
      "launch_order": r(base, heavy_first=False),
      "ob2_fill2": r(base, out_buffers=2, fill_tiles=2),
      "split_n": r(base, split_n=True, out_buffers=2),
      "nc3_split": r(base, block_kv=192, num_consumers=3, kv_split=True, out_buffers=2),
      "nc4_split": r(base, block_kv=256, num_consumers=4, kv_split=True, out_buffers=2),
      "nc4_split_n": r(base, block_kv=256, num_consumers=4, kv_split=True, split_n=True,
                       out_buffers=2),
      "nc4_alt": r(base, block_kv=64, num_consumers=4, num_stages=8, out_buffers=2),
      "direct": r(base, direct_store=True),
  }


def unsupported_reason(num_heads: int, head_dim: int) -> str | None:
  """None when the kernel takes [*, H, D] queries, else why not."""
  if num_heads not in SUPPORTED_HEADS:
    return f"H={num_heads} heads (supported: {SUPPORTED_HEADS})"
  if head_dim not in SUPPORTED_HEAD_DIMS:
    return f"D={head_dim} head dim (supported: {SUPPORTED_HEAD_DIMS})"
  return None


def _num_sms() -> int:
  dev = jax.devices()[0]
  # Cross-lowering from a CPU host has no GPU to ask: assume an H100 SXM (132 SMs).
  return int(getattr(dev, "core_count", 0) or 132) if dev.platform == "gpu" else 132


def _fp8_transforms():
  # fp8 wgmma operands: (8, 128) tiles with the 128-byte swizzle (128 fp8 = one 128 B row).
  return (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))


# (producer, consumer) registers a thread. setmaxnreg moves registers within the CTA's
# launch allocation: 65536 / threads a thread, rounded down to a multiple of 8 (168 at 3
# warpgroups, 128 at 4, 96 at 5), so producer + consumers must stay within that many
# (40 + 2 * 232 = 3 * 168; 32 + 3 * 160 = 4 * 128; 32 + 4 * 112 = 5 * 96); more would
# leave a consumer's increase waiting forever.
_REGISTERS = {2: (40, 232), 3: (32, 160), 4: (32, 112)}


def _build(T: int, T_pad: int, S: int, S_k: int, S_out: int, H: int, D: int,
           cfg: MqaLogitsConfig, clean: bool, num_ctas: int, interpret):
  """S_k: rows of the (8-row padded) key array."""
  BQ, BKV, NS, NC = cfg.block_q, cfg.block_kv, cfg.num_stages, cfg.num_consumers
  NQ = BQ * H
  SUB = cfg.sub_kv                            # keys per consumer wgmma
  NPARTS = NC if cfg.kv_split else 1          # row slices of a key tile in SMEM
  NQP = 2 if cfg.split_n else 1               # query-side halves (accumulators) per wgmma
  NQH = NQ // NQP
  OB = cfg.out_buffers
  FILL = cfg.fill_tiles
  num_kv_blocks = pl.cdiv(S, BKV)
  # Keys per -inf store of the fill: a power of two (a splat store into SMEM needs a
  # multiple of 128 elements; 192-key tiles are filled in thirds).
  FU = 128 if BKV % 128 == 0 else 64
  num_q_blocks = T_pad // BQ
  G = num_ctas
  # Consecutive tiles of one consumer: all tiles with kv_split, every NC-th otherwise.
  STEP = 1 if cfg.kv_split else NC
  ROUNDS = num_q_blocks // G                  # whole rounds of query blocks (``_schedule``)
  DIRECT = cfg.direct_store
  prod_regs, cons_regs = _REGISTERS[NC]
  assert prod_regs + NC * cons_regs <= (65536 // ((NC + 1) * 128)) // 8 * 8 * (NC + 1)
  f32 = jnp.float32
  row_layout = plgpu.Layout.WGMMA.reduce(1)   # one value per accumulator row (key)
  col_layout = plgpu.Layout.WGMMA.reduce(0)   # one value per accumulator column (query, head)

  # Which query's head columns each accumulator half holds: [(query, first, end)] in the
  # half's own column numbering (with H = 128 and split_n a query spans both halves).
  half_cols = []
  for p in range(NQP):
    c0, c1 = p * NQH, (p + 1) * NQH
    half_cols.append([(j, max(j * H, c0) - c0, min((j + 1) * H, c1) - c0)
                      for j in range(BQ) if j * H < c1 and (j + 1) * H > c0])

  def kernel(q_ref, k_ref, ksc_ref, w_ref, ks_ref, ke_ref, lo_ref, hi_ref, sched_ref, out_ref,
             q_smem, w_smem, k_smem, ksc_smem, o_smem, *rest):
    ninf = ninf_wide = None
    if clean and FILL > 1:
      ninf, ninf_wide, *rest = rest
    elif clean:
      ninf, *rest = rest
    q_bar, q_free, kv_bar, free_bar = rest
    cta = lax.axis_index("cta")
    wg = lax.axis_index("wg")
    # This CTA's share (``_schedule``): one block of each of the ROUNDS whole rounds, then
    # my_blocks - ROUNDS blocks j0, j0 + 1, ... of the last, partial round, the first of
    # them from its unit off0 on, the last up to its unit off1 (a block of n key tiles has
    # max(n, 1) units: an empty block still has its -inf row to write). The offsets are read
    # where they are used: five scalar loads here made the interpreter hang (2026-12-02).
    j0, my_blocks, my_tiles = sched_ref[cta], sched_ref[G + cta], sched_ref[4 * G + cta]

    def block_of(m):
      """This CTA's m-th block: (first token, q buffer, its span [lo, hi) of key tiles,
      the first key tile this CTA computes, how many, whether it writes the -inf fill
      before and after the span)."""
      in_round = lax.rem(m, 2) == 0 if cfg.balance else True
      j = jnp.where(m < ROUNDS, m * G + jnp.where(in_round, cta, G - 1 - cta),
                    ROUNDS * G + j0 + (m - ROUNDS))
      qb = num_q_blocks - 1 - j if cfg.heavy_first else j
      t0, buf = qb * BQ, lax.rem(m, 2)
      lo, hi = lo_ref[qb], hi_ref[qb]
      units = jnp.maximum(hi - lo, 1)
      u0 = jnp.where(m == ROUNDS, sched_ref[2 * G + cta], 0)
      u1 = jnp.where((m >= ROUNDS) & (m == my_blocks - 1),
                     jnp.minimum(sched_ref[3 * G + cta], units), units)
      n = jnp.maximum(jnp.minimum(u1, hi - lo) - u0, 0)
      return t0, buf, lo, hi, lo + u0, n, u0 == 0, u1 == units

    @pl.when(wg == NC)
    def _producer():
      plgpu.set_max_registers(prod_regs, action="decrease")
      if clean:
        ninf[...] = jnp.full(ninf.shape, -jnp.inf, f32)
        if FILL > 1:
          ninf_wide[...] = jnp.full(ninf_wide.shape, -jnp.inf, f32)
        plgpu.commit_smem()

      def per_block(m, g):
        t0, buf, span_lo, span_hi, lo, n, fill_before, fill_after = block_of(m)

        @pl.when(m >= 2)
        def _():
          plgpu.barrier_wait(q_free.at[buf])   # all consumers are done with block m - 2

        for p in range(NQP):
          plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(t0 * H + p * NQH, NQH)], q_smem.at[buf, p],
                                  q_bar.at[buf])
        plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(t0 * H, NQ)], w_smem.at[buf], q_bar.at[buf])

        @pl.loop(0, n)
        def _load(i):
          slot = lax.rem(g + i, NS)

          @pl.when(g + i >= NS)
          def _():
            plgpu.barrier_wait(free_bar.at[slot])

          s0 = (lo + i) * BKV
          for p in range(NPARTS):
            r0 = s0 + p * SUB
            if NPARTS > 1:
              # A row slice wholly past the keys reads in-bounds rows instead (their logits
              # lie past every ke and are masked), so that no TMA box is wholly outside.
              r0 = jnp.where(r0 >= S_k, max(S_k - SUB, 0), r0)
            plgpu.copy_gmem_to_smem(k_ref.at[pl.ds(r0, SUB)], k_smem.at[slot, p],
                                    kv_bar.at[slot])
          plgpu.copy_gmem_to_smem(ksc_ref.at[pl.ds(s0, BKV)], ksc_smem.at[slot], kv_bar.at[slot])

        if clean:
          # -inf for the tiles outside [lo, hi): TMA stores of a constant tile of FU keys,
          # issued while the consumers work through the tiles just loaded. Wide stores
          # (FILL key tiles) only where they lie wholly inside [0, S), so that none relies
          # on clipping at the row end; FU-key stores for the rest. Ranges in FU units.
          def fill1(u):
            plgpu.copy_smem_to_gmem(ninf.at[:, pl.ds(0, FU)] if BQ == 1 else ninf,
                                    out_ref.at[pl.ds(t0, BQ), pl.ds(u * FU, FU)])

          def fill_range(u0, u1):
            if FILL == 1:
              pl.loop(u0, u1)(fill1)
              return
            wide = FILL * BKV // FU
            nwide = jnp.maximum(jnp.minimum(u1, S // FU) - u0, 0) // wide

            @pl.loop(0, nwide)
            def _(c):
              plgpu.copy_smem_to_gmem(
                  ninf_wide, out_ref.at[pl.ds(t0, BQ), pl.ds((u0 + c * wide) * FU, FILL * BKV)])

            pl.loop(u0 + nwide * wide, u1)(fill1)

          # A block shared by two CTAs: the one with its first tile fills before the span,
          # the one with its last tile after it.
          pl.when(fill_before)(lambda: fill_range(0, span_lo * (BKV // FU)))
          pl.when(fill_after)(lambda: fill_range(span_hi * (BKV // FU), pl.cdiv(S, FU)))
        return g + n

      lax.fori_loop(0, my_blocks, per_block, jnp.int32(0))
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg < NC)
    def _consumer():
      plgpu.set_max_registers(cons_regs, action="increase")
      part = wg if cfg.kv_split else 0     # the row slice of each tile this consumer takes

      def load_scales(slot):
        if cfg.kv_split:
          return plgpu.load(ksc_smem.at[slot, pl.ds(part * SUB, SUB)], layout=row_layout)
        return plgpu.load(ksc_smem.at[slot], layout=row_layout)

      def per_block(m, g):
        t0, buf, _, _, lo, n, _, _ = block_of(m)
        kss = [ks_ref[t0 + j] for j in range(BQ)]
        kes = [ke_ref[t0 + j] for j in range(BQ)]
        plgpu.barrier_wait(q_bar.at[buf])
        ws = [plgpu.load(w_smem.at[buf, pl.ds(p * NQH, NQH)], layout=col_layout)
              for p in range(NQP)]

        def step(i):
          slot = lax.rem(g + i, NS)
          s0 = (lo + i) * BKV + part * SUB     # first key of this consumer's rows
          plgpu.barrier_wait(kv_bar.at[slot])
          if DIRECT:
            # Read before the slot is released right after the wgmmas below.
            ksc = load_scales(slot)

          def mma(*accs):
            for p in range(NQP):
              plgpu.wgmma(accs[p], k_smem.at[slot, part], q_smem.at[buf, p].T)
            sums = [None] * BQ
            for p in range(NQP):
              # The first half's epilogue runs while the second half's MMA is in flight.
              s = plgpu.wgmma_accumulator_load(accs[p], wait_n=NQP - 1 - p)
              if DIRECT and p == NQP - 1:
                # The slot is no longer read (scales in registers, wgmmas complete): the
                # proxy fence orders this warpgroup's loads of it before the refill's TMA
                # writes, then every thread arrives. Without the warpgroup barrier
                # (release="fence" / "arrive") it was within the spread of calls on the
                # H200 (-4% to +1%, 2026-12-02, benchmarks/NOTES.md): the barrier stays.
                _mlir.release_fence(cfg.release, interpret is not None)

                @pl.when(g + i + NS < my_tiles)
                def _():
                  plgpu.barrier_arrive(free_bar.at[slot])
              s = jnp.maximum(s, 0.0) * lax.broadcast_in_dim(ws[p], (SUB, NQH), [1])
              for j, c0, c1 in half_cols[p]:
                r = s[:, c0:c1].sum(axis=1)
                sums[j] = r if sums[j] is None else sums[j] + r
            return sums

          sums = pl.run_scoped(mma, *[plgpu.ACC((SUB, NQH), f32)] * NQP)
          if not DIRECT:
            ksc = load_scales(slot)
          pos = s0 + plgpu.broadcasted_iota(jnp.int32, (SUB,), 0, layout=row_layout)
          if DIRECT:
            vals = [jnp.where((pos >= kss[j]) & (pos < kes[j]), sums[j] * ksc, -jnp.inf)
                    for j in range(BQ)]

            def direct():
              dst = out_ref.at[pl.ds(t0, BQ), pl.ds(s0, SUB)]
              for j in range(BQ):
                def row(j=j):
                  dst[j, :] = vals[j]
                # Rows past T (the last query block) have no place in the output.
                if T % BQ:
                  pl.when(t0 + j < T)(row)
                else:
                  row()

            if S_out >= num_kv_blocks * BKV:
              direct()   # every row slice lies inside the output
              return
            # A row slice that crosses the end of the output goes through SMEM and a TMA
            # store, which clips at the array's bounds (rows and columns); one wholly past
            # it (kv_split) stores nothing. This path runs once per query block at most.
            pl.when(s0 + SUB <= S_out)(direct)

            @pl.when((s0 < S_out) & (s0 + SUB > S_out))
            def _():
              out_buf = o_smem.at[wg, 0]
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # ends in a warpgroup sync
              for j in range(BQ):
                out_buf[j, :] = vals[j]
              plgpu.commit_smem()                               # fence + warpgroup sync
              plgpu.copy_smem_to_gmem(out_buf, out_ref.at[pl.ds(t0, BQ), pl.ds(s0, SUB)])
            return
          ob = lax.rem((g + i) // STEP, OB) if OB > 1 else 0
          out_buf = o_smem.at[wg, ob]
          # This buffer's previous TMA store has left SMEM (older stores may be in flight).
          plgpu.wait_smem_to_gmem(OB - 1, wait_read_only=True)
          for j in range(BQ):
            # k_scale after the head sum: one multiply per logit, not per head.
            out_buf[j, :] = jnp.where((pos >= kss[j]) & (pos < kes[j]), sums[j] * ksc,
                                      -jnp.inf)
          # commit_smem syncs the warpgroup, so every thread's read of ksc_smem[slot] is done
          # before the single-thread arrive that lets the producer refill the slot.
          plgpu.commit_smem()

          @pl.when(g + i + NS < my_tiles)
          def _():
            plgpu.barrier_arrive(free_bar.at[slot])

          # A row slice wholly past S (kv_split) stores nothing; its bulk group is still
          # committed, so the wait above counts the same groups.
          def store():
            plgpu.copy_smem_to_gmem(out_buf, out_ref.at[pl.ds(t0, BQ), pl.ds(s0, SUB)])

          if cfg.kv_split:
            pl.when(s0 < S)(store)
            pl.when(s0 >= S)(plgpu.commit_smem_to_gmem_group)
          else:
            store()

        if cfg.kv_split:
          pl.loop(0, n)(step)
        else:
          # Tiles go to the consumers in turn by their CTA-wide index g + i.
          pl.loop(lax.rem(wg + NC - lax.rem(g, NC), NC), n, step=NC)(step)

        # Every wgmma on q_smem[buf] has been waited for (accumulator reads) and w is in
        # registers; the sync orders this warpgroup's reads before the arrive.
        plgpu.commit_smem()

        @pl.when(m + 2 < my_blocks)
        def _():
          plgpu.barrier_arrive(q_free.at[buf])

        return g + n

      lax.fori_loop(0, my_blocks, per_block, jnp.int32(0))
      plgpu.wait_smem_to_gmem(0)

  f8 = jnp.float8_e4m3fn
  scratch = [
      plgpu.SMEM((2, NQP, NQH, D), f8, transforms=_fp8_transforms()),  # double-buffered
      plgpu.SMEM((2, NQ), f32),                                        # queries and weights
      plgpu.SMEM((NS, NPARTS, BKV // NPARTS, D), f8, transforms=_fp8_transforms()),
      plgpu.SMEM((NS, BKV), f32),
      plgpu.SMEM((NC, OB, BQ, SUB), f32),   # output tiles of each consumer
  ]
  if clean:
    # The constant -inf tiles (a splat store needs >= 128 elements: one row of 64 keys at
    # H = 128 gets a wider buffer, of which a contiguous prefix is stored).
    scratch.append(plgpu.SMEM((BQ, max(FU, 128 // BQ)), f32))
    if FILL > 1:
      scratch.append(plgpu.SMEM((BQ, FILL * BKV), f32))
  scratch += [
      plgpu.Barrier(num_arrivals=NQP + 1, num_barriers=2),     # q_bar: q and w landed
      plgpu.Barrier(num_arrivals=NC, num_barriers=2),          # q_free: consumers done
      plgpu.Barrier(num_arrivals=NPARTS + 1, num_barriers=NS),  # kv_bar: keys and scales
      plgpu.Barrier(num_arrivals=NPARTS, num_barriers=NS),     # free_bar: slot consumed
  ]
  return plgpu.kernel(
      kernel,
      # Rows past T: TMA stores are dropped, direct stores skip them.
      out_type=jax.ShapeDtypeStruct((T, S_out), f32),
      grid=(G,),
      grid_names=("cta",),
      num_threads=NC + 1,
      thread_name="wg",
      scratch_types=scratch,
      # direct_store: the kernel places its own barriers (MqaLogitsConfig.direct_store).
      compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=DIRECT),
      interpret=interpret,
  )


def _search(sorted_: jax.Array, v: jax.Array) -> jax.Array:
  """``searchsorted(sorted_, v, side="right")`` without a loop (int32 [len(v)])."""
  return jnp.searchsorted(sorted_, v, side="right", method="compare_all").astype(jnp.int32)


def _schedule(tiles: jax.Array, G: int, cfg: MqaLogitsConfig) -> jax.Array:
  """Each CTA's share of the query blocks, int32 [5 * G]: for CTA c at ``f * G + c``, f =
  0: its first block of the last, partial round (relative to the round's start), 1: how many
  blocks in all, 2: the first unit it takes of that first block, 3: the end unit in its last
  block, 4: the key tiles it computes in all (the consumers must know when the producer
  stops waiting on a ring slot).

  tiles: int32 [num_q_blocks], key tiles of each query block. The blocks in launch order
  form num_q_blocks // G whole rounds of G blocks, one block of each round per CTA, and a
  partial round of the rest. ``cfg.balance``: the whole rounds go to the CTAs in snake order
  (CTA c takes the c-th block of even rounds and the c-th from the end of odd ones, so that
  heaviest-first order does not favour the first CTAs), and the partial round's units (a
  block of n tiles counts as max(n, 1): an empty one still writes its -inf row) are cut into
  G runs of equal length (+-1), so that no CTA takes a whole block more than another. Else
  CTA c takes whole blocks c, c + G, c + 2G, ... A block's cost is not only its tiles (its
  -inf fill and its start-up are per block), so every CTA takes one block of each round
  rather than an equal run of tiles: that made short causal prefills, whose light blocks are
  mostly fill, up to 1.6x slower (H200, 2026-12-02, benchmarks/NOTES.md).
  """
  if cfg.heavy_first:
    tiles = tiles[::-1]
  nblk = tiles.shape[0]
  rounds, rest = nblk // G, nblk % G
  c = jnp.arange(G, dtype=jnp.int32)
  zero = jnp.zeros_like(c)
  whole = tiles[:rounds * G].reshape(rounds, G)
  if cfg.balance:
    whole = jnp.where((jnp.arange(rounds) % 2 == 0)[:, None], whole, whole[:, ::-1])
  total = whole.sum(axis=0, dtype=jnp.int32)
  tail = tiles[rounds * G:]
  if rest == 0:
    return jnp.concatenate([zero, zero + rounds, zero, zero, total]).astype(jnp.int32)
  if not cfg.balance:
    has = (c < rest).astype(jnp.int32)
    total = total + jnp.where(c < rest, jnp.pad(tail, (0, G - rest))[c], 0)
    return jnp.concatenate([c, rounds + has, zero, zero + (1 << 30), total]).astype(jnp.int32)
  units = jnp.maximum(tail, 1)
  first_unit = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(units)])   # [rest + 1]
  first_tile = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(tail)])
  q, r = first_unit[-1] // G, first_unit[-1] % G
  start = c * q + jnp.minimum(c, r)
  end = start + q + (c < r).astype(jnp.int32)
  some = end > start            # fewer units than CTAs: some CTAs take none
  # compare_all: jnp.searchsorted's default is a loop, which XLA runs on a GPU one step at a
  # time, small kernels per step (about 25 us of a 0.25 ms call at 2048 x 8192, H200, more
  # than the schedule gains there); [G, rest + 1] comparisons are one small fusion.
  b0 = jnp.clip(_search(first_unit, start) - 1, 0, rest - 1)
  b1 = jnp.clip(_search(first_unit, end - 1) - 1, 0, rest - 1)
  off0, off1 = start - first_unit[b0], end - first_unit[b1]
  got = ((first_tile[b1] + jnp.minimum(off1, tail[b1]))
         - (first_tile[b0] + jnp.minimum(off0, tail[b0])))
  nb = jnp.where(some, b1 - b0 + 1, 0)
  total = total + jnp.where(some, got, 0)
  return jnp.concatenate([b0, rounds + nb, off0, off1, total]).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("clean_logits", "interpret", "config"))
def mqa_logits(q_fp8, k_fp8, k_scale, weights, ks, ke, *, clean_logits: bool = True,
               interpret=False, config: MqaLogitsConfig | None = None) -> jax.Array:
  """Launches the kernel on validated arrays (see ``nsa_jax.mqa_logits`` for the contract).

  Args:
    q_fp8: float8_e4m3fn [T, H, D]; k_fp8: float8_e4m3fn [S, D]; k_scale: float32 [S];
    weights: float32 [T, H]; ks, ke: int32 [T].
    interpret: False, True (interpret mode with default params) or a
      ``plgpu.InterpretGPUParams`` (e.g. with race detection).
    config: tile sizes; default ``MqaLogitsConfig.for_heads(H)``.

  Returns:
    float32 [T, S].
  """
  T, H, D = q_fp8.shape
  S = k_fp8.shape[0]
  cfg = config or MqaLogitsConfig.for_heads(H)
  cfg.check(H)
  BQ, BKV = cfg.block_q, cfg.block_kv
  if cfg.balance is None:
    cfg = dataclasses.replace(cfg, balance=pl.cdiv(S, BKV) >= BALANCE_MIN_TILES)
  T_pad = pl.cdiv(T, BQ) * BQ
  # Clamp (bad values never index out of bounds) and pad to whole query blocks (empty rows).
  ks = jnp.clip(ks, 0, S)
  ke = jnp.clip(ke, ks, S)
  ks = jnp.pad(ks, (0, T_pad - T))
  ke = jnp.pad(ke, (0, T_pad - T))
  # Per query block, the span of key tiles any of its queries sees (empty span: lo = hi).
  kb, keb = ks.reshape(-1, BQ), ke.reshape(-1, BQ)
  nonempty = keb > kb
  lo_tok = jnp.min(jnp.where(nonempty, kb, S), axis=1)
  hi_tok = jnp.max(jnp.where(nonempty, keb, 0), axis=1)
  lo = jnp.minimum(lo_tok // BKV, pl.cdiv(S, BKV)).astype(jnp.int32)
  hi = jnp.maximum(pl.cdiv(hi_tok, BKV), lo).astype(jnp.int32)

  if S % 8:
    # TMA of the (8, 128)-tiled key tiles needs whole 8-row groups in GMEM; the padded keys
    # are zeros and lie past every ke, so they are never valid.
    k_fp8 = jnp.pad(k_fp8, ((0, 8 - S % 8), (0, 0)))
  if interpret is True:
    interpret = plgpu.InterpretGPUParams()
  num_q_blocks = T_pad // BQ
  G = min(num_q_blocks, cfg.num_ctas or (3 if interpret else _num_sms()))
  sched = _schedule(hi - lo, G, cfg)
  # TMA needs 16-byte row strides: for S % 4 != 0 the kernel writes a wider array that is
  # sliced (one extra copy, only for such S). One-row tiles (block_q = 1, i.e. H = 128) pad
  # to whole key tiles: on the H100 a one-row TMA store was seen not to be clipped at the
  # row end (paged kernel), so no tile may cross it.
  S_out = pl.cdiv(S, 4) * 4 if BQ > 1 else pl.cdiv(S, BKV) * BKV
  call = _build(T, T_pad, S, k_fp8.shape[0], S_out, H, D, cfg, clean_logits, G,
                interpret or None)
  out = call(q_fp8.reshape(T * H, D), k_fp8, k_scale, weights.reshape(T * H), ks, ke, lo, hi,
             sched)
  return out[:T, :S] if out.shape != (T, S) else out
