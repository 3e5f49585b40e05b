"""Paged-decode MQA logits: reference, xla backend and the Pallas kernel (interpret mode, CUDA
cross-lowering, and ``-m gpu`` cases) against a float64 numpy oracle or the reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import reference
from tests.helpers import assert_same_inf_pattern, calc_diff, paged_mqa_logits_np, paged_problem


def _call(p, backend, **kw):
  return nsa_jax.paged_mqa_logits(p["q_fp8"], p["cache"], p["weights"], p["context_lens"],
                                  p["block_tables"], max_context_len=p["max_context_len"],
                                  backend=backend, **kw)


def _reference(p, clean_logits=True):
  return reference.paged_mqa_logits(p["q_fp8"], p["cache"].k_fp8, p["cache"].k_scale,
                                    p["weights"], p["context_lens"], p["block_tables"],
                                    max_context_len=p["max_context_len"],
                                    clean_logits=clean_logits)


def _interpret(races=False):
  from jax.experimental.pallas import mosaic_gpu as plgpu
  # Uninitialized memory (outputs included) reads as NaN: an element the kernel forgot to
  # write stays NaN and fails the -inf pattern check.
  return plgpu.InterpretGPUParams(detect_races=races, uninitialized_memory="nan")


def _kernel(p, config=None, clean_logits=True, races=False):
  from kernels_pallas import paged_mqa_logits as kernel
  return kernel.paged_mqa_logits(p["q_fp8"], p["cache"].k_fp8, p["cache"].k_scale,
                                 p["weights"], p["context_lens"], p["block_tables"],
                                 max_context_len=p["max_context_len"],
                                 clean_logits=clean_logits, interpret=_interpret(races),
                                 config=config)


@pytest.mark.parametrize("next_n", [1, 2, 3, 4])
@pytest.mark.parametrize("backend", ["reference", "xla", "interpret"])
def test_paged_matches_float64(next_n, backend):
  rng = np.random.default_rng(10 + next_n)
  # a context shorter than next_n, exactly one page, an empty row, odd lengths; shuffled pages.
  p = paged_problem(rng, [1, 64, 0, 150, 333], next_n=next_n, H=32)
  if backend == "reference":
    out = _reference(p)
  elif backend == "xla":
    out = _call(p, "xla")
  else:
    out = _call(p, "pallas", interpret=True)
  ref = paged_mqa_logits_np(p)
  assert out.shape == ref.shape and out.dtype == jnp.float32
  assert_same_inf_pattern(out, ref)
  assert calc_diff(out, ref) < 5e-6
  # The empty request (row 2) is all -inf.
  assert np.isneginf(np.asarray(out).reshape(5, next_n, -1)[2]).all()


def test_paged_bad_pages_are_masked():
  rng = np.random.default_rng(3)
  p = paged_problem(rng, [130], H=32)
  tables = np.asarray(p["block_tables"]).copy()
  tables[0, 1] = 10_000  # out of range page id: its tokens become -inf, nothing is read
  p["block_tables"] = tables
  out = np.asarray(_call(p, "xla"))
  assert np.isfinite(out[0, :64]).all() and np.isneginf(out[0, 64:128]).all()
  assert np.isfinite(out[0, 128:130]).all()


@pytest.mark.parametrize("next_n,lens,H,L", [
    (3, [2], 32, None),                 # B = 1, context shorter than next_n
    (3, [3, 64, 129], 64, 200),         # context == next_n, a page edge, one past it
    (4, [1], 16, 64),                   # B = 1, a one-token context in a one-page row
    (4, [0, 65, 128], 32, 130),         # an empty row, page edges, width not a page multiple
    (3, [2, 63, 130], 128, None),       # H = 128: groups of one query token
])
def test_wide_next_n_kernel_matches_float64(next_n, lens, H, L):
  """next_n 3 and 4 through ops' Pallas path (interpret mode), one launch with several wgmma
  groups per page (one query token per group at H = 128): exact -inf pattern and values
  against the float64 oracle, rows as b * n + t."""
  rng = np.random.default_rng(100 + next_n + len(lens))
  p = paged_problem(rng, lens, next_n=next_n, H=H, max_context_len=L)
  out = _call(p, "pallas", interpret=True)
  ref = paged_mqa_logits_np(p)
  assert out.shape == ref.shape == (len(lens) * next_n, p["max_context_len"])
  assert_same_inf_pattern(out, ref)
  assert calc_diff(out, ref) < 5e-6
  # Valid values as well with unclean logits (the -inf entries are unspecified there).
  unclean = np.asarray(_call(p, "pallas", interpret=True, clean_logits=False))
  valid = ~np.isneginf(ref)
  assert calc_diff(np.where(valid, unclean, 0.0), np.where(valid, ref, 0.0)) < 5e-6


def test_next_n_above_the_tested_range_is_refused():
  rng = np.random.default_rng(4)
  p = paged_problem(rng, [10, 70], next_n=5, H=16)
  for backend in ("xla", "pallas"):
    with pytest.raises(ValueError, match=r"^paged_mqa_logits: next_n must be in 1\.\.4 "
                       r"\(the tested range\), got next_n=5 from q_fp8 \[B, next_n, H, D\] = "
                       r"\[2, 5, 16, 128\]$"):
      _call(p, backend, interpret=backend == "pallas")


# --------------------------------------------------------------------------- Pallas kernel

@pytest.mark.parametrize("pages_per_split,num_stages", [(1, 1), (2, 3), (8, 2)])
def test_kernel_splits_stages_and_poison(pages_per_split, num_stages):
  """Every split/stage shape writes every output element (NaN-poisoned outputs), including
  the -inf tail past each context and a width that is neither a page nor 4-float multiple."""
  from kernels_pallas import paged_mqa_logits as kernel
  rng = np.random.default_rng(pages_per_split)
  p = paged_problem(rng, [200, 5, 64, 0, 321], next_n=2, H=16, max_context_len=455)
  cfg = kernel.PagedConfig(pages_per_split=pages_per_split, num_stages=num_stages)
  out = np.asarray(_kernel(p, cfg, races=pages_per_split == 2))
  assert out.shape == (10, 455)
  assert not np.isnan(out).any(), "unwritten output elements"
  ref = paged_mqa_logits_np(p)
  assert_same_inf_pattern(out, ref)
  assert calc_diff(out, ref) < 5e-6
  if pages_per_split == 2:
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
    assert not get_races().races_found


# Kernel variants (PagedConfig): small persistent grids so that one CTA crosses several
# requests and some CTAs get no page, as well as the default grid.
def _variants():
  from kernels_pallas import paged_mqa_logits as kernel
  P = kernel.PagedConfig
  return {"grid": None,
          "grid_p2_s2": P(pages_per_split=2, num_stages=2, direct_store=True),
          "grid_smem_store": P(pages_per_split=2, num_stages=2),
          "grid_w_smem": P(pages_per_split=3, num_stages=3, hoist_weights=False),
          "pers_3ctas_s2": P(schedule="persistent", ctas_per_sm=1, num_sms=3, num_stages=2),
          "pers_16ctas_s4": P(schedule="persistent", ctas_per_sm=2, num_sms=8, num_stages=4)}


@pytest.mark.parametrize("variant", ["grid", "grid_p2_s2", "grid_smem_store", "grid_w_smem",
                                     "pers_3ctas_s2", "pers_16ctas_s4"])
@pytest.mark.parametrize("next_n", [1, 2, 3, 4])
def test_kernel_variants_match_float64(variant, next_n):
  """Every variant at next_n 1..4 in one launch (3 and 4: two wgmma groups over one page load
  at H = 64): exact -inf pattern and calc_diff against the float64 oracle, every output
  element written (NaN-poisoned outputs); ragged contexts with an empty one, a one-page one,
  lengths shorter than next_n and not multiples of 64, and a width that is not whole pages."""
  rng = np.random.default_rng(40 + next_n)
  H = 64 if next_n > 2 else 32
  p = paged_problem(rng, [1, 64, 0, 150, 333, 2], next_n=next_n, H=H, max_context_len=340)
  out = np.asarray(_kernel(p, _variants()[variant]))
  assert out.shape == (6 * next_n, 340)
  assert not np.isnan(out).any(), "unwritten output elements"
  ref = paged_mqa_logits_np(p)
  assert_same_inf_pattern(out, ref)
  assert calc_diff(out, ref) < 5e-6


@pytest.mark.parametrize("next_n,H", [(2, 64), (3, 32), (4, 32), (2, 32)])
@pytest.mark.parametrize("schedule", ["grid", "persistent"])
def test_kernel_group_rows_64(next_n, H, schedule):
  """group_rows=64: a request's query rows in 64-row wgmma groups, all in flight before the
  first epilogue (next_n * H <= 128: 2 x 64, 64 + 32, 2 x 64 rows; one group at 2 x 32),
  NaN-poisoned outputs, races checked: exact -inf pattern and values against float64."""
  from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
  from kernels_pallas import paged_mqa_logits as kernel
  assert kernel._overlapped(next_n, H, 64) == (next_n * H > 64)
  rng = np.random.default_rng(50 + next_n + H)
  p = paged_problem(rng, [1, 64, 0, 150, 333, 2], next_n=next_n, H=H, max_context_len=340)
  extra = (dict(ctas_per_sm=1, num_sms=3) if schedule == "persistent"
           else dict(pages_per_split=2))
  cfg = kernel.PagedConfig(schedule=schedule, num_stages=2, group_rows=64, **extra)
  out = np.asarray(_kernel(p, cfg, races=True))
  assert not get_races().races_found
  assert not np.isnan(out).any(), "unwritten output elements"
  ref = paged_mqa_logits_np(p)
  assert_same_inf_pattern(out, ref)
  assert calc_diff(out, ref) < 5e-6


@pytest.mark.parametrize("next_n,H,clean,release", [
    (1, 64, True, "barrier"), (2, 64, True, "barrier"), (4, 64, True, "barrier"),
    (2, 64, False, "barrier"), (3, 32, True, "barrier"), (1, 128, True, "barrier"),
    (1, 64, True, "fence"), (2, 64, True, "arrive"), (2, 64, False, "fence"),
    (4, 32, True, "arrive")])
def test_kernel_direct_store(next_n, H, clean, release):
  """direct_store: logits from registers straight to GMEM, the slot refilled right after the
  page's wgmmas (or, release "fence"/"arrive", one page later after every thread's arrival), no
  automatic barriers. Races checked, NaN-poisoned outputs (every element written when
  clean), exact -inf pattern and values against float64; ragged contexts with an empty one,
  lengths shorter than next_n, a width that is not whole pages; with a deferred refill splits
  of 4 pages over a 2- or 3-slot ring, so that slots are refilled inside a split."""
  from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
  from kernels_pallas import paged_mqa_logits as kernel
  rng = np.random.default_rng(60 + next_n + H)
  p = paged_problem(rng, [1, 64, 0, 150, 333, 2], next_n=next_n, H=H, max_context_len=340)
  if release != "barrier":
    cfg = kernel.PagedConfig(pages_per_split=4, num_stages=2 + (next_n == 4),
                             direct_store=True, release=release)
  else:
    cfg = kernel.PagedConfig(pages_per_split=2, num_stages=2, direct_store=True)
  out = np.asarray(_kernel(p, cfg, clean_logits=clean, races=True))
  assert not get_races().races_found
  ref = paged_mqa_logits_np(p)
  if clean:
    assert not np.isnan(out).any(), "unwritten output elements"
    assert_same_inf_pattern(out, ref)
    assert calc_diff(out, ref) < 5e-6
  else:
    valid = ~np.isneginf(ref)
    assert calc_diff(np.where(valid, out, 0.0), np.where(valid, ref, 0.0)) < 5e-6
  with pytest.raises(ValueError, match="direct_store needs schedule='grid'"):
    kernel.PagedConfig(schedule="persistent", direct_store=True)
  with pytest.raises(ValueError, match="release='fence' needs direct_store"):
    kernel.PagedConfig(release="fence")
  with pytest.raises(ValueError, match="release must be one of"):
    kernel.PagedConfig(direct_store=True, release="none")


@pytest.mark.parametrize("variant", ["grid_p2_s2", "pers_3ctas_s2"])
def test_kernel_wide_queries(variant):
  """next_n = 4 at H = 128: 512 query rows, copied in two TMA boxes of 256 rows, and four
  wgmma groups of one query token each over one page load."""
  rng = np.random.default_rng(11)
  p = paged_problem(rng, [3, 64, 0, 150], next_n=4, H=128)
  out = np.asarray(_kernel(p, _variants()[variant]))
  assert not np.isnan(out).any(), "unwritten output elements"
  ref = paged_mqa_logits_np(p)
  assert_same_inf_pattern(out, ref)
  assert calc_diff(out, ref) < 5e-6


@pytest.mark.parametrize("variant", ["pers_3ctas_s2", "pers_16ctas_s4"])
def test_persistent_batch_of_one_races_and_unclean(variant):
  """B = 1 (most CTAs idle or one page each), race detection on; and unclean logits keep the
  valid values."""
  from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
  rng = np.random.default_rng(7)
  cfg = _variants()[variant]
  p = paged_problem(rng, [389], next_n=2, H=16)
  out = np.asarray(_kernel(p, cfg, races=True))
  assert not get_races().races_found
  ref = paged_mqa_logits_np(p)
  assert_same_inf_pattern(out, ref)
  assert calc_diff(out, ref) < 5e-6
  p = paged_problem(rng, [70, 3, 0], next_n=2, H=64, max_context_len=200)
  out = np.asarray(_kernel(p, cfg, clean_logits=False))
  ref = paged_mqa_logits_np(p)
  valid = ~np.isneginf(ref)
  assert calc_diff(np.where(valid, out, 0.0), np.where(valid, ref, 0.0)) < 5e-6


def test_paged_plan_splits_pages_evenly():
  """paged_plan against a brute-force walk: non-empty requests first, in order; CTA runs that
  differ by at most one page and tile the batch's pages; each start names the right
  (request, page); contexts past max_context_len or negative are clipped."""
  from kernels_pallas import paged_mqa_logits as kernel
  rng = np.random.default_rng(8)
  for B, G, L in [(1, 5, 4096), (7, 3, 500), (16, 40, 2000), (5, 2, 64)]:
    ctx = rng.integers(-3, L + 200, B).astype(np.int32)
    ctx[rng.random(B) < 0.3] = 0
    req, starts = (np.asarray(x) for x in kernel.paged_plan(jnp.asarray(ctx), L, G))
    pages = np.minimum((np.maximum(ctx, 0) + 63) // 64, -(-L // 64))
    full = [b for b in range(B) if pages[b] > 0]
    assert req[:, 0].tolist() == full + [b for b in range(B) if pages[b] == 0]
    np.testing.assert_array_equal(req[:, 1], pages[req[:, 0]])
    np.testing.assert_array_equal(req[:, 2], ctx[req[:, 0]])
    walk = [(r, j) for r, b in enumerate(full) for j in range(pages[b])]
    total = len(walk)
    assert starts[0, 2] == 0 and starts[-1, 2] == total
    runs = np.diff(starts[:, 2])
    assert runs.min() >= total // G and runs.max() <= -(-total // G)
    for r, j, f in starts:
      assert (r, j) == (walk[f] if f < total else (len(full), 0))


def test_persistent_plan_argument():
  """A plan made once (per decode step) gives the same logits as the one made inside; a plan
  of the wrong shape, or one for the grid schedule, is refused by name."""
  from kernels_pallas import paged_mqa_logits as kernel
  rng = np.random.default_rng(9)
  cfg = _variants()["pers_3ctas_s2"]
  p = paged_problem(rng, [90, 0, 200], next_n=1, H=16)
  plan = kernel.paged_plan(p["context_lens"], p["max_context_len"], cfg.num_ctas)
  f = lambda plan, config=cfg: kernel.paged_mqa_logits(  # noqa: E731
      p["q_fp8"], p["cache"].k_fp8, p["cache"].k_scale, p["weights"], p["context_lens"],
      p["block_tables"], plan, max_context_len=p["max_context_len"], interpret=_interpret(),
      config=config)
  np.testing.assert_array_equal(np.asarray(f(plan)), np.asarray(_kernel(p, cfg)))
  bad = kernel.paged_plan(p["context_lens"], p["max_context_len"], cfg.num_ctas + 1)
  with pytest.raises(ValueError, match=r"plan must be paged_plan's"):
    f(bad)
  with pytest.raises(ValueError, match=r"plan is only used by schedule='persistent'"):
    f(plan, kernel.PagedConfig())


def test_config_and_shared_memory_checks():
  from kernels_pallas import paged_mqa_logits as kernel
  with pytest.raises(ValueError, match="schedule must be one of"):
    kernel.PagedConfig(schedule="stream")
  with pytest.raises(ValueError, match="num_stages must be <= 32"):
    kernel.PagedConfig(num_stages=33)
  assert kernel.smem_bytes(1, 64, kernel.PagedConfig()) == 46080  # 4 CTAs fit an SM
  rng = np.random.default_rng(0)
  p = paged_problem(rng, [10], next_n=4, H=128)
  with pytest.raises(ValueError, match="bytes of shared memory per CTA"):
    _kernel(p, kernel.PagedConfig(schedule="persistent", num_stages=16))


def test_kernel_bad_values_match_reference():
  """Out-of-range page ids, a context past the table's width and past max_context_len, and
  garbage in table entries past the last page: same -inf pattern and values as the reference,
  and (interpret mode raises on out-of-bounds reads) nothing read out of bounds."""
  from kernels_pallas import paged_mqa_logits as kernel
  rng = np.random.default_rng(5)
  p = paged_problem(rng, [130, 100, 190, 60], next_n=2, H=32, max_context_len=192)
  tables = np.asarray(p["block_tables"]).copy()
  tables[0, 1] = 10_000        # past the cache
  tables[1, 0] = -7            # negative
  tables[3, 1:] = 2 ** 31 - 1  # past the request's last page: never read, no effect
  p["block_tables"] = jnp.asarray(tables[:, :2])  # width 2: request 2's third page is missing
  p["context_lens"] = jnp.asarray([130, 100, 190, 60], jnp.int32)
  out = np.asarray(_kernel(p, kernel.PagedConfig(pages_per_split=1, num_stages=2)))
  ref = np.asarray(_reference(p))
  assert_same_inf_pattern(out, ref)
  assert calc_diff(out, ref) < 5e-6
  rows = out.reshape(4, 2, -1)
  assert np.isneginf(rows[0, :, 64:128]).all() and np.isneginf(rows[1, :, :64]).all()
  assert np.isneginf(rows[2, :, 128:]).all()
  # A context longer than max_context_len only fills the output's width.
  p["context_lens"] = jnp.asarray([130, 100, 900, 60], jnp.int32)
  p["block_tables"] = jnp.asarray(np.concatenate([tables[:, :2], tables[:, :2]], 1))
  assert_same_inf_pattern(_kernel(p), _reference(p))


def test_kernel_unclean_logits_keep_valid_values():
  rng = np.random.default_rng(6)
  p = paged_problem(rng, [70, 3], next_n=2, H=64, max_context_len=200)
  out = np.asarray(_kernel(p, clean_logits=False))
  ref = paged_mqa_logits_np(p)
  valid = ~np.isneginf(ref)
  assert calc_diff(np.where(valid, out, 0.0), np.where(valid, ref, 0.0)) < 5e-6


def test_unsupported_shapes():
  from kernels_pallas import paged_mqa_logits as kernel
  for n in range(1, 5):
    for H in (16, 32, 64, 128):
      assert kernel.unsupported_reason(n, H, 128) is None, (n, H)
  assert "next_n" in kernel.unsupported_reason(5, 64, 128)
  assert "next_n" in kernel.unsupported_reason(0, 64, 128)
  assert "D" in kernel.unsupported_reason(1, 64, 64)
  assert "H" in kernel.unsupported_reason(1, 24, 128)
  assert kernel.query_groups(4, 64) == ((0, 2), (2, 2))
  assert kernel.query_groups(3, 128) == ((0, 1), (1, 1), (2, 1))
  assert kernel.query_groups(4, 16) == ((0, 4),)
  rng = np.random.default_rng(0)
  p = paged_problem(rng, [10], next_n=1, H=24)
  with pytest.raises(ValueError, match="does not support"):
    _call(p, "pallas", interpret=True)
  p = paged_problem(rng, [10], next_n=3, H=24)
  with pytest.raises(ValueError, match=r"does not support this input: .*H=24"):
    _call(p, "pallas", interpret=True)


def test_default_config_fills_the_gpu():
  from kernels_pallas import paged_mqa_logits as kernel
  for B, L in [(1, 4096), (1, 65536), (64, 4096), (64, 65536), (128, 85_000)]:
    cfg = kernel.default_config(B, L)
    assert 4 <= cfg.pages_per_split <= 64
    ctas = B * -(-(-(-L // 64)) // cfg.pages_per_split)
    assert ctas >= min(8 * 132, B * -(-L // 64) // 4), (B, L, cfg, ctas)


_PERSISTENT = dict(schedule="persistent", ctas_per_sm=2, num_stages=4)


@pytest.mark.parametrize("B,next_n,H,L,clean_logits,cfg", [
    (64, 1, 64, 65536, True, None), (64, 2, 64, 65536, True, None),
    (64, 1, 64, 65536, False, None), (64, 2, 64, 65536, False, None),
    (1, 2, 32, 4099, True, None), (128, 1, 16, 333, True, None),
    (64, 3, 64, 65536, True, None), (8, 4, 128, 8192, False, None),
    (64, 1, 64, 65536, True, _PERSISTENT), (64, 2, 64, 65536, False, _PERSISTENT),
    (64, 4, 64, 32768, True, dict(_PERSISTENT, ctas_per_sm=1, num_stages=8)),
    (1, 3, 16, 4099, True, dict(_PERSISTENT, num_stages=16)),
    (64, 2, 64, 32768, True, dict(group_rows=64)), (8, 3, 32, 4099, False, dict(group_rows=64)),
    (64, 2, 64, 32768, True, dict(_PERSISTENT, group_rows=64)),
    (64, 1, 64, 32768, True, dict(direct_store=True)),
    (64, 2, 64, 32768, True, dict(direct_store=True)),
    (8, 4, 64, 4099, False, dict(direct_store=True)),
    (64, 2, 64, 32768, True, dict(direct_store=True, release="fence")),
    (64, 2, 64, 32768, True, dict(direct_store=True, release="arrive")),
    (8, 1, 128, 4099, False, dict(direct_store=True, release="fence"))])
def test_kernel_cross_lowers_to_cuda(B, next_n, H, L, clean_logits, cfg):
  """The production shapes (B=64, H=64, D=128, 64K context) and odd ones go through the whole
  Mosaic GPU lowering (layout inference, fp8 wgmma operand checks, TMA descriptors) on a
  CPU-only box. It does not run ptxas: register and shared-memory limits show only on a GPU."""
  from kernels_pallas import paged_mqa_logits as kernel
  D, P, W = 128, 70_000, -(-L // 64) + 5
  f8, f32, i32 = jnp.float8_e4m3fn, jnp.float32, jnp.int32
  args = (jax.ShapeDtypeStruct((B, next_n, H, D), f8), jax.ShapeDtypeStruct((P, 64, D), f8),
          jax.ShapeDtypeStruct((P, 64), f32), jax.ShapeDtypeStruct((B * next_n, H), f32),
          jax.ShapeDtypeStruct((B,), i32), jax.ShapeDtypeStruct((B, W), i32))
  config = kernel.PagedConfig(**cfg) if cfg else None
  f = lambda *a: kernel.paged_mqa_logits(*a, max_context_len=L, clean_logits=clean_logits,
                                         config=config)
  text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("next_n,H", [(4, 64), (3, 128), (2, 128)])
def test_wide_next_n_cross_lowers_to_cuda(next_n, H):
  """ops' Pallas path for next_n * H > 128 lowers for CUDA as one Mosaic GPU call."""
  from nsa_jax import ops
  from nsa_jax.cache import IndexKCache
  B, D, P, L = 8, 128, 5000, 8192
  f8, f32, i32 = jnp.float8_e4m3fn, jnp.float32, jnp.int32
  args = (jax.ShapeDtypeStruct((B, next_n, H, D), f8), jax.ShapeDtypeStruct((P, 64, D), f8),
          jax.ShapeDtypeStruct((P, 64), f32), jax.ShapeDtypeStruct((B * next_n, H), f32),
          jax.ShapeDtypeStruct((B,), i32), jax.ShapeDtypeStruct((B, L // 64), i32))
  f = lambda q, k, s, w, c, t: ops._paged_pallas(
      q, IndexKCache(k, s), w, c, t, max_context_len=L, clean_logits=True, interpret=False)
  text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu.") >= 1 and "concatenate" not in text


# --------------------------------------------------------------------------- GPU

def _device_problem(key, context_lens, next_n, H=64, D=128, max_context_len=None):
  """A shuffled paged cache built on the device (host RNG is too slow for 10M tokens)."""
  from nsa_jax.cache import IndexKCache
  ctx = np.asarray(context_lens, np.int32)
  B = len(ctx)
  L = max_context_len or int(ctx.max())
  pages_per = -(-ctx // 64)
  max_pages = max(int(pages_per.max()), -(-L // 64))
  P = int(pages_per.sum()) + 7
  perm = np.random.default_rng(int(ctx.sum())).permutation(P).astype(np.int32)
  tables = np.full((B, max_pages), -1, np.int32)
  starts = np.concatenate([[0], np.cumsum(pages_per)])
  for b in range(B):
    tables[b, :pages_per[b]] = perm[starts[b]:starts[b + 1]]
  kq, kk, ks, kw = jax.random.split(key, 4)
  k8 = jax.random.normal(kk, (P, 64, D), jnp.bfloat16).astype(jnp.float8_e4m3fn)
  scale = jax.random.uniform(ks, (P, 64), jnp.float32, 0.5, 2.0)
  q8 = jax.random.normal(kq, (B, next_n, H, D), jnp.bfloat16).astype(jnp.float8_e4m3fn)
  w = jax.random.normal(kw, (B * next_n, H), jnp.float32) * (H * D) ** -0.5
  return dict(q_fp8=q8, cache=IndexKCache(k8, scale), weights=w,
              context_lens=jnp.asarray(ctx), block_tables=jnp.asarray(tables),
              max_context_len=L)


def _spread_lens(rng, B, avg):
  return np.maximum(1, (avg * rng.uniform(0.7, 1.3, B)).astype(np.int32))


def _check_device_problem(p, **kw):
  """Kernel vs the jitted float32 reference: exact -inf pattern, calc_diff, determinism."""
  out = np.asarray(_call(p, "pallas", **kw))
  ref_fn = jax.jit(lambda *a: reference.paged_mqa_logits(*a, max_context_len=p["max_context_len"]))
  ref = np.asarray(ref_fn(p["q_fp8"], p["cache"].k_fp8, p["cache"].k_scale, p["weights"],
                          p["context_lens"], p["block_tables"]))
  assert_same_inf_pattern(out, ref)
  assert calc_diff(out, ref) < 5e-6
  again = np.asarray(_call(p, "pallas", **kw))
  np.testing.assert_array_equal(again.view(np.uint32), out.view(np.uint32))  # deterministic


def test_device_problem_interpret():
  """The GPU tests' generator and checks, at a CPU-sized problem in interpret mode."""
  rng = np.random.default_rng(9)
  p = _device_problem(jax.random.key(0), _spread_lens(rng, 3, 150), 2, H=32)
  _check_device_problem(p, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("next_n", [1, 2, 3, 4])  # 3, 4: two wgmma groups per page
@pytest.mark.parametrize("avg", [4096, 16384, 65536])
@pytest.mark.parametrize("B", [1, 64, 128])
def test_gpu_matches_reference(B, avg, next_n):
  rng = np.random.default_rng(B * 7 + avg + next_n)
  p = _device_problem(jax.random.key(B + next_n), _spread_lens(rng, B, avg), next_n)
  _check_device_problem(p)


@pytest.mark.gpu
@pytest.mark.parametrize("H,next_n", [(128, 2), (128, 4), (32, 4), (16, 3), (32, 1)])
def test_gpu_other_head_counts(H, next_n):
  """GLM-5's H = 32 and the other head counts, with next_n * H over one wgmma's 128 rows."""
  rng = np.random.default_rng(H + next_n)
  p = _device_problem(jax.random.key(H * next_n), _spread_lens(rng, 16, 9000), next_n, H=H)
  _check_device_problem(p)


@pytest.mark.gpu
@pytest.mark.parametrize("next_n", [1, 2, 4])
@pytest.mark.parametrize("store", ["smem", "fence", "arrive"])
def test_gpu_store_paths(next_n, store):
  """The store and refill paths next to the default's on the GPU: SMEM + TMA stores
  (``direct_store=False``) and the barrier-free releases (``release="fence"`` / ``"arrive"``,
  slots refilled a page later): exact -inf pattern and values against the float32
  reference, NaN-free, deterministic."""
  from kernels_pallas import paged_mqa_logits as kernel
  rng = np.random.default_rng(70 + next_n)
  p = _device_problem(jax.random.key(70 + next_n), _spread_lens(rng, 64, 12000), next_n)
  L = p["max_context_len"]
  fields = (dict(direct_store=False) if store == "smem"
            else dict(direct_store=True, release=store))
  cfg = dataclasses.replace(kernel.default_config(64, L), **fields)
  f = jax.jit(lambda *a: kernel.paged_mqa_logits(*a, max_context_len=L, config=cfg))
  args = (p["q_fp8"], p["cache"].k_fp8, p["cache"].k_scale, p["weights"], p["context_lens"],
          p["block_tables"])
  out = np.asarray(f(*args))
  ref = np.asarray(jax.jit(lambda *a: reference.paged_mqa_logits(*a, max_context_len=L))(*args))
  assert not np.isnan(out).any()
  assert_same_inf_pattern(out, ref)
  assert calc_diff(out, ref) < 5e-6
  np.testing.assert_array_equal(np.asarray(f(*args)).view(np.uint32), out.view(np.uint32))


@pytest.mark.gpu
def test_gpu_auto_picks_pallas_and_handles_edge_rows():
  rng = np.random.default_rng(1)
  p = paged_problem(rng, [1, 64, 0, 150, 333, 4097], next_n=2, H=64, max_context_len=5001)
  out = _call(p, "auto")
  ref = paged_mqa_logits_np(p)
  assert_same_inf_pattern(out, ref)
  assert calc_diff(out, ref) < 5e-6
