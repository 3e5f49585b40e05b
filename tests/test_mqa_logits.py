"""Ragged-prefill MQA logits: reference and xla backend against float64 numpy oracles."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import reference
from tests.helpers import (assert_same_inf_pattern, calc_diff, causal_ragged, dequantized,
                           mqa_logits_np, random_problem)


def _ragged_cases(rng):
  # (name, T, S, ks, ke)
  ks, ke, S = causal_ragged([3, 2], [10, 4])
  yield "spec_example", len(ks), S, ks, ke
  assert ks.tolist() == [0, 0, 0, 10, 10] and ke.tolist() == [8, 9, 10, 13, 14]
  ks, ke, S = causal_ragged([37, 1, 50, 13], [100, 1, 50, 29])
  yield "multi_request", len(ks), S, ks, ke
  S = 211
  ks = rng.integers(0, S, 41).astype(np.int32)
  ke = np.minimum(ks + rng.integers(1, 90, 41), S).astype(np.int32)
  yield "context_parallel", 41, S, ks, ke  # non-monotone ranges, as one CP rank sees them
  ks = np.array([0, 5, 7, 7], np.int32)
  ke = np.array([0, 5, 9, 7], np.int32)
  yield "empty_rows", 4, 9, ks, ke
  yield "T1", 1, 77, np.array([3], np.int32), np.array([70], np.int32)


@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_ragged_logits_match_float64(backend):
  rng = np.random.default_rng(1)
  for name, T, S, ks, ke in _ragged_cases(rng):
    p = random_problem(rng, T, S, H=64, ks=ks, ke=ke)
    args = (p["q_fp8"], p["k_fp8"], p["k_scale"], p["weights"], p["ks"], p["ke"])
    if backend == "reference":
      out = reference.mqa_logits(*args)
    else:
      out = nsa_jax.mqa_logits(*args, backend="xla")
    qd, kd = dequantized(p)
    ref = mqa_logits_np(qd, kd, p["k_scale"], p["weights"], ks, ke)
    assert out.shape == (T, S) and out.dtype == jnp.float32
    assert_same_inf_pattern(out, ref)
    assert calc_diff(out, ref) < 5e-6, name
    # Against the un-quantized bf16 inputs (DeepGEMM's looser bound).
    w_true = p["w_raw"] * 64 ** -0.5 * 128 ** -0.5
    ref_bf16 = mqa_logits_np(p["q"], p["k"], np.ones(S), w_true, ks, ke)
    # calc_diff is a statistic: the 1e-3 bound holds on many pairs, not on a handful.
    if np.isfinite(ref_bf16).sum() >= 256:
      assert calc_diff(out, ref_bf16) < 1e-3, name


def test_unclean_logits_leave_raw_values():
  rng = np.random.default_rng(2)
  p = random_problem(rng, 6, 33, H=8)
  args = (p["q_fp8"], p["k_fp8"], p["k_scale"], p["weights"], p["ks"], p["ke"])
  clean = reference.mqa_logits(*args)
  raw = reference.mqa_logits(*args, clean_logits=False)
  valid = ~np.isneginf(np.asarray(clean))
  np.testing.assert_array_equal(np.asarray(raw)[valid], np.asarray(clean)[valid])
  assert np.isfinite(np.asarray(raw)).all()


def test_out_of_range_ks_ke_are_clamped_not_read():
  rng = np.random.default_rng(3)
  p = random_problem(rng, 3, 20, H=8, ks=np.array([-5, 15, 12]), ke=np.array([4, 99, 3]))
  out = np.asarray(nsa_jax.mqa_logits(p["q_fp8"], p["k_fp8"], p["k_scale"], p["weights"],
                                      p["ks"], p["ke"], backend="xla"))
  assert np.isfinite(out[0, :4]).all() and np.isneginf(out[0, 4:]).all()
  assert np.isfinite(out[1, 15:]).all() and np.isneginf(out[1, :15]).all()
  assert np.isneginf(out[2]).all()


@pytest.mark.slow
def test_reference_is_memory_bounded_at_32k():
  """T = S = 32768, H = 64 must compile to a program whose temporaries are far below the
  [T, H, S] (256 GiB) intermediate: only the logits and one chunk are live."""
  T = S = 32768
  f = jax.jit(lambda *a: reference.mqa_logits(*a, fp8_dot=True))
  shapes = (jax.ShapeDtypeStruct((T, 64, 128), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((S, 128), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((S,), jnp.float32), jax.ShapeDtypeStruct((T, 64), jnp.float32),
            jax.ShapeDtypeStruct((T,), jnp.int32), jax.ShapeDtypeStruct((T,), jnp.int32))
  mem = f.trace(*shapes).lower().compile().memory_analysis()
  logits_bytes = T * S * 4
  assert mem.temp_size_in_bytes + mem.output_size_in_bytes < 3 * logits_bytes, mem


# --------------------------------------------------------------------------- Pallas kernel

def _interpret_params(races=False):
  from jax.experimental.pallas import mosaic_gpu as plgpu
  # Uninitialized memory reads as NaN: an output element the kernel forgot stays NaN.
  return plgpu.InterpretGPUParams(detect_races=races, uninitialized_memory="nan")


def _variant_names():
  from kernels_pallas import mqa_logits as kernel
  return list(kernel.variant_configs(64))


VARIANTS = _variant_names()
# Every variant over the ragged cases at H = 64; the default schedule at every H.
_SWEEP = [(v, 64) for v in VARIANTS] + [("default", 32), ("default", 128)]


@pytest.mark.parametrize("variant,H", _SWEEP)
def test_kernel_interpret_matches_float64(variant, H):
  from kernels_pallas import mqa_logits as kernel
  cfg = kernel.variant_configs(H)[variant]
  rng = np.random.default_rng(20 + H)
  for name, T, S, ks, ke in _ragged_cases(rng):
    if T * S > 10_000:
      continue  # interpret mode is slow; the larger cases run on the GPU
    p = random_problem(rng, T, S, H=H, ks=ks, ke=ke)
    out = kernel.mqa_logits(p["q_fp8"], p["k_fp8"], p["k_scale"], p["weights"], p["ks"], p["ke"],
                            interpret=_interpret_params(), config=cfg)
    qd, kd = dequantized(p)
    ref = mqa_logits_np(qd, kd, p["k_scale"], p["weights"], ks, ke)
    assert not np.isnan(np.asarray(out)).any(), f"{name}: unwritten output elements"
    assert_same_inf_pattern(out, ref)
    assert calc_diff(out, ref) < 5e-6, name


# Every variant at H = 64; at H = 32 (4 queries a block) and H = 128 (one query a block:
# one-row stores, a query's heads across both halves of split_n) those whose tiles, fills or
# epilogue differ from a variant already covered there (CPU time).
_RACE = [(v, 64) for v in VARIANTS] + [
    (v, h) for h in (32, 128)
    for v in ("default", "two_wg", "ob2_fill2", "split_n", "nc3_split", "nc4_split_n",
              "nc4_alt", "direct")]


@pytest.mark.parametrize("variant,H", _RACE)
def test_kernel_interpret_race_free_multi_tile(variant, H):
  """Several key tiles per query block through the ring, all consumers, a persistent grid of
  2 CTAs each looping over several query blocks (the ring and the double-buffered queries
  cross block boundaries), S and T not multiples of the tiles, -inf fills before and after
  the span (wide ones included), an empty block; the interpreter's race detector must stay
  silent and no output element may stay unwritten."""
  from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
  from kernels_pallas import mqa_logits as kernel
  rng = np.random.default_rng(7)
  ks, ke, S = causal_ragged([3, 4, 2], [700, 9, 130])
  ke[-2:] = ks[-2:]  # the last query block sees no key at all
  p = random_problem(rng, len(ks), S, H=H, ks=ks, ke=ke)
  cfg = dataclasses.replace(kernel.variant_configs(H)[variant], num_ctas=2)
  out = kernel.mqa_logits(p["q_fp8"], p["k_fp8"], p["k_scale"], p["weights"], p["ks"], p["ke"],
                          interpret=_interpret_params(races=True), config=cfg)
  assert not get_races().races_found
  ref = mqa_logits_np(*dequantized(p), p["k_scale"], p["weights"], ks, ke)
  assert not np.isnan(np.asarray(out)).any(), "unwritten output elements"
  assert_same_inf_pattern(out, ref)
  assert calc_diff(out, ref) < 5e-6


def _walk_schedule(sched, tiles, G, cfg):
  """Replays the kernel's walk over ``_schedule``'s table: per CTA the tiles it computes,
  per block (launch order) the tiles computed and how often it was filled before/after."""
  t = tiles[::-1] if cfg.heavy_first else tiles
  rounds = len(t) // G
  sc = np.asarray(sched).reshape(5, G)
  done, before, after, per_cta, tail_units = (np.zeros(len(t), int), np.zeros(len(t), int),
                                              np.zeros(len(t), int), [], [])
  for c in range(G):
    j0, nb, off0, off1, total = sc[:, c]
    count = tail = 0
    for m in range(nb):
      if m < rounds:
        j = m * G + (c if m % 2 == 0 or not cfg.balance else G - 1 - c)
      else:
        j = rounds * G + j0 + (m - rounds)
      units = max(t[j], 1)
      u0 = off0 if m == rounds else 0
      u1 = min(off1, units) if m >= rounds and m == nb - 1 else units
      n = max(min(u1, t[j]) - u0, 0)
      tail += (u1 - u0) if m >= rounds else 0
      done[j] += n
      count += n
      before[j] += u0 == 0
      after[j] += u1 == units
    assert count == total, "the table's tile count disagrees with its ranges"
    per_cta.append(total)
    tail_units.append(tail)
  return t, done, before, after, np.array(per_cta), np.array(tail_units)


@pytest.mark.parametrize("balance", [True, False])
def test_schedule_covers_every_tile_once(balance):
  """Every key tile of every query block is computed by exactly one CTA, every block's -inf
  fill before and after its span is written exactly once (empty blocks included), and the
  balanced schedule cuts the partial round into runs of equal length (+-1 unit)."""
  from kernels_pallas import mqa_logits as kernel
  rng = np.random.default_rng(11)
  for trial in range(60):
    nblk = int(rng.integers(1, 50))
    G = int(rng.integers(1, nblk + 1))
    tiles = rng.integers(0, 2 if trial % 3 == 0 else 9, nblk).astype(np.int32)
    for heavy_first in (True, False):
      cfg = dataclasses.replace(kernel.MqaLogitsConfig.for_heads(64), balance=balance,
                                heavy_first=heavy_first)
      sched = kernel._schedule(jnp.asarray(tiles), G, cfg)
      t, done, before, after, per_cta, tail = _walk_schedule(sched, tiles, G, cfg)
      np.testing.assert_array_equal(done, t)
      assert (before == 1).all() and (after == 1).all()
      if balance:  # the partial round's units cut evenly
        units = np.maximum(t[len(t) // G * G:], 1).sum()
        assert tail.max() <= -(-units // G) and tail.sum() == units


@pytest.mark.parametrize("balance", [True, False])
def test_schedule_has_no_loop(balance):
  """The schedule is straight-line XLA: a loop in it (jnp.searchsorted's default method) runs
  on a GPU one step at a time (about 25 us of kernel time at 2048 x 8192 on the H200)."""
  from kernels_pallas import mqa_logits as kernel
  cfg = dataclasses.replace(kernel.MqaLogitsConfig.for_heads(64), balance=balance)
  tiles = jnp.arange(1024, dtype=jnp.int32)          # 7 whole rounds of 132 and 100 blocks
  text = jax.jit(lambda t: kernel._schedule(t, 132, cfg)).lower(tiles).as_text()
  assert "stablehlo.while" not in text


def test_schedule_balances_a_causal_prefill():
  """8192 causal queries over 32768 keys at H = 64 (4096 blocks, 31 whole rounds on 132
  SMs): whole blocks in turn leave the busiest CTA ~3% above the mean; snake rounds and the
  partial round cut evenly, within 0.3%."""
  from kernels_pallas import mqa_logits as kernel
  ke = np.arange(8192) + 32768 - 8192 + 1
  tiles = -(-ke.reshape(-1, 2).max(axis=1) // 256)
  cfg = kernel.MqaLogitsConfig.for_heads(64)
  for balance, worst in ((False, 1.025), (True, 1.003)):
    c = dataclasses.replace(cfg, balance=balance)
    per_cta = np.asarray(kernel._schedule(jnp.asarray(tiles, jnp.int32), 132, c))[4 * 132:]
    assert per_cta.sum() == tiles.sum()
    assert (per_cta.max() / per_cta.mean() > worst) == (not balance)


@pytest.mark.parametrize("variant", ["default", "two_wg"])
def test_kernel_interpret_blocks_shared_by_ctas(variant):
  """3 CTAs over 5 query blocks (one of them empty): the balanced split cuts blocks
  mid-span, so a block's tiles, its -inf fill before and after, and its query load are
  spread over two CTAs. Race-free, nothing unwritten, values and -inf pattern exact."""
  from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
  from kernels_pallas import mqa_logits as kernel
  rng = np.random.default_rng(12)
  cfg = dataclasses.replace(kernel.variant_configs(64)[variant], num_ctas=3, balance=True)
  S = 600
  ks = np.array([140, 140, 30, 300, 5, 5, 7, 7, 0], np.int32)
  ke = np.array([560, 600, 420, 431, 400, 450, 7, 7, 1], np.int32)
  # The wrapper's spans: key tiles per block of 2 queries (block 3 is empty).
  B = cfg.block_kv
  kb, keb = np.pad(ks, (0, 1)).reshape(-1, 2), np.pad(ke, (0, 1)).reshape(-1, 2)
  lo = np.where(keb > kb, kb, S).min(1) // B
  hi = -(-np.where(keb > kb, keb, 0).max(1) // B)
  tiles = np.maximum(hi - np.minimum(lo, -(-S // B)), 0).astype(np.int32)
  sched = np.asarray(kernel._schedule(jnp.asarray(tiles), 3, cfg))
  # a CTA that starts a block of the partial round from mid-span
  cut = (sched[2 * 3:3 * 3] > 0) & (sched[3:2 * 3] > len(tiles) // 3)
  assert cut.any(), "no block is cut: the test misses its aim"
  p = random_problem(rng, len(ks), S, H=64, ks=ks, ke=ke)
  out = kernel.mqa_logits(p["q_fp8"], p["k_fp8"], p["k_scale"], p["weights"], p["ks"], p["ke"],
                          interpret=_interpret_params(races=True), config=cfg)
  assert not get_races().races_found
  ref = mqa_logits_np(*dequantized(p), p["k_scale"], p["weights"], ks, ke)
  assert not np.isnan(np.asarray(out)).any(), "unwritten output elements"
  assert_same_inf_pattern(out, ref)
  assert calc_diff(out, ref) < 5e-6


# Without clean_logits only the -inf fill is left out: the schedules with their own fill or
# tile layout.
@pytest.mark.parametrize("variant", ["default", "two_wg", "ob2_fill2", "nc3_split",
                                     "nc4_split_n", "direct"])
def test_kernel_interpret_unclean_matches_on_valid_entries(variant):
  from kernels_pallas import mqa_logits as kernel
  rng = np.random.default_rng(8)
  ks, ke, S = causal_ragged([5], [300])
  p = random_problem(rng, 5, S, H=64, ks=ks, ke=ke)
  args = (p["q_fp8"], p["k_fp8"], p["k_scale"], p["weights"], p["ks"], p["ke"])
  out = np.asarray(kernel.mqa_logits(*args, clean_logits=False, interpret=_interpret_params(),
                                     config=kernel.variant_configs(64)[variant]))
  ref = mqa_logits_np(*dequantized(p), p["k_scale"], p["weights"], ks, ke)
  valid = np.isfinite(ref)
  assert calc_diff(np.where(valid, out, 0), np.where(valid, ref, 0)) < 5e-6


def test_kernel_config_rejects_unsupported_schedules():
  from kernels_pallas import mqa_logits as kernel
  C = kernel.MqaLogitsConfig
  for H in (16, 32, 64, 128):
    for cfg in kernel.variant_configs(H).values():
      cfg.check(H)
  bad = [C(block_q=3),                                          # block_q * H = 192
         C(block_q=2, block_kv=256),                            # 256-row accumulator
         C(block_q=2, num_consumers=4),                         # 128 x 128 acc for 4 WGs
         C(block_q=2, block_kv=64, num_consumers=3),            # 4 stages for 3 in turn
         C(block_q=2, block_kv=192, num_consumers=4, kv_split=True),
         C(block_q=2, fill_tiles=3),                            # 384-key TMA box
         C(block_q=2, out_buffers=3),
         C(block_q=2, release="fence"),                         # needs direct_store
         C(block_q=2, direct_store=True, release="none")]
  for cfg in bad:
    with pytest.raises(ValueError, match="mqa_logits kernel: unsupported config"):
      cfg.check(64)


def test_public_op_interpret_flag():
  rng = np.random.default_rng(9)
  p = random_problem(rng, 3, 40, H=32)
  args = (p["q_fp8"], p["k_fp8"], p["k_scale"], p["weights"], p["ks"], p["ke"])
  out = nsa_jax.mqa_logits(*args, interpret=True)
  ref = nsa_jax.mqa_logits(*args, backend="xla")
  assert_same_inf_pattern(out, ref)
  assert calc_diff(out, ref) < 5e-6


@pytest.mark.parametrize("T,S,H", [(8192, 65536, 64), (300, 1001, 32), (1, 77, 64), (4, 8, 128)])
def test_kernel_cross_lowers_to_cuda(T, S, H):
  """Real Mosaic GPU lowering (layouts, wgmma operand rules, TMA strides) from the CPU box,
  through the public op: an abstract GPU mesh tells it the call is meant for a GPU."""
  f = jax.jit(lambda *a: nsa_jax.mqa_logits(*a, backend="pallas"))
  shapes = (jax.ShapeDtypeStruct((T, H, 128), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((S, 128), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((S,), jnp.float32), jax.ShapeDtypeStruct((T, H), jnp.float32),
            jax.ShapeDtypeStruct((T,), jnp.int32), jax.ShapeDtypeStruct((T,), jnp.int32))
  gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                    platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                   abstract_device=gpu)
  with jax.sharding.use_abstract_mesh(mesh):
    text = f.trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("H", [64, 32, 128])
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_variants_cross_lower_to_cuda(variant, H):
  """Every candidate schedule lowers for CUDA (wgmma shapes, TMA boxes, layouts), at a long
  causal shape and at ragged lengths that are not multiples of the tiles."""
  from kernels_pallas import mqa_logits as kernel
  cfg = kernel.variant_configs(H)[variant]
  for T, S in [(8192, 65536), (300, 1001)]:
    f = jax.jit(lambda *a: kernel.mqa_logits(*a, config=cfg))
    shapes = (jax.ShapeDtypeStruct((T, H, 128), jnp.float8_e4m3fn),
              jax.ShapeDtypeStruct((S, 128), jnp.float8_e4m3fn),
              jax.ShapeDtypeStruct((S,), jnp.float32), jax.ShapeDtypeStruct((T, H), jnp.float32),
              jax.ShapeDtypeStruct((T,), jnp.int32), jax.ShapeDtypeStruct((T,), jnp.int32))
    with jax.sharding.use_abstract_mesh(_abstract_gpu_mesh()):
      text = f.trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def _abstract_gpu_mesh():
  gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                    platform="gpu")
  return jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                   abstract_device=gpu)


# --------------------------------------------------------------------------- GPU (H100)

def _gpu_calc_diff(x, y):
  x = jnp.where(jnp.isneginf(x), 0.0, x)
  y = jnp.where(jnp.isneginf(y), 0.0, y)
  return float(1.0 - 2.0 * jnp.sum(x * y) / jnp.sum(x * x + y * y))


def _gpu_problem(T, S, H, causal, seed):
  rng = np.random.default_rng(seed)
  if causal:
    ks = np.zeros(T, np.int32)
    ke = (np.arange(T) + S - T + 1).astype(np.int32)
  else:  # ragged multi-request with context-parallel style ranges and some empty rows
    ks = rng.integers(0, S, T).astype(np.int32)
    ke = np.minimum(ks + rng.integers(0, S, T), S).astype(np.int32)
    ke[::17] = ks[::17]
  q8, qs = nsa_jax.act_quant(jax.random.normal(jax.random.key(seed), (T, H, 128), jnp.bfloat16))
  k8, kscale = nsa_jax.act_quant(jax.random.normal(jax.random.key(seed + 1), (S, 128), jnp.bfloat16))
  w = jax.random.normal(jax.random.key(seed + 2), (T, H)) * H ** -0.5 * qs[..., 0] * 128 ** -0.5
  return (q8, k8, kscale[:, 0], w, jnp.asarray(ks), jnp.asarray(ke))


@pytest.mark.gpu
@pytest.mark.parametrize("T,S,H,causal", [
    (1, 4096, 64, True), (300, 1001, 64, False), (300, 4099, 32, True), (2048, 8192, 64, True),
    (2048, 8192, 32, False), (8192, 32768, 64, True), (8192, 65536, 64, True),
    (8192, 16384, 32, False), (300, 1001, 128, False)])
def test_kernel_gpu_matches_reference(T, S, H, causal):
  args = _gpu_problem(T, S, H, causal, seed=T + S + H)
  ref = jax.jit(lambda *a: reference.mqa_logits(*a))(*args)
  poison = jnp.full((T, S), jnp.nan, jnp.float32)  # likely reused by the kernel's output
  poison.block_until_ready()
  del poison
  out = jax.jit(lambda *a: nsa_jax.mqa_logits(*a, backend="pallas"))(*args)
  assert not bool(jnp.isnan(out).any()), "unwritten or NaN output elements"
  assert bool((jnp.isneginf(out) == jnp.isneginf(ref)).all()), "-inf pattern differs"
  assert _gpu_calc_diff(out, ref) < 5e-6


@pytest.mark.gpu
def test_kernel_gpu_deterministic():
  args = _gpu_problem(2048, 16384, 64, True, seed=5)
  f = jax.jit(lambda *a: nsa_jax.mqa_logits(*a, backend="pallas"))
  first = np.asarray(f(*args))
  for _ in range(19):
    np.testing.assert_array_equal(np.asarray(f(*args)), first)


@pytest.mark.gpu
@pytest.mark.parametrize("T,S,H,causal", [
    (1, 4096, 64, True), (300, 1001, 64, False), (300, 4099, 32, True),
    (300, 1001, 128, False), (2048, 8192, 64, True)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_variants_gpu_match_reference(variant, T, S, H, causal):
  """Every candidate schedule on the GPU, at lengths that are not multiples of any tile (key
  row slices and output stores past S, one-row stores at H = 128) and a causal prefill."""
  from kernels_pallas import mqa_logits as kernel
  args = _gpu_problem(T, S, H, causal, seed=T + S + H + 1)
  ref = jax.jit(lambda *a: reference.mqa_logits(*a))(*args)
  cfg = kernel.variant_configs(H)[variant]
  out = jax.jit(lambda *a: kernel.mqa_logits(*a, config=cfg))(*args)
  assert not bool(jnp.isnan(out).any()), "unwritten or NaN output elements"
  assert bool((jnp.isneginf(out) == jnp.isneginf(ref)).all()), "-inf pattern differs"
  assert _gpu_calc_diff(out, ref) < 5e-6
