"""Top-k selection: the xla backend and the Mosaic GPU kernel (interpret mode, CUDA lowering,
GPU).

Results are checked as sets against float64 numpy (``assert_valid_topk``: any choice among
ties at the threshold passes); the kernel's tie rule (every key above the threshold, then the
lowest-index ties at it) is checked exactly as a set, the order within a row being
unspecified (rows with <= k valid keys: ascending, then -1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from kernels_pallas import topk as topk_kernel
from tests.helpers import assert_valid_topk

CASES = ["distinct", "ties", "all_neg_inf", "few_valid", "k_gt_S", "nan", "out_of_range",
         "empty_rows", "inf_and_nan"]


def _rows(rng, T, S):
  ks = rng.integers(0, S, T).astype(np.int32)
  ke = np.minimum(ks + rng.integers(0, S + 1, T), S).astype(np.int32)
  ks[0], ke[0] = 0, S  # at least one full row
  return ks, ke


def _case(case, T=9, S=300, k=64):
  """(logits, ks, ke, k, ks/ke clamped as the oracle sees them) for a named edge case."""
  rng = np.random.default_rng(sum(map(ord, case)))
  x = rng.standard_normal((T, S)).astype(np.float32)
  ks, ke = _rows(rng, T, S)
  if case == "ties":
    x = np.round(x * 2) / 2  # ~13 distinct values: many ties at every threshold
  elif case == "all_neg_inf":
    x[:] = -np.inf
  elif case == "few_valid":
    ke = np.minimum(ks + 5, S).astype(np.int32)
  elif case == "k_gt_S":
    k = 512
  elif case == "nan":
    x[rng.random(x.shape) < 0.1] = np.nan
  elif case == "out_of_range":
    ks, ke = ks - 50, ke + 100  # the kernel clamps to [0, S); nothing out of bounds is read
  elif case == "empty_rows":
    ke = ks.copy()
    ke[1], ks[2] = 0, S + 7  # also ke < ks and ks > S
  elif case == "inf_and_nan":
    x[:, ::3] = np.inf
    x[:, 1::3] = np.nan
    x[:, 2::7] = -np.inf
  lo = np.clip(ks, 0, S)
  hi = np.clip(ke, lo, S)
  return x, ks.astype(np.int32), ke.astype(np.int32), k, lo, hi


def _run(x, ks, ke, k, **kw):
  return nsa_jax.topk_indices(jnp.asarray(x), jnp.asarray(ks), jnp.asarray(ke), k=k, **kw)


@pytest.mark.parametrize("case", CASES)
def test_topk_xla(case):
  x, ks, ke, k, lo, hi = _case(case)
  if case in ("out_of_range", "empty_rows"):
    ks, ke = lo, hi  # the xla backend masks rather than clamps; same valid set when in range
  out = _run(x, ks, ke, k, backend="xla")
  assert out.shape == (x.shape[0], k) and out.dtype == jnp.int32
  assert_valid_topk(out, x, lo, hi, k)


def test_topk_distinct_equals_lax_sort_order():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 100)).astype(np.float32)
  ks = np.zeros(4, np.int32)
  ke = np.full(4, 100, np.int32)
  out = np.asarray(_run(x, ks, ke, 10, backend="xla"))
  np.testing.assert_array_equal(out, np.argsort(-x, axis=1)[:, :10])


# --------------------------------------------------------------------------- Pallas, interpret

@pytest.mark.parametrize("case", CASES)
def test_topk_pallas_interpret(case):
  x, ks, ke, k, lo, hi = _case(case)
  out = _run(x, ks, ke, k, backend="pallas", interpret=True)
  assert out.shape == (x.shape[0], k) and out.dtype == jnp.int32
  assert_valid_topk(out, x, lo, hi, k)


def _expected_order(x, lo, hi, k):
  """The kernel's documented selection in ascending index: every key above the k-th largest
  value, then the lowest-index ties at it until k are chosen; -1 past the valid keys."""
  out = np.full((x.shape[0], k), -1, np.int32)
  for i in range(x.shape[0]):
    idx = np.arange(lo[i], hi[i])
    v = np.where(np.isnan(x[i, idx]), -np.inf, x[i, idx]).astype(np.float64)
    if len(idx) <= k:
      out[i, :len(idx)] = idx
      continue
    desc = np.sort(v)[::-1]
    thr = desc[k - 1]
    if desc[k] < thr:
      row = idx[v >= thr]
    else:
      row = np.concatenate([idx[v > thr], idx[v == thr]])[:k]
    out[i] = row
  return out


def _assert_tie_rule(out, x, lo, hi, k):
  """The selected set (order within a row unspecified) is the documented one."""
  np.testing.assert_array_equal(np.sort(np.asarray(out), axis=1),
                                np.sort(_expected_order(x, lo, hi, k), axis=1))


@pytest.mark.parametrize("case", ["distinct", "ties", "all_neg_inf", "few_valid", "inf_and_nan"])
def test_topk_pallas_tie_rule(case):
  x, ks, ke, k, lo, hi = _case(case)
  out = np.asarray(_run(x, ks, ke, k, backend="pallas", interpret=True))
  _assert_tie_rule(out, x, lo, hi, k)


_C = topk_kernel.TopKConfig


@pytest.mark.parametrize("config", [
    _C(segment=1000, warpgroups=1),   # one segment: the direct, final launch
    _C(segment=256, warpgroups=1),    # 4 segments (the last one short), then one merge
    _C(segment=120, warpgroups=2),    # 9 segments of fewer than k + 1 keys: all kept
    _C(segment=64, warpgroups=1),     # 16 segments, 1600 candidates, merged in one launch
    _C(segment=512, warpgroups=1, stream=True),   # the row streamed through one CTA
], ids=["one_segment", "four_segments", "short_segments", "tiny_segments", "stream"])
@pytest.mark.parametrize("case", ["distinct", "ties", "all_neg_inf", "inf_and_nan"])
def test_topk_pallas_configs(config, case):
  """Split rows: every segment's top-k (with the tie rule) holds the row's top-k, and the
  merge keeps the tie rule because candidates carry their row indices."""
  x, ks, ke, k, lo, hi = _case(case, T=6, S=1000, k=100)
  out = topk_kernel.topk_indices(jnp.asarray(x), jnp.asarray(ks), jnp.asarray(ke), k=k,
                                 interpret=True, config=config)
  _assert_tie_rule(out, x, lo, hi, k)


@pytest.mark.parametrize("config", [None, _C(segment=256, warpgroups=1)],
                         ids=["one_segment", "split"])
@pytest.mark.parametrize("case", ["distinct", "ties", "all_neg_inf", "few_valid", "inf_and_nan"])
def test_topk_pallas_ascending(case, config):
  """``ascending=True``: the documented set, in ascending index, then -1."""
  x, ks, ke, k, lo, hi = _case(case)
  out = topk_kernel.topk_indices(jnp.asarray(x), jnp.asarray(ks), jnp.asarray(ke), k=k,
                                 interpret=True, config=config, ascending=True)
  want = _expected_order(x, lo, hi, k).astype(np.uint32)   # -1 sorts last as uint32
  np.testing.assert_array_equal(np.asarray(out), np.sort(want, axis=1).astype(np.int32))


def test_topk_pallas_long_rows_interpret():
  """S > 32768 with the default plan: segments of <= 32768 keys, then a merge launch."""
  rng = np.random.default_rng(5)
  T, S, k = 2, 70000, 2048
  x = rng.standard_normal((T, S)).astype(np.float32)
  x[1] = np.round(x[1] * 8) / 8   # ties at the threshold
  ks = np.array([0, 1000], np.int32)
  ke = np.array([S, S - 3], np.int32)
  assert len(topk_kernel.plan(T, S, k)) == 2
  out = topk_kernel.topk_indices(jnp.asarray(x), jnp.asarray(ks), jnp.asarray(ke), k=k,
                                 interpret=True)
  _assert_tie_rule(out, x, ks, ke, k)


def test_topk_pallas_adversarial_values():
  """Values over every exponent, a cluster of near-equal ones at the threshold (they share
  22 of 32 key bits: three digit passes), subnormals and zeros."""
  rng = np.random.default_rng(3)
  T, S, k = 3, 512, 40
  x = (rng.choice([-1, 1], (T, S)) * 2.0 ** rng.uniform(-120, 120, (T, S))).astype(np.float32)
  x[1, :100] = np.nextafter(np.float32(1.0), np.float32(2.0)) * (1 + np.arange(100) * 1e-7)
  x[2] = np.float32(1e-38) * np.arange(S)  # subnormals and zero
  ks = np.zeros(T, np.int32)
  ke = np.full(T, S, np.int32)
  out = np.asarray(_run(x, ks, ke, k, backend="pallas", interpret=True))
  _assert_tie_rule(out, x, ks, ke, k)


def test_topk_pallas_ties_need_index_passes():
  """More keys tie at the threshold than are wanted, at indices whose bits differ in every
  digit: the index passes must pick the lowest indices."""
  S, k = 5000, 7
  x = np.zeros((2, S), np.float32)
  x[0, [4999, 3, 2048, 1, 4095, 70, 2047, 9, 10]] = 1.0   # 9 tied maxima, 7 wanted
  x[1] = 1.0                                               # all tied
  ks = np.zeros(2, np.int32)
  ke = np.full(2, S, np.int32)
  for config in (None, _C(segment=1024, warpgroups=1)):
    out = np.asarray(topk_kernel.topk_indices(jnp.asarray(x), jnp.asarray(ks),
                                              jnp.asarray(ke), k=k, interpret=True,
                                              config=config))
    np.testing.assert_array_equal(np.sort(out[0]), [1, 3, 9, 10, 70, 2047, 2048])
    np.testing.assert_array_equal(np.sort(out[1]), np.arange(k))


def test_topk_pallas_few_valid_ignores_values():
  """Rows with <= k valid keys return them all, whatever the logits (even NaN)."""
  x = np.full((2, 64), np.nan, np.float32)
  out = np.asarray(_run(x, np.array([3, 0], np.int32), np.array([10, 64], np.int32), 64,
                        backend="pallas", interpret=True))
  np.testing.assert_array_equal(out[0], np.r_[np.arange(3, 10), np.full(57, -1)])
  np.testing.assert_array_equal(out[1], np.arange(64))


def test_topk_plan():
  """Rows of <= 32768 keys run as one launch; longer rows stream through one CTA each when
  there are enough rows, and few long rows are split into segments whose candidates
  (segments x k) the next launch merges."""
  assert [c.segment for _, c in topk_kernel.plan(8192, 32768, 2048)] == [32768]
  assert [c.segment for _, c in topk_kernel.plan(8192, 8192, 2048)] == [8192]
  many = topk_kernel._STREAM_MIN_ROWS
  for S in (32769, 65536, 1 << 20):
    (lv,) = topk_kernel.plan(many, S, 2048)
    assert lv[0] == S and lv[1].stream
  lv = topk_kernel.plan(many - 1, 65536, 2048)
  assert [n for n, _ in lv] == [65536, 4096] and lv[0][1].segment == 32768
  assert not any(c.stream for _, c in lv)
  for rows, S, k in [(1, 1 << 20, 2048), (64, 32768, 512), (1, 131072, 1024), (3, 1000, 16)]:
    lv = topk_kernel.plan(rows, S, k)
    assert lv[0][0] == S and -(-lv[-1][0] // lv[-1][1].segment) == 1
    for (n, c), (n2, _) in zip(lv, lv[1:]):
      assert n2 == -(-n // c.segment) * k < n     # every merge shrinks the row
  with pytest.raises(ValueError, match="multiple of 4"):
    _C(segment=1001, warpgroups=1)
  with pytest.raises(ValueError, match="warpgroups"):
    _C(segment=1024, warpgroups=3)
  with pytest.raises(ValueError, match="multiple of 1024"):
    _C(segment=1000, warpgroups=2, stream=True)


def test_topk_pallas_unsupported_reason():
  assert topk_kernel.unsupported_reason(32768, 2048) is None
  assert topk_kernel.unsupported_reason(1 << 20, 2048) is None
  assert topk_kernel.unsupported_reason(0, 2048) is not None


# --------------------------------------------------------------------------- CUDA lowering

@pytest.mark.parametrize("T,S,k", [(4096, 32768, 2048), (1, 131072, 2048), (8, 1 << 20, 2048),
                                   (8192, 8192, 2048), (8192, 65536, 512), (3, 1001, 16)])
def test_topk_pallas_lowers_for_cuda(T, S, k):
  """Builds and verifies the kernel's Mosaic GPU module for CUDA at production shapes,
  including the per-thread code emitted through inline_mgpu (no GPU needed; PTX assembly
  happens on the GPU and is covered by the GPU tests)."""
  x = jax.ShapeDtypeStruct((T, S), jnp.float32)
  i = jax.ShapeDtypeStruct((T,), jnp.int32)
  f = jax.jit(lambda a, b, c: topk_kernel.topk_indices(a, b, c, k=k))
  text = f.trace(x, i, i).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= len(topk_kernel.plan(T, S, k))
  assert "triton" not in text


@pytest.mark.parametrize("T,S,cfg", [(8192, 65536, _C(8192, 2, stream=True)),
                                     (16, 100003, _C(8192, 4, stream=True)),
                                     (4, 1 << 20, _C(4096, 1, stream=True))])
def test_topk_pallas_stream_lowers_for_cuda(T, S, cfg):
  """The streaming variant's per-thread code (warp ballots, both tails) builds for CUDA."""
  x = jax.ShapeDtypeStruct((T, S), jnp.float32)
  i = jax.ShapeDtypeStruct((T,), jnp.int32)
  f = jax.jit(lambda a, b, c: topk_kernel.topk_indices(a, b, c, k=2048, config=cfg))
  text = f.trace(x, i, i).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 1 and "vote.sync.ballot" in text


