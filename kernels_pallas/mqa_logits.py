"""Pallas Mosaic GPU kernel: fp8 ragged-prefill MQA logits (DeepGEMM ``fp8_mqa_logits``).

``logits[i, j] = k_scale[j] * sum_h w[i, h] * relu(q[i, h] . k[j])`` for ks[i] <= j < ke[i].

Design (Hopper, one CTA per block of ``block_q`` query tokens):
- The ``block_q * H`` (= 128) query rows of the block are the wgmma N side, loaded once into
  SMEM; key tiles of ``block_kv`` rows are the M side, K = D = 128. fp8 wgmma needs both
  operands K-major, which q [T*H, D] and k [S, D] already are, so nothing is transposed.
- Warp specialization: warpgroup 2 is the TMA producer (a ``num_stages`` ring of key and
  k_scale tiles with full/free mbarriers); warpgroups 0 and 1 consume alternate key tiles, so
  one's epilogue (relu, weight, head sum on the CUDA cores) overlaps the other's wgmma.
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
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

SUPPORTED_HEADS = (16, 32, 64, 128)
SUPPORTED_HEAD_DIMS = (128,)
_WGMMA_N = 128  # block_q * H: the query rows one wgmma takes as its N side


@dataclasses.dataclass(frozen=True)
class MqaLogitsConfig:
  """Tile sizes and schedule of the kernel.

  Attributes:
    block_q: query tokens per CTA; ``block_q * H`` (the wgmma N side) must be 128 or 256.
    block_kv: keys per wgmma (the M side), 64 or 128; ``block_kv * block_q * H`` <= 128 * 128
      keeps the f32 accumulator at <= 128 registers per thread.
    num_stages: depth of the TMA ring of key tiles.
    heavy_first: take query blocks in reverse order: in a causal prefill the last queries
      see the most keys, and starting them first shortens the tail.
    num_ctas: persistent grid size (each CTA loops over query blocks, its TMA ring running
      across block boundaries); None = the GPU's SM count (1 CTA per SM: the two math
      warpgroups take 232 registers a thread).
  """

  block_q: int
  block_kv: int = 128
  num_stages: int = 4
  heavy_first: bool = True
  num_ctas: int | None = None

  @classmethod
  def for_heads(cls, num_heads: int) -> "MqaLogitsConfig":
    return cls(block_q=_WGMMA_N // num_heads)

  def check(self, num_heads: int) -> None:
    nq = self.block_q * num_heads
    if nq not in (128, 256) or self.block_kv not in (64, 128) or self.block_kv * nq > 128 * 128:
      raise ValueError(f"mqa_logits kernel: unsupported config {self} for H={num_heads}: need "
                       "block_q * H in (128, 256), block_kv in (64, 128), product <= 16384")


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


def _build(T: int, T_pad: int, S: int, S_out: int, H: int, D: int, cfg: MqaLogitsConfig,
           clean: bool, num_ctas: int, interpret):
  BQ, BKV, NS = cfg.block_q, cfg.block_kv, cfg.num_stages
  NQ = BQ * H
  num_kv_blocks = pl.cdiv(S, BKV)
  num_q_blocks = T_pad // BQ
  G = num_ctas
  f32 = jnp.float32
  row_layout = plgpu.Layout.WGMMA.reduce(1)   # one value per accumulator row (key)
  col_layout = plgpu.Layout.WGMMA.reduce(0)   # one value per accumulator column (query, head)

  def kernel(q_ref, k_ref, ksc_ref, w_ref, ks_ref, ke_ref, lo_ref, hi_ref, total_ref, out_ref,
             q_smem, w_smem, k_smem, ksc_smem, o_smem, q_bar, q_free, kv_bar, free_bar):
    cta = lax.axis_index("cta")
    wg = lax.axis_index("wg")
    # CTA c takes the query blocks of launch order c, c + G, c + 2G, ... Heaviest first in a
    # causal prefill, so round-robin hands every CTA a near-equal share of the work.
    my_blocks = (num_q_blocks - cta + G - 1) // G
    my_tiles = total_ref[cta]   # key tiles over all of this CTA's query blocks

    def block_of(m):
      """(query block, its first token, its q buffer, first key tile, key tile count) of
      this CTA's m-th block."""
      j = cta + m * G
      qb = num_q_blocks - 1 - j if cfg.heavy_first else j
      t0, buf = qb * BQ, lax.rem(m, 2)
      lo = lo_ref[qb]
      return qb, t0, buf, lo, hi_ref[qb] - lo

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      if clean:
        ninf = o_smem.at[2]
        ninf[...] = jnp.full((BQ, BKV), -jnp.inf, f32)
        plgpu.commit_smem()

      def per_block(m, g):
        qb, t0, buf, lo, n = block_of(m)

        @pl.when(m >= 2)
        def _():
          plgpu.barrier_wait(q_free.at[buf])   # both consumers are done with block m - 2

        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(t0 * H, NQ)], q_smem.at[buf], q_bar.at[buf])
        plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(t0 * H, NQ)], w_smem.at[buf], q_bar.at[buf])

        @pl.loop(0, n)
        def _load(i):
          slot = lax.rem(g + i, NS)

          @pl.when(g + i >= NS)
          def _():
            plgpu.barrier_wait(free_bar.at[slot])

          s0 = (lo + i) * BKV
          plgpu.copy_gmem_to_smem(k_ref.at[pl.ds(s0, BKV)], k_smem.at[slot], kv_bar.at[slot])
          plgpu.copy_gmem_to_smem(ksc_ref.at[pl.ds(s0, BKV)], ksc_smem.at[slot], kv_bar.at[slot])

        if clean:
          # -inf for the tiles outside [lo, hi): TMA stores of one constant tile, issued
          # while the consumers work through the tiles just loaded.
          def fill(b):
            plgpu.copy_smem_to_gmem(ninf, out_ref.at[pl.ds(t0, BQ), pl.ds(b * BKV, BKV)])

          pl.loop(0, lo)(fill)
          pl.loop(lo + n, num_kv_blocks)(fill)
        return g + n

      lax.fori_loop(0, my_blocks, per_block, jnp.int32(0))
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      out_buf = o_smem.at[wg]

      def per_block(m, g):
        qb, t0, buf, lo, n = block_of(m)
        kss = [ks_ref[t0 + j] for j in range(BQ)]
        kes = [ke_ref[t0 + j] for j in range(BQ)]
        plgpu.barrier_wait(q_bar.at[buf])
        w = plgpu.load(w_smem.at[buf], layout=col_layout)

        # Tiles alternate between the two consumers by their CTA-wide index g + i.
        @pl.loop(lax.rem(wg + g, 2), n, step=2)
        def _step(i):
          slot = lax.rem(g + i, NS)
          s0 = (lo + i) * BKV
          plgpu.barrier_wait(kv_bar.at[slot])

          def mma(acc_ref):
            plgpu.wgmma(acc_ref, k_smem.at[slot], q_smem.at[buf].T)
            return acc_ref[...]

          s = pl.run_scoped(mma, plgpu.ACC((BKV, NQ), f32))
          ksc = plgpu.load(ksc_smem.at[slot], layout=row_layout)
          s = jnp.maximum(s, 0.0) * lax.broadcast_in_dim(w, (BKV, NQ), [1])
          pos = s0 + plgpu.broadcasted_iota(jnp.int32, (BKV,), 0, layout=row_layout)
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # our previous tile left out_buf
          for j in range(BQ):
            r = s[:, j * H:(j + 1) * H].sum(axis=1) * ksc
            out_buf[j, :] = jnp.where((pos >= kss[j]) & (pos < kes[j]), r, -jnp.inf)
          # commit_smem syncs the warpgroup, so every thread's read of ksc_smem[slot] is done
          # before the single-thread arrive that lets the producer refill the slot.
          plgpu.commit_smem()

          @pl.when(g + i + NS < my_tiles)
          def _():
            plgpu.barrier_arrive(free_bar.at[slot])

          plgpu.copy_smem_to_gmem(out_buf, out_ref.at[pl.ds(t0, BQ), pl.ds(s0, BKV)])

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
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((T, S_out), f32),  # rows past T: stores dropped
      grid=(G,),
      grid_names=("cta",),
      num_threads=3,
      thread_name="wg",
      scratch_types=[
          plgpu.SMEM((2, NQ, D), f8, transforms=_fp8_transforms()),  # double-buffered
          plgpu.SMEM((2, NQ), f32),                                  # queries and weights
          plgpu.SMEM((NS, BKV, D), f8, transforms=_fp8_transforms()),
          plgpu.SMEM((NS, BKV), f32),
          plgpu.SMEM((3, BQ, BKV), f32),        # one output tile per consumer + the -inf tile
          plgpu.Barrier(num_arrivals=2, num_barriers=2),   # q_bar: q and w landed
          plgpu.Barrier(num_arrivals=2, num_barriers=2),   # q_free: both consumers done
          plgpu.Barrier(num_arrivals=2, num_barriers=NS),  # kv_bar: key tile and scales landed
          plgpu.Barrier(num_arrivals=1, num_barriers=NS),  # free_bar: slot consumed
      ],
      compiler_params=plgpu.CompilerParams(),
      interpret=interpret,
  )


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
  # Key tiles per CTA (the consumers must know when the producer stops waiting on a slot).
  tiles = hi - lo
  if cfg.heavy_first:
    tiles = tiles[::-1]
  tiles = jnp.pad(tiles, (0, pl.cdiv(num_q_blocks, G) * G - num_q_blocks))
  total = tiles.reshape(-1, G).sum(axis=0).astype(jnp.int32)
  # TMA needs 16-byte row strides: for S % 4 != 0 the kernel writes a wider array that is
  # sliced (one extra copy, only for such S). One-row tiles (block_q = 1, i.e. H = 128) pad
  # to whole key tiles: on the H100 a one-row TMA store was seen not to be clipped at the
  # row end (paged kernel), so no tile may cross it.
  S_out = pl.cdiv(S, 4) * 4 if BQ > 1 else pl.cdiv(S, BKV) * BKV
  call = _build(T, T_pad, S, S_out, H, D, cfg, clean_logits, G, interpret or None)
  out = call(q_fp8.reshape(T * H, D), k_fp8, k_scale, weights.reshape(T * H), ks, ke, lo, hi,
             total)
  return out[:, :S] if S_out != S else out