# --------------------------------------------------------------------------- GPU, full size

def _gpu_case(T, S, seed=0, ragged=False):
  key = jax.random.key(seed)
  x = jax.random.normal(key, (T, S), jnp.float32)
  if ragged:
    ks = jax.random.randint(jax.random.fold_in(key, 1), (T,), 0, S // 2, jnp.int32)
    ke = jnp.minimum(ks + jax.random.randint(jax.random.fold_in(key, 2), (T,), 0, S, jnp.int32), S)
  else:
    ks = jnp.zeros((T,), jnp.int32)
    ke = jnp.full((T,), S, jnp.int32)
  return x, ks, ke


def _assert_same_sets(a, b):
  a, b = np.sort(np.asarray(a), axis=1), np.sort(np.asarray(b), axis=1)
  bad = np.nonzero((a != b).any(axis=1))[0]
  assert bad.size == 0, f"{bad.size} rows differ, first {bad[:5].tolist()}"


@pytest.mark.gpu
@pytest.mark.parametrize("T,S,k", [(4096, 32768, 2048), (64, 131072, 2048), (2, 1 << 20, 2048),
                                   (512, 8192, 2048), (256, 65536, 2048), (300, 30000, 2048),
                                   (1, 32768, 2048), (1, 131072, 2048), (100, 3001, 2048),
                                   (64, 32768, 512), (16, 262144, 1024), (7, 100003, 1)])
def test_topk_pallas_gpu_matches_lax_top_k(T, S, k):
  x, ks, ke = _gpu_case(T, S)
  out = _run(x, ks, ke, k, backend="pallas")
  _, ref = jax.lax.top_k(x, min(k, S))   # random normals: distinct values, so sets are unique
  _assert_same_sets(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("T,S", [(256, 32768), (16, 200000), (1, 1 << 20)])
def test_topk_pallas_gpu_ragged_and_ties(T, S):
  x, ks, ke = _gpu_case(T, S, seed=1, ragged=True)
  x = jnp.round(x * 4) / 4   # heavy ties
  out = np.asarray(_run(x, ks, ke, 2048, backend="pallas"))
  xn, ksn, ken = np.asarray(x), np.asarray(ks), np.asarray(ke)
  rows = np.arange(0, T, max(1, T // 16))
  assert_valid_topk(out[rows], xn[rows], ksn[rows], ken[rows], 2048)
  _assert_tie_rule(out[rows], xn[rows], ksn[rows], ken[rows], 2048)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("S", [300, 40000])
def test_topk_pallas_gpu_edge_cases(case, S):
  """The CPU edge cases (NaN, +-inf, empty and out-of-range rows, few valid, k > S) on the
  kernel itself, one segment (S = 300) and split rows with a merge (S = 40000)."""
  x, ks, ke, k, lo, hi = _case(case, T=9, S=S, k=64)
  out = np.asarray(_run(x, ks, ke, k, backend="pallas"))
  assert_valid_topk(out, x, lo, hi, k)
  _assert_tie_rule(out, x, lo, hi, k)


@pytest.mark.gpu
def test_topk_pallas_gpu_matches_xla_backend_sets():
  x, ks, ke = _gpu_case(512, 40000, seed=2, ragged=True)   # split, ragged rows
  _assert_same_sets(_run(x, ks, ke, 2048, backend="pallas"), _run(x, ks, ke, 2048, backend="xla"))


@pytest.mark.gpu
def test_topk_pallas_gpu_deterministic():
  """Same inputs, same output, order included (no atomics decide a slot)."""
  x, ks, ke = _gpu_case(64, 65536, seed=3, ragged=True)
  first = np.asarray(_run(x, ks, ke, 2048, backend="pallas"))
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(_run(x, ks, ke, 2048, backend="pallas")), first)


_STREAMS = [_C(8192, 2, stream=True), _C(4096, 4, stream=True), _C(8192, 1, stream=True),
            _C(8192, 4, stream=True)]


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", _STREAMS, ids=["c8192_wg2", "c4096_wg4", "c8192_wg1",
                                               "c8192_wg4"])
@pytest.mark.parametrize("T,S,ragged", [(300, 65536, False), (64, 100003, True),
                                        (4, 1 << 20, False), (33, 32768, True)])
def test_topk_pallas_gpu_stream_matches_lax_top_k(cfg, T, S, ragged):
  """Streamed rows (two reads, candidates compacted in shared memory) on the kernel itself."""
  x, ks, ke = _gpu_case(T, S, seed=4, ragged=ragged)
  out = np.asarray(topk_kernel.topk_indices(x, ks, ke, k=2048, config=cfg))
  if not ragged:
    _assert_same_sets(out, jax.lax.top_k(x, 2048)[1])
  else:
    xn, ksn, ken = np.asarray(x), np.asarray(ks), np.asarray(ke)
    assert_valid_topk(out, xn, ksn, ken, 2048)
    _assert_tie_rule(out, xn, ksn, ken, 2048)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", _STREAMS[:2], ids=["c8192_wg2", "c4096_wg4"])
def test_topk_pallas_gpu_stream_fallbacks(cfg):
  """Rows whose candidates do not fit shared memory take the all-global tail: a crowded
  top-digit bucket (all equal: every key ties; a narrow band), and candidates that fit in
  total but crowd one warp's region (large values only at positions warp 0 reads)."""
  T, S, k = 6, 65536, 2048
  rng = np.random.default_rng(6)
  x = rng.standard_normal((T, S)).astype(np.float32)
  x[0] = 1.0                                                    # all tie: index passes
  x[1] = 1.0 + rng.uniform(0, 2 ** -12, S).astype(np.float32)   # one bucket, distinct
  x[2] = np.round(x[2] * 4) / 4                                 # ties at the threshold
  warp0 = np.flatnonzero((np.arange(S) // 4) % cfg.threads < 32)
  x[3, rng.choice(warp0, 1000, replace=False)] = 100 + rng.uniform(0, 1, 1000)
  x[4, :] = -np.inf
  x[4, 5::9] = np.nan
  ks = np.array([0, 0, 0, 0, 0, 7], np.int32)
  ke = np.array([S, S, S - 1, S, S, S - 11], np.int32)
  x[5] = x[3]
  out = np.asarray(topk_kernel.topk_indices(jnp.asarray(x), jnp.asarray(ks), jnp.asarray(ke),
                                            k=k, config=cfg))
  assert_valid_topk(out, x, ks, ke, k)
  _assert_tie_rule(out, x, ks, ke, k)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_topk_pallas_gpu_stream_edge_cases(case):
  x, ks, ke, k, lo, hi = _case(case, T=9, S=40000, k=64)
  out = np.asarray(topk_kernel.topk_indices(jnp.asarray(x), jnp.asarray(ks), jnp.asarray(ke),
                                            k=k, config=_STREAMS[0]))
  assert_valid_topk(out, x, lo, hi, k)
  _assert_tie_rule(out, x, lo, hi, k)


@pytest.mark.gpu
def test_topk_pallas_gpu_stream_deterministic():
  """Warp regions in lane order: the streamed output order repeats exactly."""
  x, ks, ke = _gpu_case(300, 65536, seed=3, ragged=True)
  f = jax.jit(lambda a, b, c: topk_kernel.topk_indices(a, b, c, k=2048, config=_STREAMS[0]))
  first = np.asarray(f(x, ks, ke))
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(f(x, ks, ke)), first)
